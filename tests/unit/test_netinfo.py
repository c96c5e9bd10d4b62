"""The launcher's network helpers, against the machine's own interfaces."""
import os
import socket
import subprocess
import sys

import pytest

from megatron_tppo.netinfo import interface_ip, shm_free_bytes


def test_loopback_interface_ip():
    lo = [n for _, n in socket.if_nameindex() if n.startswith("lo")]
    if not lo:
        pytest.skip("no loopback interface")
    assert interface_ip(lo[0]).startswith("127.")


def test_unknown_interface_is_named():
    with pytest.raises(ValueError, match="'nosuch0' does not exist"):
        interface_ip("nosuch0")
    r = subprocess.run([sys.executable, "-m", "megatron_tppo.netinfo", "ip", "--iface", "nosuch0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "nosuch0" in r.stderr and "Traceback" not in r.stderr


def test_shm_free_bytes_matches_statvfs(tmp_path):
    st = os.statvfs(tmp_path)
    assert abs(shm_free_bytes(str(tmp_path)) - st.f_bavail * st.f_frsize) < 64 << 20
