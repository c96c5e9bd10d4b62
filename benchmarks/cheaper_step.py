"""The embedded default's step, before and after the cheaper-step changes, side by side.

    .venv/bin/python benchmarks/cheaper_step.py [--budget-s 420] [--seed 1234] [key.sub=value ...]

Both runs: ``examples/tiny_cpu.yaml`` (``make run``'s config), the same SFT start model
(``.cache/tiny_sft``), seed, held-out evaluation (64 prompts x 4 samples, every ``data.eval_every``
steps, start and end included) and the same wall-clock budget, evaluations INCLUDED in it (as in
the TRL GRPO reference run; unlike benchmarks/tppo_vs_ppo.py).

* ``before``: the settings of the previous default: the critic starts from the SFT backbone with a
  fresh head, ``critic_warmup_steps=6`` policy-frozen steps, ``critic_epochs=4``.
* ``after``: today's default: the critic starts from the value-pretrained checkpoint
  (tools/pretrain_value.py, built once beside the SFT model, not counted in the budget, like the
  SFT build), no warm-up, one critic epoch per step.

Nothing else differs (policy learning rate, slots, windows, samples per prompt, evaluation).
Reports steps, seconds per step, generated tokens/s over whole steps, the phase split (generate,
values, train, sync, colocation) and the held-out accuracy start -> end (and best); writes
benchmarks/results/cheaper_step.json and a PNG of held-out accuracy against wall-clock seconds.
The TRL GRPO row is an earlier measurement (trl 1.16, same task and evaluation), quoted, not rerun.
The console shows the step lines, real problems and the table; the library output (megatron-core,
vLLM, Ray workers) goes to ``<run-dir>/logs/`` (:func:`megatron_tppo.console.start_run_logs`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from megatron_tppo.config_io import load_config  # noqa: E402

PHASES = {"generate": "perf/generate_s", "values": "perf/values_s", "train": "perf/train_s",
          "sync": "perf/weight_sync_s", "colocation": "perf/colocation_s"}
TRL_ISSUE_ROW = {"run": "TRL GRPO (earlier measurement, not rerun)", "steps": 101, "s_per_step": 3.7,
                 "generated_tokens_per_s": 754, "start_accuracy": 0.363, "final_accuracy": 0.512}
RUNS = {
    "before": ["algorithm.critic_warmup_steps=6", "algorithm.critic_epochs=4"],
    "after": ["checkpoint.load_critic={model}/value_critic"],
}


def summarize(name: str, tags: dict, wall_s: float) -> dict:
    step_s = tags.get("perf/step_s", {})
    steps = sorted(step_s)
    total = sum(step_s.values())

    def total_of(tag: str) -> float:
        return sum(tags.get(tag, {}).get(s, 0.0) for s in steps)

    # wall-clock of each evaluation: training seconds so far + evaluation seconds so far
    clock, t, evals = {}, 0.0, tags.get("perf/eval_s", {})
    for s in [0] + steps:
        t += step_s.get(s, 0.0) + evals.get(s, 0.0)
        clock[s] = t
    acc = sorted(tags.get("eval/accuracy", {}).items())
    gen = total_of("rollout/generated_tokens")
    policy_steps = sum(1 for s in steps if s in tags.get("policy/loss", {}))
    return {"run": name, "steps": len(steps), "policy_updates": policy_steps, "train_s": total,
            "eval_s": sum(evals.values()), "wall_s": wall_s, "s_per_step": total / max(len(steps), 1),
            "generated_tokens": gen, "generated_tokens_per_s": gen / total if total else float("nan"),
            "phase_s": {k: total_of(tag) for k, tag in PHASES.items()},
            "phase_share": {k: total_of(tag) / total if total else float("nan") for k, tag in PHASES.items()},
            "start_accuracy": acc[0][1] if acc else float("nan"),
            "final_accuracy": acc[-1][1] if acc else float("nan"),
            "best_accuracy": max((v for _, v in acc), default=float("nan")),
            "accuracy_curve": [(clock.get(s, t), v) for s, v in acc]}


def table(res: dict) -> str:
    head = (f"{'run':<32}{'steps':>6}{'s/step':>7}{'tok/s':>7}{'gen%':>6}{'val%':>6}{'trn%':>6}{'syn%':>6}"
            f"{'eval s':>7}{'start':>7}{'end':>7}{'gain':>7}{'best':>7}")
    lines = [f"seed {res['seed']}, {res['budget_s']:g} s per run, evaluations included", head, "-" * len(head)]
    for x in res["runs"].values():
        sh = x["phase_share"]
        lines.append(f"{x['run']:<32}{x['steps']:>6}{x['s_per_step']:>7.2f}{x['generated_tokens_per_s']:>7.0f}"
                     + "".join(f"{100 * sh[k]:>6.0f}" for k in ("generate", "values", "train", "sync"))
                     + f"{x['eval_s']:>7.0f}{x['start_accuracy']:>7.3f}{x['final_accuracy']:>7.3f}"
                     f"{x['final_accuracy'] - x['start_accuracy']:>+7.3f}{x['best_accuracy']:>7.3f}")
    t = TRL_ISSUE_ROW
    lines.append(f"{t['run']:<32}{t['steps']:>6}{t['s_per_step']:>7.2f}{t['generated_tokens_per_s']:>7.0f}"
                 + f"{'':>24}{'':>7}{t['start_accuracy']:>7.3f}{t['final_accuracy']:>7.3f}"
                 f"{t['final_accuracy'] - t['start_accuracy']:>+7.3f}")
    b, a = res["runs"].get("before"), res["runs"].get("after")
    if a and b:
        lines.append(f"whole-step generated tokens/s after / before: "
                     f"{a['generated_tokens_per_s'] / b['generated_tokens_per_s']:.2f}x (goal 3x); "
                     f"s/step before / after: {b['s_per_step'] / a['s_per_step']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    from megatron_tppo.train import run
    from tppo_vs_ppo import scalars

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="examples/tiny_cpu.yaml")
    p.add_argument("--model", default=".cache/tiny_sft", help="SFT model (with value_critic/ beside it)")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget per run, evaluations included")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cheaper_step.json"))
    p.add_argument("--run-dir", default="runs/bench_cheaper_step")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if not (Path(a.model) / "value_critic" / "tppo_value.json").is_file():
        raise SystemExit(f"{a.model}/value_critic: run tools/pretrain_value.py --model {a.model} first")
    seed = a.seed if a.seed is not None else load_config(a.config, a.overrides).seed
    from megatron_tppo.console import start_run_logs

    log_dir = start_run_logs(a.run_dir)
    print(f"[cheaper_step] library output (megatron-core, vLLM, Ray workers): {log_dir.resolve()}", flush=True)
    res = {"seed": seed, "budget_s": a.budget_s, "config": a.config, "overrides": a.overrides, "runs": {},
           "trl_grpo_from_issue": TRL_ISSUE_ROW}
    for name in a.runs:
        extra = [o.format(model=a.model) for o in RUNS[name]]
        cfg = load_config(a.config, a.overrides + [f"model.hf_path={a.model}", f"seed={seed}", "steps=100000",
                                                   f"time_budget_s={a.budget_s}", "time_budget_excludes_eval=false",
                                                   "logging.progress_bar=false", "logging.rollout_dump=false",
                                                   f"logging.output_dir={a.run_dir}/{name}"] + extra)
        print(f"[cheaper_step] {name}: {' '.join(extra)}", flush=True)
        t0 = time.time()
        run(cfg)
        res["runs"][name] = summarize(name, scalars(Path(cfg.logging.output_dir) / "tensorboard"), time.time() - t0)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    from plot_png import line_chart

    line_chart(out.with_suffix(".png"), {k: v["accuracy_curve"] for k, v in res["runs"].items()},
               f"held-out accuracy vs wall-clock s (make run config, seed {seed}, evaluations included)",
               "wall-clock s (training + evaluation)", "accuracy")
    print("\n" + table(res) + f"\nwrote {out} and {out.with_suffix('.png')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
