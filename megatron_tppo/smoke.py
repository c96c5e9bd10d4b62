"""First run on a new cluster: the tiny model through the whole loop, then a resume, checked.

    python -m megatron_tppo.smoke --model DIR [--config FILE] [--out DIR] [key.sub=value ...]

Runs ``python -m megatron_tppo.train`` twice in ``--out`` (default ``runs/smoke``): part 1 trains
2 steps and checkpoints step 2; part 2 resumes it and trains step 3. Then it checks, from the
TensorBoard events and the logs, that

* both parts exited 0;
* the train-vs-rollout log-prob mismatch (``rollout/logprob_mismatch_max``) stays below 1e-3 at
  every step (trainer and engine compute the same distribution from the synced weights);
* the weights were synced into the engines after every step (``perf/weight_sync_s`` at each step);
* the TensorBoard tags a run needs are present;
* a whole checkpoint was written and the resumed part loaded it and continued at step 3;

and prints a short PASS/FAIL report to paste into an issue (also ``<out>/smoke_report.txt``;
exit 0 only when every check passed). ``slurm/smoke.sh`` runs it on an allocated GPU node.
The checks are pure functions of the scalars and logs (:func:`evaluate`), tested without a run.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MISMATCH_LIMIT = 1e-3
STEPS, RESUMED_STEPS = 2, 3
REQUIRED_TAGS = ("policy/loss", "policy/grad_norm", "critic/value_loss", "rollout/generated_tokens",
                 "rollout/logprob_mismatch_max", "rollout/slot_utilization", "perf/step_s", "perf/generate_s",
                 "perf/train_s", "perf/weight_sync_s", "perf/checkpoint_s")
# every step trains and syncs (the default warm-up would leave the first steps without a sync);
# a checkpoint at the end of part 1 only
RUN_OVERRIDES = ["algorithm.critic_warmup_steps=0", "checkpoint.save_every=0", "data.eval_every=0",
                 "logging.progress_bar=false"]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _by_step(scalars: dict, tag: str) -> dict[int, float]:
    return dict(scalars.get(tag, []))


def evaluate(scalars: dict, out: Path, rc: tuple[int, int], logs: tuple[str, str],
             steps: int = STEPS, resumed_steps: int = RESUMED_STEPS) -> list[Check]:
    """The smoke checks. ``scalars``: {tag: [(step, value)]} of both parts' events; ``rc`` and
    ``logs``: the two parts' exit codes and console output."""
    checks = [Check("run (2 steps) exited 0", rc[0] == 0, f"exit {rc[0]}"),
              Check("resumed run exited 0", rc[1] == 0, f"exit {rc[1]}")]
    mism = _by_step(scalars, "rollout/logprob_mismatch_max")
    all_steps = list(range(1, resumed_steps + 1))
    worst = max(mism.values()) if mism else float("nan")
    checks.append(Check(f"train-vs-rollout log-prob mismatch < {MISMATCH_LIMIT:g}",
                        bool(mism) and all(s in mism for s in all_steps) and worst < MISMATCH_LIMIT,
                        f"max {worst:.3g} over steps {sorted(mism)}"))
    sync = _by_step(scalars, "perf/weight_sync_s")
    missing_sync = [s for s in all_steps if s not in sync]
    checks.append(Check("weights synced after every step", not missing_sync,
                        f"missing at steps {missing_sync}" if missing_sync else
                        f"{len(sync)} syncs, max {max(sync.values()):.2f} s"))
    missing = [t for t in REQUIRED_TAGS if t not in scalars]
    checks.append(Check("TensorBoard tags present", not missing,
                        f"missing {missing}" if missing else f"{len(REQUIRED_TAGS)} tags, {len(scalars)} in all"))
    ckpt = out / "checkpoints" / f"step_{steps:08d}"
    checks.append(Check("checkpoint written", (ckpt / "COMPLETE").is_file(),
                        f"{ckpt.name}: " + ("COMPLETE" if (ckpt / "COMPLETE").is_file() else "no COMPLETE marker")))
    resumed = f"resumed from {ckpt} at step {steps}" in logs[1]
    reached = resumed_steps in _by_step(scalars, "policy/loss")
    checks.append(Check("checkpoint resumed", resumed and reached,
                        ("loaded" if resumed else "no 'resumed from ...' line") + f", step {resumed_steps} "
                        + ("trained" if reached else "not trained")))
    return checks


def report(checks: list[Check], info: str) -> str:
    ok = all(c.ok for c in checks)
    lines = [f"T-PPO smoke test: {'PASS' if ok else 'FAIL'} ({sum(c.ok for c in checks)}/{len(checks)}) {info}"]
    lines += [f"  [{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in checks]
    return "\n".join(lines)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"host {platform.node()}", f"python {platform.python_version()}"]
    for pkg in ("torch", "megatron-core", "vllm", "ray"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} missing")
    return "; ".join(parts)


def _train(args: list[str], log: Path) -> tuple[int, str]:
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "megatron_tppo.train", *args], stdout=f,
                            stderr=subprocess.STDOUT).returncode
    return rc, log.read_text()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_tppo.smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the tiny HF model (tools/build_tiny_model.py)")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "examples/tiny_cpu.yaml"))
    p.add_argument("--out", default="runs/smoke", help="run directory (emptied first)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. parallel.device=cuda")
    a = p.parse_args(argv)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    common = ["--config", a.config, f"model.hf_path={a.model}", *RUN_OVERRIDES, *a.overrides,
              f"logging.output_dir={out}"]
    t0 = time.perf_counter()
    rc1, log1 = _train([*common, f"steps={STEPS}"], out / "smoke_part1.log")
    rc2, log2 = _train([*common, f"steps={RESUMED_STEPS}", "checkpoint.resume=true"], out / "smoke_part2.log")
    from megatron_tppo.monitoring import read_scalars

    scalars = read_scalars(out / "tensorboard") if (out / "tensorboard").is_dir() else {}
    checks = evaluate(scalars, out, (rc1, rc2), (log1, log2))
    text = report(checks, f"in {time.perf_counter() - t0:.0f} s\n  {_versions()}\n  run dir {out.resolve()}")
    (out / "smoke_report.txt").write_text(text + "\n")
    print(text)
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
