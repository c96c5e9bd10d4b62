"""PPO vs T-PPO (window refill) vs T-PPO (continuous refill), one after another in one run.

The same config, start model, seed and held-out set for every mode; each mode's training loop gets
the same wall-clock budget (``time_budget_s`` with ``time_budget_excludes_eval=true``: the held-out
evaluations do not count against it and are recorded separately as ``eval_s``).

    .venv/bin/python benchmarks/tppo_vs_ppo.py [--config examples/longtail_cpu.yaml] [--budget-s 600]
        [--seeds 1234 1235] [--modes ppo tppo tppo_continuous] [key.sub=value ...]

Modes
    * ``ppo``: ``rollout.window_tokens = max_response_tokens`` (every slot waits for the longest).
    * ``tppo``: the configured window, finished slots refilled at window boundaries (the paper).
    * ``tppo_continuous``: ``rollout.refill=continuous`` (a finished slot takes the next sample at
      once; a step ends on ``num_slots x window_tokens`` generated tokens).

Every mode evaluates at the same training times (``data.eval_every_s``, ``--eval-every-s``), so
no mode sees the target on a finer grid. A PPO step generates whole responses, a T-PPO step one
window, so PPO's critic warm-up (if any) is scaled to about as many generated tokens. Nothing else
differs between the modes.

Per mode: start/final/best held-out accuracy, ``time_to_target_s`` (training seconds, i.e. the sum
of ``perf/step_s``, to the first evaluation at or above start + 0.05; null if never), the phase
split (generate, values, train, sync), slot utilization, generated tokens/s over whole steps
(generated tokens / step seconds), evaluation seconds, wall seconds. Writes
benchmarks/results/tppo_vs_ppo.json (``--seeds`` with more than one seed: tppo_vs_ppo_seed<N>.json
each, same schema) and a PNG of held-out accuracy against training seconds beside it.

The console shows what ``python -m megatron_tppo.train`` shows (the step lines, real problems) and
this benchmark's table; the library output of every mode (megatron-core, vLLM, Ray workers) goes to
``<run-dir>/logs/`` (:func:`megatron_tppo.console.start_run_logs`: driver.log, worker-<host>-<pid>.log;
each mode's ``actors.json`` says which worker process held which actor).

Evaluation is one code path: the periodic ``eval/accuracy`` (and ``eval/accuracy_se``) come from
the training loop's evaluation, and each mode's final model (its last run checkpoint) is scored
again by ``python -m megatron_tppo.evaluate`` on ``--final-eval-prompts`` x ``--final-eval-samples``
(``final_eval``: pass@1, bootstrap SE over prompts, accuracy by length bucket, mean length), both
:mod:`megatron_tppo.evaluation`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_tppo.config_io import dump_yaml, load_config  # noqa: E402

MODES = ("ppo", "tppo", "tppo_continuous")
PHASES = {"generate": "perf/generate_s", "values": "perf/values_s", "train": "perf/train_s",
          "sync": "perf/weight_sync_s"}


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} (the last value logged for a step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def summarize(name: str, cfg, tags: dict, wall_s: float, target_delta: float) -> dict:
    """The issue's per-mode record from the run's TensorBoard scalars (pure given ``tags``)."""
    step_s = tags.get("perf/step_s", {})
    steps = sorted(step_s)
    clock, t = {0: 0.0}, 0.0  # training seconds at the end of each step
    for s in steps:
        t += step_s[s]
        clock[s] = t
    acc = sorted(tags.get("eval/accuracy", {}).items())
    se = tags.get("eval/accuracy_se", {})
    curve = [(clock.get(s, t), v) for s, v in acc]
    start = acc[0][1] if acc else float("nan")
    target = start + target_delta
    reach = next((c for c, v in curve if v >= target), None)
    total = sum(step_s.values())

    def total_of(tag):
        return sum(tags.get(tag, {}).get(s, 0.0) for s in steps)

    finished = total_of("rollout/finished_count")
    util = [tags["rollout/slot_utilization"][s] for s in steps if s in tags.get("rollout/slot_utilization", {})]
    return {
        "mode": name, "window_tokens": cfg.rollout.window_tokens, "refill": cfg.rollout.refill, "steps": len(steps),
        "start_accuracy": start, "final_accuracy": acc[-1][1] if acc else float("nan"),
        "final_accuracy_se": se[max(se)] if se else float("nan"),  # of the last periodic evaluation
        "best_accuracy": max((v for _, v in acc), default=float("nan")), "target_accuracy": target,
        "time_to_target_s": reach, "train_s": total, "eval_s": sum(tags.get("perf/eval_s", {}).values()),
        "wall_s": wall_s,
        "phase_s": {k: total_of(tag) for k, tag in PHASES.items()},
        "phase_share": {k: total_of(tag) / total if total else float("nan") for k, tag in PHASES.items()},
        "slot_utilization": sum(util) / len(util) if util else float("nan"),
        "generated_tokens": total_of("rollout/generated_tokens"),
        "generated_tokens_per_s": total_of("rollout/generated_tokens") / total if total else float("nan"),
        "finished_responses": finished,
        # item 5's unit, measured: seconds per 1,000 finished responses, whole step and generation only
        "step_s_per_1000_finished": 1000 * total / finished if finished else float("nan"),
        "generate_s_per_1000_finished": 1000 * total_of(PHASES["generate"]) / finished if finished else float("nan"),
        "accuracy_curve": curve,
    }


def mode_configs(a, seed: int) -> dict:
    base = load_config(a.config, a.overrides)
    r = base.rollout

    def scaled(n: int) -> int:  # T-PPO steps -> PPO steps generating about as many tokens
        return max(1, math.ceil(n * r.window_tokens / r.max_response_tokens))

    # every mode evaluates at the same training times (data.eval_every_s), whatever its step length
    common = [f"seed={seed}", f"time_budget_s={a.budget_s}", "time_budget_excludes_eval=true", "steps=100000",
              "logging.progress_bar=false", "data.eval_every=1", f"data.eval_every_s={a.eval_every_s}"]
    extra = {"ppo": [f"rollout.window_tokens={r.max_response_tokens}", "rollout.refill=window",
                     f"algorithm.critic_warmup_steps={scaled(base.algorithm.critic_warmup_steps)}"],
             "tppo": ["rollout.refill=window"], "tppo_continuous": ["rollout.refill=continuous"]}
    return {m: load_config(a.config, a.overrides + common + extra[m]
                           + [f"logging.output_dir={a.run_dir}/seed{seed}/{m}"]) for m in a.modes}


def final_eval(cfg, a) -> dict | None:
    """The mode's final model (the run's last checkpoint) scored by the evaluator, in its own
    process (a quiet console; vLLM's memory goes with it); None with --final-eval-prompts 0."""
    if a.final_eval_prompts <= 0:
        return None
    run = Path(cfg.logging.output_dir)
    (run / "eval_config.yaml").write_text(dump_yaml(cfg))
    out = run / "final_eval.json"
    cmd = [sys.executable, "-m", "megatron_tppo.evaluate", "--config", str(run / "eval_config.yaml"),
           "--checkpoint", str(run), "--prompts", str(a.final_eval_prompts),
           "--samples", str(a.final_eval_samples), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"final evaluation of {run} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    rep = json.loads(out.read_text())
    return {k: rep[k] for k in ("accuracy", "accuracy_se", "response_length_mean", "num_prompts",
                                "samples_per_prompt", "buckets", "eval_s")}


def run_seed(a, seed: int) -> dict:
    from megatron_tppo.train import run

    out = {"seed": seed, "budget_s": a.budget_s, "config": a.config, "overrides": a.overrides, "modes": {}}
    for name, cfg in mode_configs(a, seed).items():
        print(f"[tppo_vs_ppo] seed {seed}: {name} (window {cfg.rollout.window_tokens}, refill {cfg.rollout.refill})",
              flush=True)
        shutil.rmtree(cfg.logging.output_dir, ignore_errors=True)  # a fresh run: no old events mixed in
        t0 = time.time()
        run(cfg)
        out["modes"][name] = summarize(name, cfg, scalars(Path(cfg.logging.output_dir) / "tensorboard"),
                                       time.time() - t0, a.target_delta)
        out["modes"][name]["final_eval"] = final_eval(cfg, a)
    return out


def table(res: dict) -> str:
    head = (f"{'mode':<16}{'window':>7}{'steps':>6}{'train s':>8}{'eval s':>7}{'acc0':>7}{'final':>7}{'best':>7}"
            f"{'s->tgt':>8}{'gen%':>6}{'val%':>6}{'trn%':>6}{'syn%':>6}{'util':>6}{'tok/s':>7}{'s/1k':>7}{'gen/1k':>7}")
    lines = [f"seed {res['seed']}, training budget {res['budget_s']:g} s per mode (evaluation excluded)", head,
             "-" * len(head)]
    for x in res["modes"].values():
        reach = f"{x['time_to_target_s']:.0f}" if x["time_to_target_s"] is not None else "never"
        sh = x["phase_share"]
        lines.append(f"{x['mode']:<16}{x['window_tokens']:>7}{x['steps']:>6}{x['train_s']:>8.0f}{x['eval_s']:>7.0f}"
                     f"{x['start_accuracy']:>7.3f}{x['final_accuracy']:>7.3f}{x['best_accuracy']:>7.3f}{reach:>8}"
                     + "".join(f"{100 * sh[k]:>6.0f}" for k in PHASES)
                     + f"{x['slot_utilization']:>6.2f}{x['generated_tokens_per_s']:>7.0f}"
                     f"{x['step_s_per_1000_finished']:>7.0f}{x['generate_s_per_1000_finished']:>7.0f}")
    for x in res["modes"].values():
        fe = x.get("final_eval")
        if fe:
            lines.append(f"{x['mode']}: final model on {fe['num_prompts']} prompts x {fe['samples_per_prompt']}: "
                         f"pass@1 {fe['accuracy']:.3f} +- {fe['accuracy_se']:.3f}, mean length "
                         f"{fe['response_length_mean']:.0f}")
    m = res["modes"]
    for a_, b_ in (("ppo", "tppo"), ("tppo", "tppo_continuous"), ("ppo", "tppo_continuous")):
        if a_ in m and b_ in m and m[a_]["time_to_target_s"] and m[b_]["time_to_target_s"]:
            lines.append(f"time to target {a_} / {b_}: {m[a_]['time_to_target_s'] / m[b_]['time_to_target_s']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="examples/longtail_cpu.yaml")
    p.add_argument("--budget-s", type=float, default=600.0, help="training-loop wall-clock budget of each mode")
    p.add_argument("--seed", type=int, default=None, help="one seed (default: the config's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds in one invocation")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--eval-every-s", type=float, default=80.0,
                   help="training seconds between evaluations (the same for every mode)")
    p.add_argument("--target-delta", type=float, default=0.05, help="target = start accuracy + this")
    p.add_argument("--final-eval-prompts", type=int, default=256,
                   help="held-out prompts for scoring each mode's final model (0: skip)")
    p.add_argument("--final-eval-samples", type=int, default=4, help="samples per prompt for that score")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tppo_vs_ppo.json"))
    p.add_argument("--run-dir", default="runs/bench_tppo_vs_ppo")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    seeds = a.seeds or [a.seed if a.seed is not None else load_config(a.config, a.overrides).seed]
    from megatron_tppo.console import start_run_logs

    log_dir = start_run_logs(a.run_dir)
    print(f"[tppo_vs_ppo] library output (megatron-core, vLLM, Ray workers): {log_dir.resolve()}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from plot_png import line_chart

    results = []
    for seed in seeds:
        res = run_seed(a, seed)
        results.append(res)
        path = out if len(seeds) == 1 else out.with_name(f"{out.stem}_seed{seed}{out.suffix}")
        path.write_text(json.dumps(res, indent=1) + "\n")
        line_chart(path.with_suffix(".png"), {k: v["accuracy_curve"] for k, v in res["modes"].items()},
                   f"held-out accuracy vs training seconds (seed {seed}, budget {a.budget_s:g} s, eval excluded)",
                   "training wall-clock s", "accuracy")
        print("\n" + table(res) + f"\nwrote {path} and {path.with_suffix('.png')}", flush=True)
    if len(seeds) > 1:  # the file: the first seed's record at the top, every seed under "seeds"
        combined = {**results[0], "seeds": {str(r["seed"]): r for r in results}}
        out.write_text(json.dumps(combined, indent=1) + "\n")
        line_chart(out.with_suffix(".png"), {f"{k} s{r['seed']}": v["accuracy_curve"]
                                             for r in results for k, v in r["modes"].items()},
                   f"held-out accuracy vs training seconds (seeds {' '.join(map(str, seeds))}, budget "
                   f"{a.budget_s:g} s, eval excluded)", "training wall-clock s", "accuracy")
        print(f"wrote {out} and {out.with_suffix('.png')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
