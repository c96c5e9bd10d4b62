"""T-PPO vs PPO from the same start and seed, side by side in one run (TPPO.md section 5).

Runs the full system twice on the same config, once with the configured window (T-PPO) and once
with the window set to the maximum response length (synchronous PPO), each for the same wall-clock
budget, and reports: wall-clock to reach a target held-out accuracy, generated tokens/s, slot
utilization during generation, and final accuracy. Prints a table and writes
benchmarks/results/tppo_vs_ppo.json.

    .venv/bin/python benchmarks/tppo_vs_ppo.py [--config examples/tiny_cpu.yaml] [--steps-tppo 40]
        [--target 0.5] [key.sub=value ...]

Both modes use the same number of slots; PPO's step makes every slot wait for the longest
response, T-PPO's step is one window. Steps differ in length, so PPO gets proportionally fewer
steps (``steps_ppo = steps_tppo * window / max_response``, at least 1) for a comparable budget.
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

    return {
        "mode": name, "window": cfg.rollout.window_tokens, "steps": cfg.steps, "wall_s": total,
        "accuracy_start": acc[0][2] if acc else float("nan"), "accuracy_final": acc[-1][2] if acc else float("nan"),
        "best_accuracy": max((v for _, _, v in acc), default=float("nan")),
        "s_to_target": reach, "generated_tokens_per_s": mean("perf/generated_tokens_per_s"),
        "slot_utilization": mean("rollout/slot_utilization"), "step_s": mean("perf/step_s"),
        "final_reward": final.get("train/reward_mean", float("nan")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="examples/tiny_cpu.yaml")
    p.add_argument("--steps-tppo", type=int, default=None, help="T-PPO steps (default: the config's steps)")
    p.add_argument("--target", type=float, default=None, help="held-out accuracy target (default: start + 0.05)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "tppo_vs_ppo.json"))
    p.add_argument("--run-dir", default="runs/bench_tppo_vs_ppo")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()

    base = load_config(a.config, a.overrides)
    steps = a.steps_tppo or base.steps
    r = base.rollout
    ppo_steps = max(1, math.ceil(steps * r.window_tokens / r.max_response_tokens))
    eval_every_tppo = max(1, steps // 4)
    tppo = load_config(a.config, a.overrides + [f"steps={steps}", f"logging.output_dir={a.run_dir}/tppo",
                                                f"data.eval_every={eval_every_tppo}", "logging.progress_bar=false"])
    ppo = load_config(a.config, a.overrides + [f"steps={ppo_steps}", f"logging.output_dir={a.run_dir}/ppo",
                                               f"rollout.window_tokens={r.max_response_tokens}",
                                               f"data.eval_every={max(1, ppo_steps // 4)}", "logging.progress_bar=false",
                                               f"algorithm.truncated_tail_ignore={base.algorithm.truncated_tail_ignore}"])
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
    print(f"\ntarget held-out accuracy {target:.3f}\n{head}\n{'-' * len(head)}")
    for x in rows:
        reach = f"{x['s_to_target']:.0f}" if x["s_to_target"] is not None else "never"
        print(f"{x['mode']:<6}{x['window']:>7}{x['steps']:>6}{x['wall_s']:>8.0f}{x['accuracy_start']:>7.3f}"
              f"{x['accuracy_final']:>8.3f}{x['best_accuracy']:>7.3f}{reach:>10}{x['generated_tokens_per_s']:>10.0f}"
              f"{x['slot_utilization']:>10.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"target": target, "rows": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
