"""Entry point: ``python -m megatron_tppo.train --config FILE [key.sub=value ...]``.

Parses and validates the configuration before anything heavy is imported (a bad key or value
fails in well under a second, naming the field), writes the resolved config into the run
directory, then runs T-PPO: a Ray cluster (started locally or joined), the policy and critic
trainers (megatron-core), the rollout engine (vLLM), and the step loop of
:mod:`megatron_tppo.controller.loop`, logging to TensorBoard under ``<output_dir>/tensorboard``.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_tppo.config import ConfigError, TPPOConfig
from megatron_tppo.config_io import dump_yaml, help_text, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_tppo.train",
        description="Train a policy with Truncated PPO (T-PPO). Overrides: key.sub=value (see --help-config).",
    )
    p.add_argument("--config", help="YAML config file (examples/*.yaml); defaults apply when omitted")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest whole checkpoint of logging.output_dir (= checkpoint.resume=true)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type, default and doc")
    from megatron_tppo.plan import add_plan_args  # pure: with --dry-run --nodes K, print the layout plan too

    add_plan_args(p)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


def parse_config(argv: list[str] | None = None) -> tuple[TPPOConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    if args.help_config:
        print(help_text())
        raise SystemExit(0)
    return load_config(args.config, args.overrides + (["checkpoint.resume=true"] if args.resume else [])), args


def check_model_dir(cfg: TPPOConfig) -> Path:
    """The HF model to start from must exist and match ``cfg.model`` (checked before any heavy start)."""
    if cfg.model.hf_path is None:
        raise ConfigError("model.hf_path: set it to an HF model directory (for the tiny default, "
                          "`make run` builds one with tools/build_tiny_model.py)")
    path = Path(cfg.model.hf_path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"model.hf_path: {str(cfg_file)!r} does not exist")
    from megatron_tppo.weights.hf_config import model_config_from_hf

    m, hf = cfg.model, model_config_from_hf(json.loads(cfg_file.read_text()))
    fields = ("arch", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "vocab_size", "qkv_bias", "tie_word_embeddings")
    bad = [f"model.{f}={getattr(m, f)!r} but {cfg_file} says {getattr(hf, f)!r}" for f in fields
           if getattr(m, f) != getattr(hf, f)]
    if abs(m.rope_theta - hf.rope_theta) > 1e-6 * hf.rope_theta:
        bad.append(f"model.rope_theta={m.rope_theta} but {cfg_file} says {hf.rope_theta}")
    if bad:
        raise ConfigError("the config's model section does not match the HF model:\n  " + "\n  ".join(bad))
    return path


def preflight(cfg: TPPOConfig) -> Path:
    """Everything that can be checked before a heavy start: the model directory, the reward, and
    a writable run directory (config.yaml is written there, and a probe into checkpoints/)."""
    check_model_dir(cfg)
    from megatron_tppo.data.datasets import reward_name
    from megatron_tppo.rewards import get_reward

    try:
        get_reward(reward_name(cfg.data))
    except ValueError as err:
        raise ConfigError(f"data.reward: {err}") from None
    if cfg.data.task != "arith":
        for key in ("train_path", "eval_path"):
            path = getattr(cfg.data, key)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"data.{key}: {path!r} does not exist")
    out = Path(cfg.logging.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(cfg))
        ckpt = out / "checkpoints"
        ckpt.mkdir(exist_ok=True)
        probe = ckpt / f".write_probe.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"logging.output_dir={str(out)!r} is not writable: {err}") from None
    return out


def _install_stop_signals() -> list:
    """SIGTERM (scancel) and SIGUSR1 (Slurm's warning before the time limit) end the run at the next
    phase boundary (after generation, after the updates, after the step) with a checkpoint instead
    of killing it mid-update; the returned list holds the signal's name."""
    import signal

    got: list = []

    def handler(signum, _frame):
        if not got:
            got.append(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)
    return got


def _stop_check(stop: list, out: Path, step: int):
    """``stop_requested(phase)`` for :meth:`TPPOLoop.step`: has a stop signal arrived?

    Test hook (``TPPO_TEST_HOLD_AT=<phase>:<step>``, e.g. ``generation:2``): at that phase of that
    (1-based) step, write ``<output_dir>/held_<phase>_<step>`` and wait for the signal, so that a
    test's signal lands inside the phase deterministically."""
    hold = os.environ.get("TPPO_TEST_HOLD_AT")

    def stop_requested(phase: str) -> bool:
        if hold == f"{phase}:{step + 1}":
            (out / f"held_{phase}_{step + 1}").write_text("waiting for a signal")
            deadline = time.monotonic() + 300
            while not stop and time.monotonic() < deadline:
                time.sleep(0.05)
        return bool(stop)

    return stop_requested


class CheckpointCadence:
    """When the step loop saves a run checkpoint: after every ``every_steps``-th step, after the
    first step that ends ``every_s`` seconds (wall clock, ``clock``) or more after the previous
    save (or after the cadence was made, at the loop's start), and whenever ``due`` is told the
    run ends (last step, stop signal, time budget). 0 turns a cadence off."""

    def __init__(self, every_steps: int = 0, every_s: float = 0.0, clock=time.monotonic):
        self.every_steps, self.every_s, self.clock = every_steps, every_s, clock
        self.last_save = clock()

    def due(self, steps_done: int, final: bool = False) -> bool:
        """Should the checkpoint of ``steps_done`` finished steps be written now?"""
        by_steps = self.every_steps > 0 and steps_done % self.every_steps == 0
        by_time = self.every_s > 0 and self.clock() - self.last_save >= self.every_s
        return final or by_steps or by_time

    def saved(self) -> None:
        """A save just finished: the wall-clock interval starts again."""
        self.last_save = self.clock()


class EvalCadence:
    """When the step loop evaluates on the held-out set (``data.eval_every``, ``data.eval_every_s``).

    ``every_steps`` 0: never. Otherwise after every ``every_steps``-th step, or, with
    ``every_s`` > 0 instead, after the first step that takes the training clock (the sum of the
    steps' seconds since the loop started, evaluations excluded) to or past the next multiple of
    ``every_s``; and after the run's last step either way. A run evaluated on the training clock
    evaluates at the same training times whatever its step length (benchmarks/tppo_vs_ppo.py).
    """

    def __init__(self, every_steps: int, every_s: float = 0.0):
        self.every_steps, self.every_s = every_steps, every_s
        self.train_s = 0.0
        self.next_s = every_s

    def due(self, steps_done: int, step_s: float, last: bool = False) -> bool:
        """A step of ``step_s`` seconds just made ``steps_done`` steps: evaluate now?"""
        self.train_s += step_s
        if self.every_steps <= 0:
            return False
        if self.every_s > 0:
            crossed = self.train_s >= self.next_s
            if crossed:
                self.next_s = (math.floor(self.train_s / self.every_s) + 1) * self.every_s
            return crossed or last
        return steps_done % self.every_steps == 0 or last


def initialize(cfg: TPPOConfig, loop, model_dir: Path) -> int:
    """Load the starting weights; returns the first step to run.

    Resume (``checkpoint.resume``): the latest whole run checkpoint (models, optimizers, window
    pool, prompt stream, RNG). Otherwise the policy comes from ``checkpoint.load_policy`` (a
    torch_dist checkpoint, e.g. from tools/convert_hf_to_megatron.py) or the HF model, and the
    critic from ``checkpoint.load_critic`` or the same HF backbone with a fresh value head. Each
    trainer loads in its turn of the memory schedule's phase, the critic first (shared trainers;
    split ones load in the one phase).
    """
    from megatron_tppo.controller import run_checkpoint

    start = None
    root = run_checkpoint.checkpoint_root(cfg.logging.output_dir)
    if cfg.checkpoint.resume and run_checkpoint.list_checkpoints(root):
        loop.colocation.enter("resume", "critic")  # (run_checkpoint.load takes the turns)
        start = run_checkpoint.resume(root, loop)
    if cfg.checkpoint.resume and start is None:
        print("[tppo] checkpoint.resume: no whole checkpoint found; starting from the initial weights", flush=True)
    if start is None:
        start = 0
        for role in ("critic", "policy"):
            loop.colocation.enter("checkpoint_load", role)
            trainer, path = getattr(loop, role), getattr(cfg.checkpoint, f"load_{role}")
            if path:
                trainer.load(path, with_optimizer=False)
            else:
                trainer.load_hf(str(model_dir))
    # the engines started from dummy weights: give them the policy's own through the same path
    # every step uses, then hand the GPUs to generation
    loop.sync_weights()  # (the schedule's first_sync)
    loop.colocation.for_generation()
    return start


def save_checkpoint(root: Path, step: int, loop, keep_last: int, then: Optional[str] = "generation") -> None:
    """A run checkpoint in the memory schedule's save phase: from generation the engines sleep
    (level 1) and the trainers come back first, and afterwards the run goes to phase ``then``
    (None: it stops). After a stop signal the loop is already in its signal phase."""
    from megatron_tppo.controller import run_checkpoint

    if loop.colocation.phase == "generation":
        loop.colocation.enter("checkpoint_save", "critic")  # (run_checkpoint.save takes the turns)
    run_checkpoint.save(root, step, loop, keep_last)
    if then is not None:
        loop.colocation.enter(then)


def run(cfg: TPPOConfig) -> dict:
    """Run T-PPO for ``cfg.steps`` steps; returns the last metrics (with eval/accuracy_start/_end)."""
    from tqdm import tqdm

    from megatron_tppo.controller import cluster, run_checkpoint
    from megatron_tppo.controller.groups import RolloutGroup, TrainerGroup
    from megatron_tppo.controller.ray_placement import PlacedCluster, plan_for_cluster
    from megatron_tppo.controller.colocation import Colocation
    from megatron_tppo.planning.plan import transport_of
    from megatron_tppo.planning.schedule import engine_utilization
    from megatron_tppo.planning.time_model import waits as plan_waits
    from megatron_tppo.controller.weight_sync import WeightSync
    from megatron_tppo.controller.loop import Task, TPPOLoop
    from megatron_tppo.data.datasets import build_eval_prompts, build_prompt_stream, reward_name
    from megatron_tppo.data.tokenizer import load_tokenizer, make_encoder
    from megatron_tppo.monitoring import MetricsLogger, summary_line
    from megatron_tppo.platform import resolve_device
    from megatron_tppo.rewards import make_safe_reward

    model_dir = check_model_dir(cfg)
    out = Path(cfg.logging.output_dir)
    device = resolve_device(cfg.parallel.device)
    tok = load_tokenizer(cfg.model.tokenizer_path or model_dir)
    encode = make_encoder(tok)
    reward = make_safe_reward(reward_name(cfg.data), cfg.data.reward_timeout_s)

    def score(text: str, meta: dict):
        res = reward(text, meta)
        return res.score, (None if res.status == "ok" else res.status)

    task = Task(prompts=build_prompt_stream(cfg.data, encode, cfg.seed),
                eval_prompts=build_eval_prompts(cfg.data, encode, cfg.seed),
                decode=lambda ids: tok.decode(ids, skip_special_tokens=True), score=score)
    logger = MetricsLogger(out, enabled=cfg.logging.tensorboard)
    print(f"[tppo] TensorBoard events: {logger.log_dir.resolve()}", flush=True)
    started = cluster.connect(cfg.parallel.ray_address, num_gpus=cfg.parallel.local_gpus)
    print(f"[tppo] Ray: {cluster.describe(started)}", flush=True)
    groups: list = []
    try:
        t0 = time.perf_counter()
        threads = cfg.parallel.threads_per_worker
        plan, on_gpus = plan_for_cluster(cfg, device)
        for line in plan.describe():
            print(f"[tppo] {line}", flush=True)
        # every wait sized from the plan's projection (start-up phases, sync), not a fixed limit
        waits = plan_waits(cfg, len(plan.node_gpus()), transport_of(cfg, plan))
        print(f"[tppo] waits: engine start {waits.engine_start_s:.0f} s, trainer build and load "
              f"{waits.trainer_build_s:.0f} s, weight sync {waits.sync_s:.0f} s", flush=True)
        placed = PlacedCluster(plan, on_gpus)
        groups.append(placed)
        # initialize() loads both trainers (resume, checkpoint.load_*, or the HF model) and syncs the
        # policy into the engines before anything generates: nobody needs the random or HF weights
        # the builds would otherwise start from
        rollout = RolloutGroup(cfg.rollout.backend, str(model_dir), cfg.rollout, cfg.model, placed=placed,
                               threads=threads, weights="dummy", setup_timeout_s=waits.engine_start_s,
                               utilization=functools.partial(engine_utilization, cfg, plan) if device == "cuda" else None)
        groups.append(rollout)
        # the memory schedule from the start: engines start alone, then sleep while the trainers
        # are built and loaded (vLLM refuses to start unless its budget is free; megatron_tppo/planning/schedule.py)
        colocation = Colocation(cfg, rollout, trace_path=out / "memory_trace.jsonl")
        colocation.enter("engine_start")

        def build(role: str, seed: int) -> TrainerGroup:
            """One trainer group, built in its turn (shared trainers: the other one offloaded)."""
            colocation.enter("trainer_build", role)
            group = TrainerGroup(role, cfg.model, getattr(cfg.parallel, role), getattr(cfg.optim, role), role=role,
                                 device=device, seed=seed, total_steps=cfg.steps, placed=placed, threads=threads,
                                 init_weights=False, setup_timeout_s=waits.trainer_build_s)
            groups.append(group)
            colocation.attach(**{role: group})
            return group

        critic = build("critic", cfg.seed + 1)  # the critic's turn comes first (planning/schedule.py TURNS)
        policy = build("policy", cfg.seed)
        print(f"[tppo] cluster up in {time.perf_counter() - t0:.1f} s: policy {policy.world} ranks, "
              f"critic {critic.world} ranks, {cfg.rollout.num_engines} rollout engine(s) on {device}"
              + (" (GPU bundles)" if on_gpus else ""), flush=True)
        # which process is which (for py-spy, logs, and telling what died)
        (out / "actors.json").write_text(json.dumps(rollout.where + policy.where + critic.where, indent=1) + "\n")

        sync = WeightSync(policy, rollout, cfg, placement=plan, timeout_s=waits.sync_s)  # trainer ranks -> engine workers
        groups.append(sync)  # closed before the groups it spans
        loop = TPPOLoop(cfg, policy, critic, rollout, task, logger, weight_sync=sync, colocation=colocation)
        start = initialize(cfg, loop, model_dir)
        first = loop.evaluate() if task.eval_prompts and cfg.data.eval_every > 0 and start == 0 else {}
        if first:
            logger.log(0, first)
            print(f"[tppo] step 0 eval: accuracy {first['eval/accuracy']:.3f}", flush=True)
        metrics: dict = {}
        stop = _install_stop_signals()
        bar = tqdm(range(start, cfg.steps), desc="T-PPO", initial=start, total=cfg.steps, unit="step",
                   disable=not cfg.logging.progress_bar,
                   dynamic_ncols=True)
        ckpt_root = run_checkpoint.checkpoint_root(out)
        cadence = CheckpointCadence(cfg.checkpoint.save_every, cfg.checkpoint.save_every_s)
        evals = EvalCadence(cfg.data.eval_every, cfg.data.eval_every_s)
        deadline = time.monotonic() + cfg.time_budget_s if cfg.time_budget_s > 0 else float("inf")
        for step in bar:
            metrics = loop.step(step, _stop_check(stop, out, step))
            if loop.stopped_after == "generation":  # the step was undone: save the state before it
                if step > start or start == 0:  # (resumed at `start`: its checkpoint holds that state)
                    save_checkpoint(ckpt_root, step, loop, cfg.checkpoint.keep_last, then=None)
                bar.write(f"[tppo] {stop[0]} received during step {step + 1}'s generation: checkpointed "
                          f"step {step} and stopping (a resumed run regenerates step {step + 1})")
                break
            out_of_time = time.monotonic() >= deadline
            last = step + 1 == cfg.steps or out_of_time
            evaluate = evals.due(step + 1, metrics.get("perf/step_s", 0.0), last)
            if task.eval_prompts and evaluate and loop.stopped_after is None:
                metrics.update(loop.evaluate())
                if cfg.time_budget_excludes_eval:  # training time only: move the deadline past the evaluation
                    deadline += metrics["perf/eval_s"]
            logger.log(step + 1, metrics)
            bar.write(summary_line(step + 1, metrics))
            waited = 0.0  # perf/checkpoint_s: what this step waited for its checkpoint (0 without one)
            if cadence.due(step + 1, final=bool(stop) or last):
                t_save = time.perf_counter()
                ends = bool(stop) or out_of_time or step + 1 == cfg.steps
                save_checkpoint(ckpt_root, step + 1, loop, cfg.checkpoint.keep_last, then=None if ends else "generation")
                waited = time.perf_counter() - t_save
                cadence.saved()
            metrics["perf/checkpoint_s"] = waited
            logger.log(step + 1, {"perf/checkpoint_s": waited})
            if stop:
                phase = " (after its updates, before the sync)" if loop.stopped_after else ""
                bar.write(f"[tppo] {stop[0]} received: checkpointed and stopping after step {step + 1}{phase}")
                break
            if out_of_time:
                bar.write(f"[tppo] time_budget_s={cfg.time_budget_s:g} used up: stopping after step {step + 1}")
                break
        if first:
            metrics["eval/accuracy_start"] = first["eval/accuracy"]
        return metrics
    finally:
        logger.close()
        reward.close()
        for g in reversed(groups):  # WeightSync.close, then the actor groups, then the placement groups
            g.shutdown()
        cluster.shutdown(started)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_config(argv)
        if args.dry_run:
            print(dump_yaml(cfg), end="")
            if args.nodes is not None:
                from megatron_tppo.plan import run_plan

                return run_plan(cfg, args)
            return 0
        out = preflight(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from megatron_tppo.console import start_run_logs

    log_dir = start_run_logs(out)
    print(f"[tppo] run directory: {out.resolve()} (logs: {log_dir.resolve()})")
    mode = " [PPO baseline: window >= max response]" if cfg.is_ppo_baseline else ""
    print(f"[tppo] window {cfg.rollout.window_tokens} tokens, max response {cfg.rollout.max_response_tokens} "
          f"({cfg.max_windows} windows), {cfg.rollout.num_slots} slots, groups of {cfg.rollout.samples_per_prompt}{mode}")
    from megatron_tppo.controller.errors import RunAborted
    from megatron_tppo.data.datasets import DataError

    try:
        metrics = run(cfg)
    except DataError as err:  # a malformed row with data.bad_rows=error: like a bad config, one line
        print(f"data error: {err}", file=sys.stderr, flush=True)
        return 2
    except RunAborted as err:
        from megatron_tppo.controller.run_checkpoint import checkpoint_root, latest_checkpoint

        latest = latest_checkpoint(checkpoint_root(out))
        hint = (f"resume from {latest} with checkpoint.resume=true" if latest is not None
                else "no run checkpoint was written yet")
        print(f"[tppo] run stopped: {err}\n[tppo] {hint}", file=sys.stderr, flush=True)
        return 1
    summary = {k: v for k, v in metrics.items() if k.startswith(("eval/", "train/"))}
    (out / "final_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"[tppo] done: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
