"""The ``ipc`` weight transport's memory: buckets stay where the sender packed them; handles travel.

Same group, same buckets, same slot layout as gloo/nccl; only what crosses the wire differs
(:class:`megatron_tppo.weights.transports.IpcTransport` moves the handles and acks; this module
makes, exports, opens and releases the shared buffers). Per bucket the sender (a policy rank):

1. packs the bucket into a flat buffer that other processes can map: on CUDA an ordinary CUDA
   allocation, on CPU a file of its own in ``/dev/shm`` mapped shared;
2. exports a handle PER RECEIVER and broadcasts ``(slots, size, [handle per receiver])`` over the
   group's gloo control channel: a few hundred bytes per receiver and bucket, never tensor bytes.
   CUDA: ``torch.multiprocessing.reductions.reduce_tensor(flat)``, i.e. ``rebuild_cuda_tensor``
   and its arguments, the CUDA IPC handle of the allocation among them. CPU: the file's path;
3. waits for the ack (an all-reduce in which every receiver reports that it mapped the buffer),
   then drops its own reference (CPU: and unlinks the file) and packs the next bucket.

Why not ``reduce_tensor`` on CPU too: between unrelated processes it needs torch's
``file_system`` strategy, whose ``torch_shm_manager`` daemon is started by the sender, inherits
the sender's file descriptors (its stdout/stderr pipes, multiprocessing sentinels) and lives until
every receiver process exits (each keeps a connection to it). Tried: it hung
``tools/check_parity.py``, whose rank-process join waits on a sentinel the daemon held open while
the engine it waited for kept the daemon alive. An unlinked ``/dev/shm`` file has the same
zero-copy, cross-process refcounted memory with the kernel as the only bookkeeper.

Each receiver maps its handle (zero copy: a view of the sender's memory), yields the slot views
into vLLM's reload exactly as :func:`~megatron_tppo.weights.transfer.receive` does, and drops
them when vLLM does. There is no copy into a receive buffer and, on CPU, one physical copy per
node however many receivers share it.

Lifetime. vLLM's layer-wise reload keeps the tensors it is given (as bound loader arguments) until
a layer is complete, and a layer whose loaded size falls short of its parameter (an embedding
padded to a multiple of 64) until the end of the reload (``vllm/model_executor/model_loader/
reload/layerwise.py``, read in the installed vLLM). So "this receiver finished with bucket k" is
not observable when bucket k+1 is requested, and waiting for it would deadlock on such a layer.
Instead buffers are never reused, and cross-process reference counts free each buffer when the
last process drops it: on CPU the kernel's (an unlinked file's pages live while mapped); on CUDA
torch's IPC ref counter of each export, the sender parking a freed block in its "limbo" until every
receiver released its mapping (``torch.cuda.ipc_collect`` frees the released ones). One export
per receiver because torch pairs each export with exactly one consumer release. On CPU the file is
unlinked once every receiver mapped it; the kernel frees the pages with the last mapping.

Memory: the sender holds ONE bucket of its own at a time (single-buffered; from allocation to the
ack, measured as ``peak_live_bytes`` like today); after the ack a bucket lives as long as some
receiver's views do, measured on the receivers' side through the mapped storages
(``peak_live_bytes``: 2-3 buckets, as for gloo). On CPU every receiver's views share the
sender's pages, so a node holds those buckets once, not once per receiver.

Who may use it: only processes on the sender's node (the rule of :mod:`megatron_tppo.weight_route`
refuses ``rollout.weight_transport=ipc`` otherwise). On CUDA the memory stays on the sender's GPU;
a receiver on the same GPU (the ``local`` route: every engine worker from the policy rank on its
own GPU) reads it in place, one on another GPU of the node through peer access.

Supported only by reading upstream source, not run here (this machine has no GPU):
- :func:`open_handle`'s CUDA branch overwrites ``args[6]`` (``storage_device`` of
  ``rebuild_cuda_tensor``) with the receiver's own device index: the handle carries the sender's
  index, which names another GPU when the two processes see different ``CUDA_VISIBLE_DEVICES``
  (vLLM's ``IPCWeightTransferEngine.receive_weights`` and verl's colocated rebuild do the same).
- one export per receiver, and the limbo / ``ipc_collect`` behaviour above (torch's
  ``StorageSharing.cpp`` ``_share_cuda_``/``_new_shared_cuda`` and ``CudaIPCTypes.cpp``; vLLM's
  ``PackedBufferImporter`` docstring states the one-export-one-release pairing).
- a receiver on a different GPU of the node than its sender: it maps the handle on its own device
  and reads across GPUs, which needs CUDA peer access between the two (CUDA's documentation of
  ``cudaIpcOpenMemHandle``; not confirmed in torch's source, not run). Same-GPU receivers (the
  colocated engine worker on its sender's GPU) read in place.
- :func:`export`'s ``current_stream().synchronize()``: the packing copies must be finished before
  another process reads (torch also records an IPC event at export; the sync makes it moot).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import tempfile
import weakref
from typing import Optional

import torch

_SHM_MIN = 64  # a zero-byte segment cannot be mapped


_SEQ = itertools.count()


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def shared_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A flat uint8 buffer of ``nbytes`` that :func:`export` can share without a copy."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    if device.type != "cpu":
        raise ValueError(f"the ipc weight transport shares cpu or cuda buffers, not {device}")
    path = os.path.join(_shm_dir(), f"tppo_weights_{os.getpid()}_{next(_SEQ)}")
    storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=max(int(nbytes), _SHM_MIN))
    flat = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (int(nbytes),), (1,))
    flat._tppo_shm_path = path
    weakref.finalize(flat, _unlink, path)  # a bucket that never went out (an error) leaves no file behind
    return flat


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def export(flat: torch.Tensor) -> bytes:
    """One handle to ``flat`` for ONE receiving process (see the module doc)."""
    if flat.is_cuda:
        from torch.multiprocessing.reductions import reduce_tensor

        torch.cuda.current_stream(flat.device).synchronize()
        return pickle.dumps(("cuda", reduce_tensor(flat)))
    path = getattr(flat, "_tppo_shm_path", None)
    if path is None:
        raise ValueError("an ipc bucket on CPU must come from shared_buffer()")
    return pickle.dumps(("cpu", (path, flat.untyped_storage().nbytes(), flat.storage_offset(), flat.numel())))


def release(flat: torch.Tensor) -> None:
    """Sender, after every receiver mapped ``flat``: drop the name (CPU: unlink its file; the pages
    live on in the mappings) or collect CUDA blocks that receivers have released."""
    if flat.is_cuda:
        torch.cuda.ipc_collect()
        return
    path = getattr(flat, "_tppo_shm_path", None)
    if path is not None:
        _unlink(path)


def open_handle(handle: bytes, device: Optional[torch.device] = None) -> torch.Tensor:
    """The tensor behind an :func:`export` handle, mapped into this process (no copy).

    ``device``: this process's CUDA device to map a CUDA handle on (default: the current one).
    """
    kind, payload = pickle.loads(handle)
    if kind == "cpu":
        path, storage_bytes, offset, numel = payload
        storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=storage_bytes)
        return torch.empty(0, dtype=torch.uint8).set_(storage, offset, (numel,), (1,))
    rebuild, args = payload
    args = list(args)
    index = device.index if device is not None and device.type == "cuda" else None
    args[6] = torch.cuda.current_device() if index is None else index  # see the module doc
    return rebuild(*args)


def this_node() -> str:
    """Which machine this process runs on, as the same-node check compares it: the Ray node id in a
    Ray worker, else the host name."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except ImportError:
        pass
    import socket

    return socket.gethostname()
