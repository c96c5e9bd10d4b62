"""First contact with a lent GPU: the CUDA behaviours the 32B colocated path rests on, one JSON report.

    python tools/gpu_check.py --device cuda --out gpu_report.json   # one H100/H200, < 10 min
    python tools/gpu_check.py --device cpu --out cpu_report.json    # each part's CPU meaning (CI)

torch, megatron-core and this repository only. This file runs the parts and writes the report; the
parts are in tools/gpu_check_parts.py and (``offload``) tools/gpu_check_offload.py. Each part runs
in a subprocess in a session of its own with a timeout (its own, or what is left of
``--time-budget-s``; then the process group is killed) and returns measurements, ``ok`` and a
``reason``; the report adds the environment and per part the status (pass/fail/timeout/skipped)
and wall time. Exit 0 iff all passed. Parts, CUDA | CPU:

- ``ipc``: 1 sender, 3 receivers, 3 buckets over the ipc transport (``transfer.send_buckets`` /
  ``receive``), bit-exact; receivers allocate nothing for mapped buckets; the sender's allocated
  memory back at baseline after release + ``ipc_collect``, device free memory after ``empty_cache``
  | the /dev/shm branch, no file left behind.
- ``transfer_group``: ``weights.transports.TransferGroup`` beside a default group; NCCL at world 1, and what NCCL does
  with two ranks on one GPU (recorded, not judged) | gloo at world 1 and 2.
- ``offload``: GPT + DDP + distributed optimizer, world 1, bf16 (1.2B | tiny): the controller's moves
  around a generation (``Colocation.enter`` over the schedule's ``updates -> sync -> generation ->
  values``: gradients dropped + optimizer state, then parameters, then onload), bit-exact, gradients
  zero, the next step bit-identical to a reference engine that never offloaded; ``pinned_bytes ==
  host_bytes``, ``host_bytes - storage_bytes < 64 * storages``, per move its time and what stays
  resident (``mem_get_info`` | engine storage bytes); then the default ``offload()`` (gradients
  copied) twice, as before.
- ``startup``: the colocated start-up order beside a process that reserves 85% of the GPU as vLLM's
  worker does: reserve, sleep (free + ``empty_cache``), trainer built and loaded (model-only
  torch_dist, as ``checkpoint.load_policy``), a step, offload, engine reserves again | 256 MiB, RSS.
- ``checkpoint``: torch_dist save + load with the optimizer, bit-identical (350M | tiny).
- ``init_cost``: a Qwen2.5-32B layer built with ``use_cpu_initialization=True`` through the
  project's layer spec, then moved to the GPU | at 1/4 width, extrapolated (labelled so).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the parts' modules, also when imported from elsewhere
import gpu_check_parts as parts  # noqa: E402
from gpu_check_offload import part_offload  # noqa: E402

REPO = Path(__file__).resolve().parents[1]  # on the parts' PYTHONPATH: the repository need not be installed

PARTS = ("ipc", "transfer_group", "offload", "startup", "checkpoint", "init_cost")
TIMEOUT_S = parts.TIMEOUT_S
MIN_START_S = 15  # a part is not started with less of the budget left than this
FUNCS = dict(env=parts.part_env, ipc=parts.part_ipc, transfer_group=parts.part_transfer_group, offload=part_offload,
             startup=parts.part_startup, checkpoint=parts.part_checkpoint, init_cost=parts.part_init_cost)


def run_one(name: str, device: str, timeout_s: float, work: Path) -> dict:
    """Part ``name`` in a subprocess in its own session; on timeout its whole process group is killed."""
    out, log = work / f"{name}.json", work / f"{name}.log"
    env = dict(os.environ, PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    env.pop("MASTER_PORT", None)  # each part picks a free one
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--run-part", name, str(out),
                              "--device", device], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
            os.killpg(p.pid, signal.SIGKILL)  # the part and every process it started
            p.wait()
    entry = {"wall_s": time.perf_counter() - t0, "timeout_s": timeout_s,
             "log_tail": log.read_text(errors="replace")[-3000:]}
    if rc is None:
        return {"status": "timeout", "reason": f"timed out after {timeout_s:.0f} s (process group killed)", **entry}
    if not out.exists():
        return {"status": "fail", "reason": f"exited with code {rc} without a result", **entry}
    res = json.loads(out.read_text())
    entry.update(status="pass" if res.pop("ok") else "fail", reason=res.pop("reason"), result=res)
    return {k: v for k, v in entry.items() if k != "log_tail" or entry["status"] != "pass"}


def child(name: str, result: str, device: str) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"gpu_check_{name}_"))
    try:
        if name != "env":
            parts.require(device)  # every part: without a GPU, fail here
        if name in ("startup", "checkpoint") and importlib.util.find_spec("psutil") is None:
            raise RuntimeError("psutil is missing: without it dist_checkpointing.save hangs (carry its wheel)")
        res = FUNCS[name](device, work)
        if foreign := [m for m in ("vllm", "ray", "transformer_engine", "apex") if m in sys.modules]:
            raise RuntimeError(f"the part imported {foreign}: the GPU machine has torch and megatron-core only")
    except BaseException as e:  # noqa: BLE001 - a failed part is a result
        res = {"ok": False, "reason": f"{type(e).__name__}: {e}"[:1000], "traceback": traceback.format_exc(limit=12)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(result).write_text(json.dumps(res, indent=1, default=str) + "\n")
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown (process groups, CUDA contexts): they go with the process


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default="gpu_report.json")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated, from " + ",".join(PARTS))
    ap.add_argument("--time-budget-s", type=float, default=540.0, help="for all parts together")
    ap.add_argument("--part-timeout-s", type=float, default=None, help="instead of every part's own timeout")
    ap.add_argument("--run-part", nargs=2, metavar=("PART", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_part:
        child(*args.run_part, device=args.device)
    parts = [p for p in args.parts.split(",") if p]
    if set(parts) - set(PARTS):
        ap.error(f"unknown parts {sorted(set(parts) - set(PARTS))}; choose from {list(PARTS)}")
    t_start, work = time.perf_counter(), Path(tempfile.mkdtemp(prefix="gpu_check_"))
    report = {"tool": "tools/gpu_check.py", "device": args.device, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "time_budget_s": args.time_budget_s, "parts": {}, "skipped": {}}
    try:
        report["environment"] = (env := run_one("env", args.device, TIMEOUT_S["env"], work)).get("result", env)
        for name in parts:
            left = args.time_budget_s - (time.perf_counter() - t_start)
            if left < MIN_START_S:
                why = report["skipped"][name] = f"time budget: {max(left, 0):.0f} s left of {args.time_budget_s:.0f} s"
                report["parts"][name] = {"status": "skipped", "reason": why}
                continue
            timeout = min(args.part_timeout_s or TIMEOUT_S[name], left)
            entry = report["parts"][name] = run_one(name, args.device, timeout, work)
            print(f"[gpu_check] {name}: {entry['status']} in {entry['wall_s']:.1f} s"
                  + (f": {entry['reason']}" if entry["reason"] else ""), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["wall_s"] = time.perf_counter() - t_start
    report["ok"] = all(report["parts"][n]["status"] == "pass" for n in parts)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"[gpu_check] {'all passed' if report['ok'] else 'NOT all passed'} in {report['wall_s']:.0f} s; "
          f"report: {args.out}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
