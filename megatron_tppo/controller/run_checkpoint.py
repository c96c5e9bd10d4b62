"""Run checkpoints: everything needed to continue a T-PPO run exactly where it stopped.

A checkpoint directory ``<output_dir>/checkpoints/step_<N>/`` holds
  * ``policy/`` and ``critic/``: megatron torch_dist checkpoints with optimizer and LR schedule
    (loadable at another TP/PP layout);
  * ``run_state.pt``: the step, the policy version, the window pool with its in-flight truncated
    responses (tokens, behaviour log-probs, values, policy versions), the prompt stream position
    and the driver's RNG states;
  * ``COMPLETE``: written last.
It is written under a temporary name and renamed into place only when whole, so a crash while
saving leaves either the previous checkpoint or a stray ``.tmp`` directory that is ignored (and
removed by the next save). Only the newest ``keep_last`` checkpoints are kept.

Shared trainers (``parallel.trainers=shared``) save and load one at a time, each in its turn of
the memory schedule's phase (:meth:`~megatron_tppo.controller.colocation.Colocation.turn`), the
critic first.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

_PREFIX = "step_"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    return int(path.name[len(_PREFIX):])


def list_checkpoints(root: Path) -> list[Path]:
    """Whole checkpoints (with COMPLETE), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "COMPLETE").is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest checkpoint whose run state loads; a corrupt one is reported and skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            torch.load(path / "run_state.pt", weights_only=False)
            return path
        except Exception as err:  # noqa: BLE001 - any unreadable file means "not whole"
            print(f"[tppo] checkpoint {path} is unreadable ({type(err).__name__}: {err}); trying the previous one",
                  flush=True)
    return None


def _gpus_shared(loop) -> bool:
    """Do the policy and critic share a GPU (so saving both at once would onload both on it)?
    Never on CPU; on the 32B layout each owns its GPUs and both save at once."""
    if getattr(loop.cfg.parallel, "device", "auto") == "cpu":
        return False
    gpus = [{tuple(g) for w in (grp.where or []) for g in w.get("gpus", [])} for grp in (loop.policy, loop.critic)]
    return bool(gpus[0] & gpus[1])


def save(root: Path, step: int, loop, keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically (collective over the trainer groups)."""
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp, final = root / f".{_PREFIX}{step:08d}.tmp", root / f"{_PREFIX}{step:08d}"
    tmp.mkdir()
    if loop.colocation.shared:  # the trainers take turns on the same GPUs
        loop.colocation.turn("critic")
        loop.critic.save(str(tmp / "critic"))
        loop.colocation.turn("policy")
        loop.policy.save(str(tmp / "policy"))
    elif _gpus_shared(loop):  # one trainer onloaded at a time next to the engine's memory
        loop.policy.save(str(tmp / "policy"))
        loop.critic.save(str(tmp / "critic"))
    else:  # policy and critic write at the same time
        refs = loop.policy.save_async(str(tmp / "policy")), loop.critic.save_async(str(tmp / "critic"))
        loop.policy.wait_save(refs[0])
        loop.critic.wait_save(refs[1])
    state = {"step": step, "loop": loop.state_dict(), "prompts": loop.task.prompts.state_dict(),
             "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}}
    torch.save(state, tmp / "run_state.pt")
    (tmp / "COMPLETE").write_text(json.dumps({"step": step, "time": time.time()}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    print(f"[tppo] checkpoint {final} written in {time.perf_counter() - t0:.1f} s", flush=True)
    return final


def resume(root: Path, loop) -> Optional[int]:
    """Load the newest whole checkpoint under ``root`` that loads completely; returns the next step,
    or None when there is none. A checkpoint whose model files fail to load (truncated, corrupt) is
    reported and the previous one is tried: every load overwrites all state, so nothing of the
    failed attempt survives."""
    for path in reversed(list_checkpoints(root)):
        try:
            step = load(path, loop)
        except Exception as err:  # noqa: BLE001 - any failure means "not usable"; say why, go back
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            print(f"[tppo] checkpoint {path} failed to load ({type(err).__name__}: {first[:300]}); "
                  "trying the previous one", flush=True)
            continue
        print(f"[tppo] resumed from {path} at step {step}", flush=True)
        return step
    return None


def load(path: Path, loop) -> int:
    """Restore models, optimizers, pool, stream and RNG from ``path``; returns the next step."""
    state = torch.load(path / "run_state.pt", weights_only=False)
    loop.colocation.turn("critic")  # (shared trainers; split ones load in the one phase)
    loop.critic.load(str(path / "critic"))
    loop.colocation.turn("policy")
    loop.policy.load(str(path / "policy"))
    loop.task.prompts.load_state_dict(state["prompts"])  # the pool's stream continues from here
    loop.load_state_dict(state["loop"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    return int(state["step"])
