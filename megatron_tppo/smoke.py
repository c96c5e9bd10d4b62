"""First run on a new cluster: the tiny model through the whole loop, then a resume, checked.

    python -m megatron_tppo.smoke --model DIR [--config FILE] [--out DIR] [key.sub=value ...]

Runs ``python -m megatron_tppo.train`` twice in ``--out`` (default ``runs/smoke``): part 1 trains
2 steps and checkpoints step 2; part 2 resumes it and trains step 3. Then it checks, from the
TensorBoard events and the logs, that

* both parts exited 0;
* the train-vs-rollout log-prob mismatch stays below a bound that depends on the precision the
  run computes in (:func:`mismatch_bound`) at every step (trainer and engine compute the same
  distribution from the synced weights);
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

STEPS, RESUMED_STEPS = 2, 3
REQUIRED_TAGS = ("policy/loss", "policy/grad_norm", "critic/value_loss", "rollout/generated_tokens",
                 "rollout/logprob_mismatch_max", "rollout/logprob_mismatch_mean", "rollout/slot_utilization",
                 "perf/step_s", "perf/generate_s", "perf/train_s", "perf/weight_sync_s", "perf/checkpoint_s")
EPS = {"bf16": 2.0 ** -7, "fp16": 2.0 ** -10}  # machine epsilon (spacing of the numbers at 1)
# every step trains and syncs (the default warm-up would leave the first steps without a sync);
# a checkpoint at the end of part 1 only
RUN_OVERRIDES = ["algorithm.critic_warmup_steps=0", "checkpoint.save_every=0", "data.eval_every=0",
                 "logging.progress_bar=false"]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def mismatch_bound(dtype: str) -> tuple[str, float]:
    """(statistic, bound) of the train-vs-rollout log-prob mismatch check for a run computing in
    ``dtype`` ("fp32", "bf16" or "fp16": :func:`run_dtype`). The statistic is over one step's loss
    tokens, of |train log-prob - rollout log-prob| in nats: ``rollout/logprob_mismatch_<statistic>``.

    * fp32 (a CPU run: trainer and vLLM both fp32): the max < 1e-3. Both sides evaluate the same
      function of the same weights, and fp32 rounding (eps 1.2e-7) keeps them within about 1e-5
      (vLLM matches HF transformers to 2.4e-6), so even the worst token leaves a wide margin, and
      a real difference of weights or masks lies far above it.
    * bf16 / fp16: the mean < 8 eps (bf16, eps 2^-7: 0.0625; fp16, eps 2^-10: 0.0078). Each side
      rounds every GEMM output, norm and residual to the dtype (relative error eps/2) in its own
      kernels and reduction order, and a log-prob z_t - logsumexp(z) carries those errors scaled by
      logits of size 1-10: a few eps per token on average, with a tail that the max over a step's
      thousands of tokens picks up, so the max is reported, not bounded. A random model of the tiny
      shape (HF Qwen2, bf16 against fp32 on CPU, 256 sampled tokens) has mean 0.002 / max 0.009 at
      init std 0.02 and mean 0.04 / max 0.2 at std 0.1 (logits up to 6.7). 8 eps on the mean is the scale
      NeMo-RL's bf16 GPU tests accept (per step, the token mean of exp|diff| < 1.05, i.e. a mean
      |diff| below about 0.05); wrong weights or shifted tokens move the mean by a nat or more. An
      engine a few small updates behind the trainer is within rounding in half precision: the fp32
      CPU run is the check for that.
    """
    if dtype == "fp32":
        return "max", 1e-3
    if dtype not in EPS:
        raise ValueError(f"dtype must be fp32, bf16 or fp16, got {dtype!r}")
    return "mean", 8 * EPS[dtype]


def run_dtype(params_dtype: str, device: str) -> str:
    """The coarser of the precisions the log-probs are computed in: the trainer's
    (``model.params_dtype``) and the rollout engine's (vLLM's, as
    :func:`~megatron_tppo.rollout.vllm_backend.llm_kwargs` picks it; for an fp32 model float32 on
    CPU and bfloat16 on GPU). ``device``: "cpu" or "cuda"."""
    from megatron_tppo.rollout.vllm_backend import llm_kwargs

    if params_dtype != "fp32":
        return params_dtype
    engine = llm_kwargs("", on_cpu=device == "cpu", max_model_len=1, max_num_seqs=1)["dtype"]
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[engine]


def config_dtype(config: str, overrides: list[str]) -> str:
    """:func:`run_dtype` of the run that the YAML file ``config`` and ``overrides`` describe
    (``parallel.device`` "auto": cuda when torch sees a GPU, as the trainer resolves it)."""
    from megatron_tppo.config_io import load_config

    cfg = load_config(config, overrides, validate=False)
    device = cfg.parallel.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return run_dtype(cfg.model.params_dtype, device)


def _by_step(scalars: dict, tag: str) -> dict[int, float]:
    return dict(scalars.get(tag, []))


def evaluate(scalars: dict, out: Path, rc: tuple[int, int], logs: tuple[str, str],
             steps: int = STEPS, resumed_steps: int = RESUMED_STEPS, dtype: str = "fp32") -> list[Check]:
    """The smoke checks. ``scalars``: {tag: [(step, value)]} of both parts' events; ``rc`` and
    ``logs``: the two parts' exit codes and console output; ``dtype``: :func:`run_dtype`."""
    checks = [Check("run (2 steps) exited 0", rc[0] == 0, f"exit {rc[0]}"),
              Check("resumed run exited 0", rc[1] == 0, f"exit {rc[1]}")]
    stat, limit = mismatch_bound(dtype)
    mism = _by_step(scalars, f"rollout/logprob_mismatch_{stat}")
    all_steps = list(range(1, resumed_steps + 1))
    worst = max(mism.values()) if mism else float("nan")
    detail = f"{stat} {worst:.3g} over steps {sorted(mism)}"
    if stat != "max" and "rollout/logprob_mismatch_max" in scalars:
        detail += f" (max {max(_by_step(scalars, 'rollout/logprob_mismatch_max').values()):.3g})"
    checks.append(Check(f"train-vs-rollout log-prob mismatch {stat} < {limit:g} ({dtype})",
                        bool(mism) and all(s in mism for s in all_steps) and worst < limit, detail))
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
    dtype = config_dtype(a.config, common[2:])
    t0 = time.perf_counter()
    rc1, log1 = _train([*common, f"steps={STEPS}"], out / "smoke_part1.log")
    rc2, log2 = _train([*common, f"steps={RESUMED_STEPS}", "checkpoint.resume=true"], out / "smoke_part2.log")
    from megatron_tppo.monitoring import read_scalars

    scalars = read_scalars(out / "tensorboard") if (out / "tensorboard").is_dir() else {}
    checks = evaluate(scalars, out, (rc1, rc2), (log1, log2), dtype=dtype)
    text = report(checks, f"in {time.perf_counter() - t0:.0f} s\n  {_versions()}\n  run dir {out.resolve()}")
    (out / "smoke_report.txt").write_text(text + "\n")
    print(text)
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
