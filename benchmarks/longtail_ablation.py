"""One change at a time against a config, on the same seed and sample budget: what holds learning back.

    .venv/bin/python benchmarks/longtail_ablation.py [--config examples/longtail_cpu.yaml] [--steps 16]
        [--mode tppo|ppo|tppo_continuous] [--only NAME ...] [--prompts 256 --samples 4] [key=value ...]

Every variant starts from the same SFT model and value-pretrained critic, with the same seed, and
trains the same number of steps in one mode (``tppo``: the config's window, window refill; ``ppo``:
window = cap; ``tppo_continuous``), so each sees about as many generated tokens: a per-sample
budget, not a clock one, so that a noisy machine cannot favour one side. Each final policy (the
run's last checkpoint) is scored by the one evaluator (``python -m megatron_tppo.evaluate``) on the
same held-out prompts and samples, beside the start model scored the same way. Periodic
evaluations are off (the final score is the measurement).

Per variant: its overrides, pass@1 with the bootstrap SE over prompts, the change against the
start, accuracy by length bucket, mean response length, finished responses, generated tokens,
training seconds and the mean of a few step metrics (critic explained variance, the policy's
positive-token share, clip fraction). Writes benchmarks/results/longtail_ablation.json and prints
a table. ``--only`` runs a subset (the baseline is always run unless ``--no-baseline``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from megatron_tppo.config_io import load_config  # noqa: E402

VARIANTS = {
    "baseline": [],
    "positive_lm_0.1": ["algorithm.positive_lm_coef=0.1"],
    "positive_lm_0": ["algorithm.positive_lm_coef=0.0"],
    "lambda_min_1.0": ["algorithm.policy_lambda_min=1.0"],
    "lambda_alpha_1.0": ["algorithm.policy_lambda_alpha=1.0"],
    "whiten_std": ["algorithm.advantage_whiten=std"],
    "bootstrap_exact": ["algorithm.truncation_bootstrap=exact"],
    "prompts_x2": ["rollout.samples_per_prompt=4"],
    "tail_ignore_0": ["algorithm.truncated_tail_ignore=0"],
}
MODE = {"ppo": lambda c: [f"rollout.window_tokens={c.rollout.max_response_tokens}", "rollout.refill=window"],
        "tppo": lambda c: ["rollout.refill=window"], "tppo_continuous": lambda c: ["rollout.refill=continuous"]}
STEP_METRICS = ("critic/explained_variance", "policy/clip_fraction", "rollout/response_length_mean")


def evaluate(args: list[str], out: Path) -> dict:
    import os
    import subprocess

    cmd = [sys.executable, "-m", "megatron_tppo.evaluate", *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"evaluation {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    rep = json.loads(out.read_text())
    return {k: rep[k] for k in ("accuracy", "accuracy_se", "response_length_mean", "num_prompts",
                                "samples_per_prompt", "buckets")}


def run_variant(a, name: str, extra: list[str]) -> dict:
    from megatron_tppo.train import run
    from tppo_vs_ppo import scalars

    base = load_config(a.config, a.overrides)
    out_dir = Path(a.run_dir) / name
    cfg = load_config(a.config, a.overrides + MODE[a.mode](base) + extra + [
        f"seed={a.seed}", f"steps={a.steps}", "data.eval_every=0", "logging.progress_bar=false",
        f"logging.output_dir={out_dir}"])
    shutil.rmtree(out_dir, ignore_errors=True)
    print(f"[ablation] {name}: {' '.join(extra) or '(the config)'}", flush=True)
    t0 = time.time()
    run(cfg)
    wall = time.time() - t0
    tags = scalars(out_dir / "tensorboard")
    steps = sorted(tags.get("perf/step_s", {}))

    def total(tag):
        return sum(tags.get(tag, {}).get(s, 0.0) for s in steps)

    def mean(tag):
        vals = [tags[tag][s] for s in steps if s in tags.get(tag, {})]
        return sum(vals) / len(vals) if vals else None

    from megatron_tppo.config_io import dump_yaml

    (out_dir / "eval_config.yaml").write_text(dump_yaml(cfg))
    final = evaluate(["--config", str(out_dir / "eval_config.yaml"), "--checkpoint", str(out_dir),
                      "--prompts", str(a.prompts), "--samples", str(a.samples)], out_dir / "final_eval.json")
    return {"overrides": extra, "steps": len(steps), "train_s": total("perf/step_s"), "wall_s": wall,
            "finished_responses": total("rollout/finished_count"), "generated_tokens": total("rollout/generated_tokens"),
            "step_means": {t: mean(t) for t in STEP_METRICS}, "final_eval": final}


def table(res: dict) -> str:
    start = res["start_eval"]
    head = f"{'variant':<18}{'pass@1':>8}{'+-SE':>7}{'delta':>8}{'len':>6}{'resp':>6}{'tokens':>8}{'EV':>7}{'train s':>8}"
    lines = [f"{res['mode']} mode, seed {res['seed']}, {res['steps']} steps each; start model "
             f"{start['accuracy']:.3f} +- {start['accuracy_se']:.3f} (len {start['response_length_mean']:.0f}) on "
             f"{start['num_prompts']} prompts x {start['samples_per_prompt']}", head, "-" * len(head)]
    for name, v in res["variants"].items():
        fe, ev = v["final_eval"], v["step_means"].get("critic/explained_variance")
        lines.append(f"{name:<18}{fe['accuracy']:>8.3f}{fe['accuracy_se']:>7.3f}{fe['accuracy'] - start['accuracy']:>+8.3f}"
                     f"{fe['response_length_mean']:>6.0f}{v['finished_responses']:>6.0f}{v['generated_tokens']:>8.0f}"
                     f"{(ev if ev is not None else float('nan')):>7.2f}{v['train_s']:>8.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="examples/longtail_cpu.yaml")
    p.add_argument("--mode", default="tppo", choices=sorted(MODE))
    p.add_argument("--steps", type=int, default=16, help="training steps of every variant")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--prompts", type=int, default=256, help="held-out prompts of the final score")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt of the final score")
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=None)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "longtail_ablation.json"))
    p.add_argument("--run-dir", default="runs/bench_longtail_ablation")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    names = a.only or list(VARIANTS)
    if not a.no_baseline and "baseline" not in names:
        names = ["baseline", *names]
    from megatron_tppo.console import start_run_logs

    print(f"[ablation] library output: {start_run_logs(a.run_dir).resolve()}", flush=True)
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    same = (res.get("config"), res.get("mode"), res.get("seed"), res.get("steps"), res.get("overrides")) == \
        (a.config, a.mode, a.seed, a.steps, a.overrides)
    if not same:  # a different setting: start a fresh table
        res = {"config": a.config, "mode": a.mode, "seed": a.seed, "steps": a.steps, "overrides": a.overrides,
               "variants": {}}
    cfg = load_config(a.config, a.overrides)
    Path(a.run_dir).mkdir(parents=True, exist_ok=True)
    res["start_eval"] = evaluate(["--config", a.config, "--model", cfg.model.hf_path, "--prompts", str(a.prompts),
                                  "--samples", str(a.samples), *a.overrides], Path(a.run_dir) / "start_eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        res["variants"][name] = run_variant(a, name, VARIANTS[name])
        out.write_text(json.dumps(res, indent=1) + "\n")  # after every variant: a stopped run keeps its rows
        print(table(res), flush=True)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
