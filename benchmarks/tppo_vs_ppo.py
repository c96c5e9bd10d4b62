"""T-PPO vs PPO from the same start and seed, side by side in one run (TPPO.md section 5).

Runs the full system twice on the same config, once with the configured window (T-PPO) and once
with the window set to the maximum response length (synchronous PPO), each for the SAME
wall-clock budget (``time_budget_s``: the training loop stops after the step during which it runs
out, then evaluates), and reports: wall-clock to reach a target held-out accuracy, generated
tokens/s, slot utilization during generation, and final accuracy. Prints a table and writes
benchmarks/results/tppo_vs_ppo.json.

    .venv/bin/python benchmarks/tppo_vs_ppo.py [--config examples/tiny_cpu.yaml] [--budget-s 420]
        [--target 0.5] [key.sub=value ...]

Both modes use the same number of slots and the same held-out set. A PPO step generates whole
responses (every slot waits for the longest), a T-PPO step one window, so PPO evaluates every
``ceil(eval_every * window / max_response)`` steps to evaluate about as often in wall-clock time,
and its critic warm-up is scaled the same way; evaluation time counts against both budgets alike.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from megatron_tppo.config_io import load_config


def wall_series(log_dir: Path, tag: str) -> list[tuple[float, int, float]]:
    """(wall_time, step, value) of a scalar, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.wall_time, e.step, e.value) for e in acc.Scalars(tag)]


def run_mode(name: str, cfg, target: float) -> dict:
    from megatron_tppo.train import run

    t0 = time.time()
    final = run(cfg)
    total = time.time() - t0
    tb = Path(cfg.logging.output_dir) / "tensorboard"
    acc = wall_series(tb, "eval/accuracy")
    start = acc[0][0] if acc else t0
    reach = next((w - start for w, _, v in acc if v >= target), None)

    def mean(tag: str) -> float:
        vals = [v for _, _, v in wall_series(tb, tag)]
        return sum(vals) / len(vals) if vals else float("nan")

    steps = max((s for _, s, _ in wall_series(tb, "perf/step_s")), default=0)
    return {
        "mode": name, "window": cfg.rollout.window_tokens, "steps": steps, "budget_s": cfg.time_budget_s,
        "wall_s": total,
        "accuracy_start": acc[0][2] if acc else float("nan"), "accuracy_final": acc[-1][2] if acc else float("nan"),
        "best_accuracy": max((v for _, _, v in acc), default=float("nan")),
        "s_to_target": reach, "generated_tokens_per_s": mean("perf/generated_tokens_per_s"),
        "slot_utilization": mean("rollout/slot_utilization"), "step_s": mean("perf/step_s"),
        "final_reward": final.get("train/reward_mean", float("nan")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="examples/tiny_cpu.yaml")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of each mode's training loop")
    p.add_argument("--eval-every", type=int, default=8, help="T-PPO steps between evaluations")
    p.add_argument("--target", type=float, default=None, help="held-out accuracy target (default: start + 0.05)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "tppo_vs_ppo.json"))
    p.add_argument("--run-dir", default="runs/bench_tppo_vs_ppo")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()

    base = load_config(a.config, a.overrides)
    r = base.rollout

    def scaled(n: int) -> int:  # T-PPO steps -> PPO steps covering about the same generation time
        return math.ceil(n * r.window_tokens / r.max_response_tokens)

    common = [f"time_budget_s={a.budget_s}", "steps=100000", "logging.progress_bar=false"]
    tppo = load_config(a.config, a.overrides + common + [f"logging.output_dir={a.run_dir}/tppo",
                                                         f"data.eval_every={a.eval_every}"])
    ppo = load_config(a.config, a.overrides + common + [
        f"logging.output_dir={a.run_dir}/ppo", f"rollout.window_tokens={r.max_response_tokens}",
        f"data.eval_every={max(1, scaled(a.eval_every))}",
        f"algorithm.critic_warmup_steps={scaled(base.algorithm.critic_warmup_steps)}"])
    rows = []
    target = a.target
    for name, cfg in (("tppo", tppo), ("ppo", ppo)):
        row = run_mode(name, cfg, target if target is not None else float("inf"))
        if target is None:
            target = row["accuracy_start"] + 0.05
            acc = wall_series(Path(cfg.logging.output_dir) / "tensorboard", "eval/accuracy")
            row["s_to_target"] = next((w - acc[0][0] for w, _, v in acc if v >= target), None) if acc else None
        rows.append(row)
    head = f"{'mode':<6}{'window':>7}{'steps':>6}{'wall s':>8}{'acc0':>7}{'acc end':>8}{'best':>7}" \
           f"{'s->target':>10}{'gen tok/s':>10}{'slot util':>10}"
    print(f"\nsame wall-clock budget {a.budget_s:g} s per mode; target held-out accuracy {target:.3f}\n"
          f"{head}\n{'-' * len(head)}")
    for x in rows:
        reach = f"{x['s_to_target']:.0f}" if x["s_to_target"] is not None else "never"
        print(f"{x['mode']:<6}{x['window']:>7}{x['steps']:>6}{x['wall_s']:>8.0f}{x['accuracy_start']:>7.3f}"
              f"{x['accuracy_final']:>8.3f}{x['best_accuracy']:>7.3f}{reach:>10}{x['generated_tokens_per_s']:>10.0f}"
              f"{x['slot_utilization']:>10.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"target": target, "budget_s": a.budget_s, "rows": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
