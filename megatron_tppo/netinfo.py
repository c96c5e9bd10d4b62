"""Network facts the Slurm launcher needs, as a tiny CLI (no heavy import).

``python -m megatron_tppo.netinfo ip --iface ib0``: the IPv4 address of an interface, so that Ray
(and so the weight-transfer groups, which rendezvous on Ray's node address) use the fast fabric
rather than a management network. ``python -m megatron_tppo.netinfo shm``: free bytes of
``/dev/shm``, where Ray's object store lives.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import socket
import struct
import sys

SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's address


def interface_ip(iface: str) -> str:
    """IPv4 address of ``iface``; ValueError naming the interface (and the ones that exist) if none."""
    names = [name for _, name in socket.if_nameindex()]
    if iface not in names:
        raise ValueError(f"network interface {iface!r} does not exist on {socket.gethostname()} "
                         f"(there: {', '.join(names)})")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", iface.encode()[:15]))
        except OSError as err:
            raise ValueError(f"network interface {iface!r} has no IPv4 address ({err.strerror})") from None
    return socket.inet_ntoa(packed[20:24])


def shm_free_bytes(path: str = "/dev/shm") -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_tppo.netinfo")
    sub = p.add_subparsers(dest="what", required=True)
    ip = sub.add_parser("ip", help="IPv4 address of a network interface")
    ip.add_argument("--iface", required=True)
    shm = sub.add_parser("shm", help="free bytes of /dev/shm")
    shm.add_argument("--path", default="/dev/shm")
    args = p.parse_args(argv)
    try:
        print(interface_ip(args.iface) if args.what == "ip" else shm_free_bytes(args.path))
    except (ValueError, OSError) as err:
        print(f"netinfo: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
