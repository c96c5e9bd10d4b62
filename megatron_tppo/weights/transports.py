"""The transports of a weight transfer: one process group of its own, one small class per transport.

A transfer group joins one sender (rank 0) with its receivers (ranks 1..) through a TCPStore that
the sender hosts; it is never torch's default group, so it touches neither megatron's groups on
the trainer nor vLLM's inside the engine workers. Over it each transport moves buckets (flat
uint8 buffers laid out by :mod:`megatron_tppo.weights.bucket_plan`) with the same few methods:

=================  ===============================================================================
``buffer(n, like)`` where the sender packs a bucket of ``n`` bytes (``like``: a tensor on the
                   weights' device)
``send(slots, flat)`` the sender hands one bucket to every receiver
``end()``          the sender says the stream is over
``arrivals(device)`` a receiver's ``(slots, flat)`` per bucket, until the end
``close()``        leave the group
=================  ===============================================================================

- :class:`GlooTransport`: host buffers, broadcast over TCP (on GPU: host-staged).
- :class:`NcclTransport`: the same collectives on CUDA buffers (NCCL: one rank per GPU).
- :class:`IpcTransport`: the bucket stays where the sender packed it, in memory other processes
  can map (CUDA IPC on GPU, a ``/dev/shm`` file on CPU; :mod:`megatron_tppo.weights.ipc`); only
  handles and acks cross the group's gloo channel. Receivers on the sender's node only.

Stalls. Every collective waits at most the group's timeout (the plan's projected sync times its
margin, :func:`megatron_tppo.planning.time_model.waits`). Before it waits for a bucket, each
receiver records in the store which bucket it waits for; when a sender's collective fails or
times out, :meth:`Transport.stalled` reads those marks and names the receivers that are not
waiting for the stuck bucket (busy with an earlier one, stopped, or never started), with the
bucket and the stage.
"""
from __future__ import annotations

import datetime
import pickle
import socket
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from megatron_tppo.weights.bucket_plan import Slot


class TransferStalled(RuntimeError):
    """A bucket did not get through within the group's timeout; the message names who is behind."""


@dataclass
class TransferStats:
    """One side of one transfer (or the sum over several)."""

    bytes: int = 0
    """Bytes of tensors moved (without alignment padding)."""
    wire_bytes: int = 0
    """Bytes through the group's collectives (headers and acks included): the payload plus a
    little for gloo/nccl, only handles and acks for ipc."""
    buckets: int = 0
    tensors: int = 0
    wire_s: float = 0.0
    """Seconds inside the group's collectives (waiting for peers included)."""
    seconds: float = 0.0
    """Wall time of the whole transfer on this side."""
    bucket_bytes: list[int] = field(default_factory=list)
    peak_live_bytes: int = 0
    """Most bytes of transfer buffers alive at once (receivers: buckets whose views the engine still
    holds, tracked through the buffers' storages)."""
    live: list = field(default_factory=list, repr=False)
    """Receivers: (weak reference to a bucket's storage, bytes) of buckets that may still be alive."""

    def as_dict(self) -> dict:
        return {"bytes": self.bytes, "wire_bytes": self.wire_bytes, "buckets": self.buckets, "tensors": self.tensors,
                "wire_s": self.wire_s, "seconds": self.seconds, "max_bucket_bytes": max(self.bucket_bytes, default=0),
                "peak_live_bytes": self.peak_live_bytes}

    def sent(self, slots: list[Slot], nbytes: int) -> None:
        self.buckets += 1
        self.tensors += len(slots)
        self.bytes += sum(s.nbytes for s in slots)
        self.bucket_bytes.append(nbytes)


def local_address(peer_host: str) -> str:
    """This machine's IP on the interface that reaches ``peer_host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((peer_host, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def open_store(host: str, port: int = 0, timeout_s: float = 600.0):
    """The sender's side of the rendezvous: a TCPStore server on ``host`` (port 0 picks a free
    one; read it back from ``.port``). Returns at once; :func:`join` waits for the peers."""
    from torch.distributed import TCPStore

    return TCPStore(host, port, None, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                    wait_for_workers=False)


class TransferGroup:
    """A standalone gloo or NCCL group of ``world_size`` ranks: rank 0 sends, the others receive.

    ``device`` is where the collectives' buffers live: cpu for gloo (and ipc's control channel),
    the rank's CUDA device for nccl. ``names`` (sender side): who each receiver rank is, for errors.
    """

    def __init__(self, backend: str, store, rank: int, world_size: int, timeout_s: float,
                 names: Optional[dict[int, str]] = None, what: str = "weights"):
        from torch.distributed import PrefixStore

        self.backend, self.rank, self.world_size, self.what = backend, rank, world_size, what
        self.timeout_s = float(timeout_s)
        self.names = names or {}
        self.wire_bytes = 0  # bytes this rank put into / took out of the group's collectives
        self.store = PrefixStore(f"tppo_weights/{backend}", store)
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "nccl":
            from torch.distributed import ProcessGroupNCCL

            self.device = torch.device("cuda", torch.cuda.current_device())
            opts = ProcessGroupNCCL.Options()
            opts.is_high_priority_stream = False
            opts._timeout = timeout
            self.pg = ProcessGroupNCCL(self.store, rank, world_size, opts)
        elif backend in ("gloo", "ipc"):
            self.device = torch.device("cpu")
            self.pg = _gloo_group(self.store, rank, world_size, timeout, store)
        else:
            raise ValueError(f"transfer backend must be gloo, nccl or ipc, got {backend!r}")
        self._raw_store = store  # the sender's store serves the group: keep it alive

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place broadcast from rank 0 (the tensor must be on :attr:`device`)."""
        self.pg.broadcast(tensor, 0).wait()
        self.wire_bytes += tensor.numel() * tensor.element_size()
        return tensor

    def ack(self, value: int) -> int:
        """Sum of every rank's ``value`` (an all-reduce): the receivers' acknowledgement."""
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        self.pg.allreduce([t]).wait()
        self.wire_bytes += t.numel() * t.element_size()
        return int(t.item())

    def broadcast_object(self, obj=None):
        """Rank 0's picklable ``obj`` on every rank (small control data: bucket layouts, handles)."""
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(self.device)
            self.broadcast(torch.tensor([data.numel()], dtype=torch.int64, device=self.device))
            self.broadcast(data)
            return obj
        n = self.broadcast(torch.zeros(1, dtype=torch.int64, device=self.device))
        data = self.broadcast(torch.empty(int(n.item()), dtype=torch.uint8, device=self.device))
        return pickle.loads(data.cpu().numpy().tobytes())

    def ready(self, transfer: int, bucket: int) -> None:
        """Receiver: in transfer ``transfer`` it is waiting for bucket ``bucket`` (0-based): every
        earlier one arrived and went to the engine."""
        self.store.set(f"ready/{transfer}/{self.rank}", str(int(bucket)))

    def behind(self, transfer: int, bucket: int) -> list[str]:
        """Sender: the receivers not yet waiting for bucket ``bucket`` (still busy with an earlier
        one, stopped, or never started this transfer)."""
        out = []
        for rank in range(1, self.world_size):
            key = f"ready/{transfer}/{rank}"
            at = int(self.store.get(key)) if self.store.check([key]) else None
            if at is None or at < bucket:
                out.append(f"{self.names.get(rank, f'rank {rank}')} "
                           + ("(has not started)" if at is None else f"(waits for bucket {at})"))
        return out

    def close(self) -> None:
        pg, self.pg = getattr(self, "pg", None), None
        if pg is not None and self.backend == "nccl" and hasattr(pg, "shutdown"):
            pg.shutdown()
        self._raw_store = None


def _gloo_group(store, rank: int, world_size: int, timeout: datetime.timedelta, raw_store):
    from torch.distributed import ProcessGroupGloo

    try:  # bind to the interface that reaches the sender (multi-node; hostname lookups can pick loopback)
        host = raw_store.host if hasattr(raw_store, "host") else "127.0.0.1"
        opts = ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [ProcessGroupGloo.create_device(hostname=local_address(host))]
        return ProcessGroupGloo(store, rank, world_size, opts)
    except (AttributeError, TypeError):  # a torch without the options API: its default device
        return ProcessGroupGloo(store, rank, world_size, timeout)


# ---------------------------------------------------------------------------------------------
# The transports
# ---------------------------------------------------------------------------------------------


class Transport:
    """Base: a :class:`TransferGroup` and the per-transfer bucket count (see the module doc)."""

    name = ""

    def __init__(self, group: TransferGroup, stage: str = ""):
        self.group, self.stage, self.count, self.transfers = group, stage, 0, 0
        self.stats = TransferStats()

    def begin(self) -> TransferStats:
        """A new transfer: fresh stats, bucket count from 0."""
        self.stats, self.count = TransferStats(), 0
        self.transfers += 1  # both sides count transfers: the store's marks are per transfer
        return self.stats

    def buffer(self, nbytes: int, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.group.device)

    def send(self, slots: list[Slot], flat: torch.Tensor) -> None:
        t0 = time.perf_counter()
        try:
            self._send(slots, flat)
        except TransferStalled:
            raise
        except RuntimeError as err:
            raise self.stalled(err) from err
        self.stats.wire_s += time.perf_counter() - t0
        self.stats.sent(slots, flat.numel())
        self.stats.peak_live_bytes = max(self.stats.peak_live_bytes, flat.numel())  # one buffer at a time
        self.count += 1

    def end(self) -> None:
        t0 = time.perf_counter()
        try:
            self.group.broadcast_object(None)
        except RuntimeError as err:
            raise self.stalled(err) from err
        self.stats.wire_s += time.perf_counter() - t0

    def arrivals(self, device: Optional[torch.device]) -> Iterator[tuple[list[Slot], torch.Tensor]]:
        while True:
            self.group.ready(self.transfers, self.count)
            t0 = time.perf_counter()
            got = self._arrive(device)
            self.stats.wire_s += time.perf_counter() - t0
            if got is None:
                return
            self.count += 1
            yield got
            del got

    def stalled(self, err: Exception) -> TransferStalled:
        late = self.group.behind(self.transfers, self.count)
        who = ", ".join(late) if late else "no receiver is behind (the sender's side failed)"
        return TransferStalled(f"weight transfer ({self.name}{', ' + self.stage if self.stage else ''}): bucket "
                               f"{self.count} did not get through within {self.group.timeout_s:.0f} s; behind: {who} "
                               f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")

    def close(self) -> None:
        self.group.close()

    def _send(self, slots, flat) -> None:
        raise NotImplementedError

    def _arrive(self, device):
        raise NotImplementedError


class GlooTransport(Transport):
    """Header, then the flat buffer itself, broadcast to every receiver."""

    name = "gloo"

    def _send(self, slots, flat) -> None:
        self.group.broadcast_object((slots, flat.numel()))
        self.group.broadcast(flat if flat.device == self.group.device else flat.to(self.group.device))

    def _arrive(self, device):
        header = self.group.broadcast_object()
        if header is None:
            return None
        slots, size = header
        return slots, self.group.broadcast(torch.empty(size, dtype=torch.uint8, device=self.group.device))


class NcclTransport(GlooTransport):
    """:class:`GlooTransport`'s collectives on CUDA buffers."""

    name = "nccl"


class IpcTransport(Transport):
    """Handles, one per receiver (torch pairs each CUDA export with one release), then an ack in
    which every receiver reports that it mapped the bucket; see :mod:`megatron_tppo.weights.ipc`."""

    name = "ipc"

    def buffer(self, nbytes: int, like: torch.Tensor) -> torch.Tensor:
        from megatron_tppo.weights.ipc import shared_buffer

        return shared_buffer(nbytes, like.device)

    def _send(self, slots, flat) -> None:
        from megatron_tppo.weights.ipc import export, release

        receivers = self.group.world_size - 1
        try:
            self.group.broadcast_object((slots, flat.numel(), [export(flat) for _ in range(receivers)]))
            opened = self.group.ack(0)
        finally:
            release(flat)
        if opened != receivers:
            raise TransferStalled(f"weight transfer (ipc): {receivers - opened} of {receivers} receiver(s) could not "
                                  f"map bucket {self.count} (IPC handles open only on the sender's node)")

    def _arrive(self, device):
        from megatron_tppo.weights.ipc import open_handle

        header = self.group.broadcast_object()
        if header is None:
            return None
        slots, size, handles = header
        try:
            flat, error = open_handle(handles[self.group.rank - 1], device), None
        except Exception as e:  # noqa: BLE001 - reported to the sender through the ack, then raised
            flat, error = None, e
        self.group.ack(0 if error is not None else 1)
        if error is not None:
            raise RuntimeError(f"weight transfer (ipc): rank {self.group.rank} could not map the sender's bucket "
                               f"(IPC works only on the sender's node): {error}") from error
        if flat.numel() != size:
            raise RuntimeError(f"weight transfer (ipc): mapped {flat.numel()} bytes, the header says {size}")
        return slots, flat


TRANSPORT_CLASSES = {"gloo": GlooTransport, "nccl": NcclTransport, "ipc": IpcTransport}


def join(backend: str, rank: int, world_size: int, *, store=None, address: Optional[tuple[str, int]] = None,
         timeout_s: float = 600.0, names: Optional[dict[int, str]] = None, stage: str = "") -> Transport:
    """Join a transfer group as ``rank`` (blocks until all ``world_size`` ranks joined) and return
    its transport. The sender passes its store from :func:`open_store`, receivers its ``(host, port)``."""
    if backend not in TRANSPORT_CLASSES:
        raise ValueError(f"transfer backend must be one of {sorted(TRANSPORT_CLASSES)}, got {backend!r}")
    if store is None:
        from torch.distributed import TCPStore

        if address is None:
            raise ValueError("a receiver needs the sender's (host, port)")
        store = TCPStore(address[0], int(address[1]), None, is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s))
    group = TransferGroup(backend, store, rank, world_size, timeout_s, names=names)
    return TRANSPORT_CLASSES[backend](group, stage)
