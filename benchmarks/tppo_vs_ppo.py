"""PPO vs T-PPO (window refill) vs T-PPO (continuous refill), one after another in one run.

The same config, start model, seed and held-out set for every mode; each mode's training loop gets
the same wall-clock budget (``time_budget_s`` with ``time_budget_excludes_eval=true``: the held-out
evaluations do not count against it and are recorded separately as ``eval_s``).

    .venv/bin/python benchmarks/tppo_vs_ppo.py [--config examples/longtail_cpu.yaml] [--budget-s 600]
        [--seeds 1234 1235] [--modes ppo tppo tppo_continuous] [--recipe examples/qwen2.5_32b/tppo.yaml]
        [--project-nodes 4 16] [key.sub=value ...]

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
of ``perf/step_s``, to the first evaluation at or above start + 0.05; null if never),
``responses_to_target`` and ``tokens_to_target`` (the finished responses, ``rollout/finished_count``,
and the generated tokens, ``rollout/generated_tokens``, summed up to the end of that same step; null
if never), the phase split (generate, values, train, sync), slot utilization, generated tokens/s
over whole steps (generated tokens / step seconds), evaluation seconds, wall seconds,
``accuracy_curve`` [(training s, accuracy)] and ``accuracy_by_responses`` [(finished responses,
accuracy)], one point per periodic evaluation each.

Per seed record: ``measured_ratios`` (``time_to_target_s`` and ``responses_to_target``, each with
``ppo/tppo``, ``ppo/tppo_continuous``, ``tppo/tppo_continuous``; null where undefined) and
``projection_32b``, the 32B projected clock: a mode's ``responses_to_target`` x the seconds per
finished response that ``python -m megatron_tppo.plan --compare-modes`` projects for it on
``--recipe`` (in-process, :func:`megatron_tppo.planning.projection.compare_modes`), per
``--project-nodes`` count under ``nodes``: ``s_per_finished_response``, ``projected_s_to_target``,
``ratios``, the ``inputs`` (each mode's step costs and steady-state step), ``gpus``, ``layout`` and
``layout_overrides``, and ``if_resident`` (the same with every slot decoding at once, plan's second
table); the length distribution, windows, refill and slots beside them. The projected clock takes
the CPU run's sample efficiency (responses to target) for the 32B one's: it assumes the 32B run
needs as many finished responses to reach its target as this one does.

Writes benchmarks/results/tppo_vs_ppo.json (``--seeds`` with more than one seed:
tppo_vs_ppo_seed<N>.json each, same schema, and the combined file with every seed under ``seeds``
and a ``summary``: per mode the mean over seeds of responses/tokens/seconds to target, null unless
every seed reached it, the ratios of those means and their ``projection_32b``; its ``aggregation``
says so) and, beside each JSON, a PNG of held-out accuracy against training seconds and
``<stem>_responses.png`` against finished responses.

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
import copy
import dataclasses
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
    fin, gen = tags.get("rollout/finished_count", {}), tags.get("rollout/generated_tokens", {})
    steps = sorted(step_s)
    # training seconds, finished responses and generated tokens at the end of each step
    clock, done, made, t, n, g = {0: 0.0}, {0: 0.0}, {0: 0.0}, 0.0, 0.0, 0.0
    for s in steps:
        t, n, g = t + step_s[s], n + fin.get(s, 0.0), g + gen.get(s, 0.0)
        clock[s], done[s], made[s] = t, n, g
    acc = sorted(tags.get("eval/accuracy", {}).items())
    se = tags.get("eval/accuracy_se", {})
    curve = [(clock.get(s, t), v) for s, v in acc]
    start = acc[0][1] if acc else float("nan")
    target = start + target_delta
    hit = next((s for s, v in acc if v >= target), None)  # the step of the first evaluation at the target
    reach = None if hit is None else clock.get(hit, t)
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
        "time_to_target_s": reach, "responses_to_target": None if hit is None else done.get(hit, n),
        "tokens_to_target": None if hit is None else made.get(hit, g),
        "train_s": total, "eval_s": sum(tags.get("perf/eval_s", {}).values()), "wall_s": wall_s,
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
        "accuracy_by_responses": [(done.get(s, n), v) for s, v in acc],
    }


PAIRS = (("ppo", "tppo"), ("ppo", "tppo_continuous"), ("tppo", "tppo_continuous"))
SIGMA = 1.0  # compare_modes' default (plan --compare-modes passes none)


def ratios(values: dict) -> dict:
    """{"ppo/tppo": ppo / tppo, ...}; null where a side is missing, null, or the divisor is 0."""
    def div(a, b):
        x, y = values.get(a), values.get(b)
        return x / y if x is not None and y else None
    return {f"{a}/{b}": div(a, b) for a, b in PAIRS}


def _layout(cfg) -> dict:
    p, c, r = cfg.parallel.policy, cfg.parallel.critic, cfg.rollout
    return {"trainers": cfg.parallel.trainers, "colocate": r.colocate,
            "policy_tp_pp_dp": [p.tensor_parallel, p.pipeline_parallel, p.data_parallel],
            "critic_tp_pp_dp": [c.tensor_parallel, c.pipeline_parallel, c.data_parallel],
            "engines": r.num_engines, "engine_tp": r.tensor_parallel}


def recipe_projection(recipe: str, nodes_list=(4, 16), gpus_per_node: int = 8) -> dict:
    """The recipe's seconds per finished response per mode and node count, with their inputs: what
    ``plan --compare-modes`` prints (:func:`~megatron_tppo.planning.projection.compare_modes`, its
    first table, and with ``resident=True`` its second, as ``if_resident``), at full precision. The
    inputs are read with the functions compare_modes uses (``lognormal_lengths`` at its defaults,
    ``costs_from_plan``; ``fill_layout`` for the layout). No measured numbers yet."""
    from megatron_tppo.planning.plan import fill_layout
    from megatron_tppo.planning.projection import compare_modes, costs_from_plan, lognormal_lengths, mean

    cfg = load_config(recipe)
    r = cfg.rollout
    median = r.max_response_tokens / 8  # compare_modes' default
    dist = lognormal_lengths(median, SIGMA, r.max_response_tokens)
    windows = {"ppo": r.max_response_tokens, "tppo": r.window_tokens, "tppo_continuous": r.window_tokens}
    out = {"recipe": str(recipe), "function": "megatron_tppo.planning.projection.compare_modes",
           "figure": "per node count: the plan's KV-bound decode batch (plan --compare-modes, first table); "
                     "its if_resident: every slot decoding at once (the second table)",
           "gpus_per_node": gpus_per_node,
           "length_distribution": {"kind": "lognormal", "median": median, "sigma": SIGMA,
                                   "cap": r.max_response_tokens, "mean": mean(dist), "bins": len(dist)},
           "num_slots": r.num_slots, "window_tokens": windows,
           "refill": {"ppo": "window", "tppo": "window", "tppo_continuous": "continuous"},
           "nodes": {}}
    for resident in (False, True):
        for nodes, projs in compare_modes(cfg, nodes_list, resident=resident):
            filled = copy.deepcopy(cfg)
            overrides = fill_layout(filled, nodes * gpus_per_node)
            block = out["nodes"].setdefault(str(nodes), {"gpus": nodes * gpus_per_node, "layout": _layout(filled),
                                                         "layout_overrides": overrides})
            costs = {w: dataclasses.asdict(costs_from_plan(cfg, nodes, dist, gpus_per_node,
                                                           window=None if w == r.window_tokens else w,
                                                           resident=resident))
                     for w in set(windows.values())}
            (block.setdefault("if_resident", {}) if resident else block).update({
                "s_per_finished_response": {p.mode: p.s_per_1000 / 1000 for p in projs},
                "inputs": {p.mode: {"step_costs": costs[windows[p.mode]],
                                    "step": {**dataclasses.asdict(p), "step_s": p.step_s}} for p in projs}})
    return out


def projection_block(proj: dict, responses_to_target: dict) -> dict:
    """``proj`` (:func:`recipe_projection`) with, per node count (and in its ``if_resident``), the projected
    seconds to target = responses to target x seconds per finished response (null for a mode that
    never reached it), and their ratios."""
    out = copy.deepcopy(proj)
    out["responses_to_target"] = {m: responses_to_target.get(m) for m in MODES}
    for block in out["nodes"].values():
        for v in (block, block["if_resident"]):
            v["projected_s_to_target"] = {m: None if responses_to_target.get(m) is None
                                          else responses_to_target[m] * v["s_per_finished_response"][m] for m in MODES}
            v["ratios"] = ratios(v["projected_s_to_target"])
    return out


def measured_ratios(modes: dict) -> dict:
    """This machine's ratios of training seconds and of finished responses to the target."""
    return {k: ratios({m: x.get(k) for m, x in modes.items()}) for k in ("time_to_target_s", "responses_to_target")}


def seeds_summary(results: list[dict], proj: dict) -> dict:
    """Per mode, the mean over seeds of the *_to_target figures (null unless every seed reached the
    target), the ratios of those means, and the 32B projection of the mean responses."""
    modes = {}
    for m in MODES:
        recs = [r["modes"][m] for r in results if m in r["modes"]]
        if not recs:
            continue
        reached = [x for x in recs if x["responses_to_target"] is not None]
        modes[m] = {"seeds": len(recs), "seeds_reached": len(reached)}
        for k in ("responses_to_target", "tokens_to_target", "time_to_target_s"):
            modes[m][k] = sum(x[k] for x in recs) / len(recs) if len(reached) == len(recs) else None
    return {"aggregation": "mean over seeds, per mode; null unless every seed reached the target; the ratios "
                           "and the projection are of these means",
            "seeds": [r["seed"] for r in results], "modes": modes, "measured_ratios": measured_ratios(modes),
            "projection_32b": projection_block(proj, {m: x["responses_to_target"] for m, x in modes.items()})}


def _x(v, fmt=".2f", suffix="x"):
    return "-" if v is None else f"{v:{fmt}}{suffix}"


def report_lines(measured: dict, proj: dict) -> list[str]:
    """A few console lines: the measured ratios, then the projected clock per node count."""
    out = ["measured here:  " + "; ".join(
        f"{what} " + ", ".join(f"{k} {_x(v)}" for k, v in measured[key].items())
        for what, key in (("train s to target", "time_to_target_s"), ("responses to target", "responses_to_target")))]
    rt = proj["responses_to_target"]
    out.append(f"32B projection ({proj['recipe']}, plan --compare-modes; KV-bound batch, resident in brackets): "
               "responses to target " + ", ".join(f"{m} {_x(rt[m], '.0f', '')}" for m in MODES))
    for nodes, b in proj["nodes"].items():
        res = b["if_resident"]["ratios"]
        out.append(f"  {nodes:>2} nodes ({b['gpus']} GPUs): s/response " + " ".join(
            f"{m} {b['s_per_finished_response'][m]:.3f}" for m in MODES)
            + "; s to target " + " ".join(f"{m} {_x(b['projected_s_to_target'][m], '.0f', '')}" for m in MODES)
            + "; " + " ".join(f"{k} {_x(v)} [{_x(res[k])}]" for k, v in b["ratios"].items()))
    return out


def charts(path, by_time: dict, by_responses: dict, what: str) -> list:
    """<path stem>.png: accuracy vs training seconds; <path stem>_responses.png: vs finished responses."""
    from plot_png import line_chart

    png, rpng = path.with_suffix(".png"), path.with_name(f"{path.stem}_responses.png")
    line_chart(png, by_time, f"held-out accuracy vs training seconds ({what}, eval excluded)",
               "training wall-clock s", "accuracy")
    line_chart(rpng, by_responses, f"held-out accuracy vs finished responses ({what})",
               "finished responses (cumulative)", "accuracy")
    return [png, rpng]


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


def run_seed(a, seed: int, proj: dict) -> dict:
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
    out["measured_ratios"] = measured_ratios(out["modes"])
    out["projection_32b"] = projection_block(proj, {k: v["responses_to_target"] for k, v in out["modes"].items()})
    return out


def table(res: dict) -> str:
    head = (f"{'mode':<16}{'window':>7}{'steps':>6}{'train s':>8}{'eval s':>7}{'acc0':>7}{'final':>7}{'best':>7}"
            f"{'s->tgt':>8}{'rsp->tgt':>9}{'gen%':>6}{'val%':>6}{'trn%':>6}{'syn%':>6}{'util':>6}{'tok/s':>7}{'s/1k':>7}{'gen/1k':>7}")
    lines = [f"seed {res['seed']}, training budget {res['budget_s']:g} s per mode (evaluation excluded)", head,
             "-" * len(head)]
    for x in res["modes"].values():
        reach = f"{x['time_to_target_s']:.0f}" if x["time_to_target_s"] is not None else "never"
        rsp = f"{x['responses_to_target']:.0f}" if x["responses_to_target"] is not None else "never"
        sh = x["phase_share"]
        lines.append(f"{x['mode']:<16}{x['window_tokens']:>7}{x['steps']:>6}{x['train_s']:>8.0f}{x['eval_s']:>7.0f}"
                     f"{x['start_accuracy']:>7.3f}{x['final_accuracy']:>7.3f}{x['best_accuracy']:>7.3f}{reach:>8}{rsp:>9}"
                     + "".join(f"{100 * sh[k]:>6.0f}" for k in PHASES)
                     + f"{x['slot_utilization']:>6.2f}{x['generated_tokens_per_s']:>7.0f}"
                     f"{x['step_s_per_1000_finished']:>7.0f}{x['generate_s_per_1000_finished']:>7.0f}")
    for x in res["modes"].values():
        fe = x.get("final_eval")
        if fe:
            lines.append(f"{x['mode']}: final model on {fe['num_prompts']} prompts x {fe['samples_per_prompt']}: "
                         f"pass@1 {fe['accuracy']:.3f} +- {fe['accuracy_se']:.3f}, mean length "
                         f"{fe['response_length_mean']:.0f}")
    return "\n".join(lines + report_lines(res["measured_ratios"], res["projection_32b"]))


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
    p.add_argument("--recipe", default="examples/qwen2.5_32b/tppo.yaml",
                   help="the recipe whose plan --compare-modes projection gives the 32B seconds per finished response")
    p.add_argument("--project-nodes", type=int, nargs="+", default=[4, 16], help="node counts of that projection")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    seeds = a.seeds or [a.seed if a.seed is not None else load_config(a.config, a.overrides).seed]
    from megatron_tppo.console import start_run_logs

    log_dir = start_run_logs(a.run_dir)
    print(f"[tppo_vs_ppo] library output (megatron-core, vLLM, Ray workers): {log_dir.resolve()}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the 32B projection first: a recipe it cannot plan fails before any training
    proj = recipe_projection(a.recipe, a.project_nodes)
    results = []
    for seed in seeds:
        res = run_seed(a, seed, proj)
        results.append(res)
        path = out if len(seeds) == 1 else out.with_name(f"{out.stem}_seed{seed}{out.suffix}")
        path.write_text(json.dumps(res, indent=1) + "\n")
        pngs = charts(path, {k: v["accuracy_curve"] for k, v in res["modes"].items()},
                      {k: v["accuracy_by_responses"] for k, v in res["modes"].items()},
                      f"seed {seed}, budget {a.budget_s:g} s")
        print("\n" + table(res) + f"\nwrote {path}, " + " and ".join(map(str, pngs)), flush=True)
    if len(seeds) > 1:  # the file: the first seed's record at the top, every seed under "seeds"
        combined = {**results[0], "seeds": {str(r["seed"]): r for r in results},
                    "summary": seeds_summary(results, proj)}
        out.write_text(json.dumps(combined, indent=1) + "\n")
        pngs = charts(out, {f"{k} s{r['seed']}": v["accuracy_curve"] for r in results for k, v in r["modes"].items()},
                      {f"{k} s{r['seed']}": v["accuracy_by_responses"] for r in results for k, v in r["modes"].items()},
                      f"seeds {' '.join(map(str, seeds))}, budget {a.budget_s:g} s")
        sm = combined["summary"]
        print("\nmean over seeds (null unless every seed reached the target):\n"
              + "\n".join(report_lines(sm["measured_ratios"], sm["projection_32b"])), flush=True)
        print(f"wrote {out}, " + " and ".join(map(str, pngs)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
