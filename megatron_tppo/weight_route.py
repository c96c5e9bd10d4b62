"""How policy weights travel from the trainer ranks to the engine workers: the one rule.

Pure (imports nothing of the package), so that every layer can ask it: config validation
(:func:`check_request`: what is wrong whatever the placement), the placement
(:func:`megatron_tppo.planning.layout.route_of`), ``plan``, and the sync itself
(:class:`megatron_tppo.controller.weight_sync.WeightSync`, with what the engine workers report).

Two paths:

- ``local``: every engine worker's GPU also holds a policy rank (``parallel.trainers=shared``).
  Each of those ranks assembles the whole model bucket by bucket inside the trainer, over the
  trainer's own process groups (the TP all-gather, then each stage's buckets broadcast to the
  other stages over the PP group), and hands every bucket to the engine worker on its own GPU
  as an IPC handle. Transport ``ipc``: no host staging, no TCP for weights; on CPU the handles
  name ``/dev/shm`` files, so the same path runs here.
- ``broadcast``: one transfer group per pipeline stage; the stage's sender (TP rank 0 of DP
  replica 0) sends each bucket to every engine worker. Transport ``gloo`` (host buffers over
  TCP; host-staged on GPU), ``nccl`` (CUDA buffers; NCCL refuses a worker on its sender's GPU)
  or ``ipc`` (handles, only to workers on the sender's node).

``auto``: local when it can; else on CUDA nccl when no engine worker shares a sender's GPU, ipc
when they share them and all run on the senders' nodes, host-staged gloo otherwise; gloo on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

TRANSPORTS = ("auto", "gloo", "nccl", "ipc")
PATHS = ("local", "broadcast")


class TransportError(ValueError):
    """A transport that cannot carry the weights where the engines run; the message says why."""


@dataclass(frozen=True)
class WorkerSite:
    """Where one engine worker runs, as far as the rule cares."""

    engine: int
    worker: int
    policy_rank: Optional[int]
    """The policy rank on this worker's GPU, or None."""
    on_sender_nodes: bool
    """It runs on the node of every pipeline stage's sender."""
    on_sender_gpu: bool
    """It shares its GPU with a stage's sender."""

    @property
    def name(self) -> str:
        return f"engine {self.engine} worker {self.worker}"


@dataclass(frozen=True)
class Route:
    path: str
    """``local`` or ``broadcast`` (module docstring)."""
    transport: str
    """``gloo``, ``nccl`` or ``ipc``."""
    why: str

    def to_json(self) -> dict:
        return {"path": self.path, "transport": self.transport, "why": self.why}

    def describe(self) -> str:
        where = ("from the policy rank on each engine worker's own GPU" if self.path == "local"
                 else "from each pipeline stage's sender to every engine worker")
        return f"{self.transport} {where} ({self.why})"


def check_request(requested: str, device: str, colocate: bool) -> None:
    """What is wrong with ``rollout.weight_transport`` whatever the placement (TransportError)."""
    if requested not in TRANSPORTS:
        raise TransportError(f"must be one of {TRANSPORTS}, got {requested!r}")
    if requested == "nccl" and device == "cpu":
        raise TransportError("nccl needs parallel.device cuda (or auto on a GPU machine); use gloo, ipc or auto on cpu")
    if requested == "nccl" and colocate:
        raise TransportError("nccl with rollout.colocate=true puts an engine worker on a sender's GPU, which NCCL "
                             "refuses (one rank per GPU); use auto, ipc or gloo (host-staged)")


def choose(requested: str, device: str, colocate: bool, sites: Sequence[WorkerSite]) -> Route:
    """The route for engine workers at ``sites`` (every worker of every engine); TransportError
    naming a worker when the requested transport cannot reach it."""
    check_request(requested, device, colocate)
    if not sites:
        raise TransportError("no engine worker to send weights to")
    lonely = [s for s in sites if s.policy_rank is None]
    if requested in ("auto", "ipc") and not lonely:
        return Route("local", "ipc", "every engine worker's GPU holds a policy rank")
    if requested == "gloo":
        return Route("broadcast", "gloo", "requested")
    if requested == "nccl":
        return Route("broadcast", "nccl", "requested")
    away = [s for s in sites if not s.on_sender_nodes]
    if requested == "ipc":
        if away:
            raise TransportError(f"ipc: {lonely[0].name} has no policy rank on its GPU, and {away[0].name} runs "
                                 f"off the node of a pipeline stage's sender ({len(away)} such worker(s)); IPC "
                                 f"handles open only on the sender's node. Use parallel.trainers=shared, auto or gloo")
        return Route("broadcast", "ipc", f"requested; {lonely[0].name} has no policy rank on its GPU")
    if device != "cuda":
        return Route("broadcast", "gloo", f"cpu, and {lonely[0].name} has no policy rank on its device")
    shared = [s for s in sites if s.on_sender_gpu]
    if not shared:
        return Route("broadcast", "nccl", "the engines have GPUs of their own")
    if not away:
        return Route("broadcast", "ipc", f"{shared[0].name} shares a sender's GPU (NCCL allows one rank per GPU); "
                                         f"every engine worker is on its senders' node")
    return Route("broadcast", "gloo", f"host-staged: {shared[0].name} shares a sender's GPU (NCCL allows one rank "
                                      f"per GPU) and {away[0].name} runs off a sender's node (IPC stays on a node); "
                                      f"parallel.trainers=shared would keep every sync on the GPUs")
