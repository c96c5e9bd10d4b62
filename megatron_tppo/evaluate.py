"""The evaluator: ``python -m megatron_tppo.evaluate`` scores a model on a config's held-out set.

    python -m megatron_tppo.evaluate --config CFG.yaml [--model HF_DIR | --checkpoint PATH]
        [--prompts N] [--samples K] [--seed S] [--bootstrap B] [--out report.json]
        [--samples-out samples.jsonl] [--hf-out DIR] [--log FILE] [key.sub=value ...]

The model: ``--model`` an HF directory; or ``--checkpoint`` a run's policy: a run directory (its
newest whole checkpoint), a run checkpoint ``checkpoints/step_<N>``, or a torch_dist checkpoint.
A checkpoint is converted to HF first (:mod:`megatron_tppo.weights.convert`, the model described
by its ``tppo_convert.json``, else by ``model.hf_path``'s config.json, whose tokenizer files come
along), into ``--hf-out`` or a temporary directory. Neither: ``model.hf_path``. With
``--checkpoint`` and no ``--config``, the run's own ``config.yaml`` (in the run directory) is used.

The held-out set, reward, sampling (``rollout.temperature``, ``rollout.top_p``) and response cap
(``rollout.max_response_tokens``) are the config's, as in training's periodic evaluation;
``--prompts`` / ``--samples`` set ``data.eval_prompts`` / ``data.eval_samples_per_prompt``.
Generation is seeded (``--seed``, default the config's seed): the same model gives the same report.
One vLLM engine generates (:class:`~megatron_tppo.rollout.vllm_backend.VLLMEngine`, in-process on
CPU); the scoring is :mod:`megatron_tppo.evaluation`, the code the training loop runs.

Prints a table (pass@1 over k samples with its bootstrap standard error over prompts, accuracy by
response-length bucket, mean response length); ``--out`` writes the same as JSON (with every
prompt's rewards and lengths), ``--samples-out`` one JSON line per sample (prompt, sample,
token_ids, reward, finish_reason). Library output goes to ``--log`` (default: beside ``--out``,
else runs/evaluate/evaluate.log). Exit status 2 for a bad config or path.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from megatron_tppo.config import ConfigError, TPPOConfig
from megatron_tppo.config_io import load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_tppo.evaluate",
                                description="Score a model on a config's held-out set (pass@1 over k samples).")
    p.add_argument("--config", help="YAML config (default: a run directory's config.yaml with --checkpoint)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="HF model directory")
    src.add_argument("--checkpoint", help="run directory, run checkpoint (step_<N>) or torch_dist policy checkpoint")
    p.add_argument("--prompts", type=int, help="held-out prompts (data.eval_prompts)")
    p.add_argument("--samples", type=int, help="samples per prompt k (data.eval_samples_per_prompt)")
    p.add_argument("--seed", type=int, help="generation and bootstrap seed (default: the config's seed)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples for the standard error")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--samples-out", help="write every sample as a JSON line here")
    p.add_argument("--hf-out", help="with --checkpoint: keep the converted HF directory here")
    p.add_argument("--log", help="library output (vLLM, torch) goes here")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return p


def resolve_policy_checkpoint(path: str | Path) -> Path:
    """The torch_dist policy checkpoint that ``path`` names (see the module docstring)."""
    from megatron_tppo.controller.run_checkpoint import checkpoint_root, list_checkpoints

    p = Path(path)
    if (p / "metadata.json").is_file():
        return p
    if (p / "policy" / "metadata.json").is_file():
        return p / "policy"
    whole = list_checkpoints(checkpoint_root(p))
    if whole and (whole[-1] / "policy" / "metadata.json").is_file():
        return whole[-1] / "policy"
    raise ConfigError(f"--checkpoint {str(p)!r}: neither a torch_dist checkpoint, a run checkpoint (policy/) "
                      "nor a run directory with a whole checkpoint under checkpoints/")


def load_eval_config(a: argparse.Namespace) -> TPPOConfig:
    config = a.config
    if config is None and a.checkpoint:  # the run directory's config.yaml (written by train)
        p = Path(a.checkpoint).resolve()
        config = next((str(d / "config.yaml") for d in [p, *p.parents][:4] if (d / "config.yaml").is_file()), None)
    extra = ([f"data.eval_prompts={a.prompts}"] if a.prompts is not None else []) + \
            ([f"data.eval_samples_per_prompt={a.samples}"] if a.samples is not None else [])
    return load_config(config, list(a.overrides) + extra)


def convert_checkpoint(cfg: TPPOConfig, policy: Path, out: Path) -> Path:
    """The policy checkpoint as an HF directory ``out`` (tokenizer files from ``model.hf_path``)."""
    from megatron_tppo.weights.convert import SIDECAR, ConvertError, MegatronToHFJob, convert_megatron_to_hf

    converted = (policy / SIDECAR).is_file()  # made by convert_hf_to_megatron; a training checkpoint is not
    if not converted and cfg.model.hf_path is None:
        raise ConfigError(f"{policy} has no {SIDECAR}: set model.hf_path to the HF directory it was trained from")
    hf_config = None if converted else cfg.model.hf_path
    try:
        convert_megatron_to_hf([MegatronToHFJob(str(policy), str(out), hf_config=hf_config)], force=True,
                               progress=False)
    except ConvertError as err:
        raise ConfigError(f"--checkpoint: {err}") from None
    return out


def evaluate(cfg: TPPOConfig, model_dir: Path, seed: int, resamples: Optional[int] = None):
    """Generate and score on ``cfg``'s held-out set with one engine on ``model_dir``.
    Returns (EvalReport, prompts, generation results, seconds)."""
    from megatron_tppo.data.datasets import build_eval_prompts, reward_name
    from megatron_tppo.data.tokenizer import load_tokenizer, make_encoder
    from megatron_tppo.evaluation import BOOTSTRAP_SAMPLES, evaluate_policy
    from megatron_tppo.rewards import make_safe_reward
    from megatron_tppo.rollout import Sampling, engine_class

    tok = load_tokenizer(cfg.model.tokenizer_path or model_dir)
    prompts = build_eval_prompts(cfg.data, make_encoder(tok), cfg.seed)
    if not prompts:
        raise ConfigError("the config has no held-out prompts (data.eval_path is unset for a file task)")
    reward = make_safe_reward(reward_name(cfg.data), cfg.data.reward_timeout_s)
    r = cfg.rollout
    engine = engine_class(r.backend).from_config(str(model_dir), r, cfg.model)
    try:
        t0 = time.perf_counter()
        report, results = evaluate_policy(
            engine, prompts, cfg.data.eval_samples_per_prompt, r.max_response_tokens,
            Sampling(temperature=r.temperature, top_p=r.top_p, seed=seed),
            lambda ids: tok.decode(ids, skip_special_tokens=True), lambda text, meta: reward(text, meta).score,
            resamples=resamples or BOOTSTRAP_SAMPLES, seed=seed)
        return report, prompts, results, time.perf_counter() - t0
    finally:
        engine.shutdown()
        reward.close()


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        cfg = load_eval_config(a)
        policy = resolve_policy_checkpoint(a.checkpoint) if a.checkpoint else None
        model_dir = Path(a.model) if a.model else None
        if policy is None and model_dir is None:
            if cfg.model.hf_path is None:
                raise ConfigError("give --model, --checkpoint or model.hf_path")
            model_dir = Path(cfg.model.hf_path)
        if model_dir is not None:
            from megatron_tppo.train import check_model_dir

            try:
                check_model_dir(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_path=str(model_dir))))
            except ConfigError as err:
                raise ConfigError(f"--model {model_dir}: {err}" if a.model else str(err)) from None
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from megatron_tppo.console import quiet_process

    log = Path(a.log) if a.log else (Path(a.out).with_suffix(".log") if a.out else Path("runs/evaluate/evaluate.log"))
    console = quiet_process(log)
    seed = cfg.seed if a.seed is None else a.seed
    tmp = None
    try:
        if policy is not None:
            tmp = None if a.hf_out else Path(tempfile.mkdtemp(prefix="tppo_eval_hf_"))
            console.write(f"[evaluate] converting {policy} to HF\n")
            model_dir = convert_checkpoint(cfg, policy, Path(a.hf_out) if a.hf_out else tmp / "hf")
        console.write(f"[evaluate] {model_dir}: {cfg.data.eval_prompts} prompts x {cfg.data.eval_samples_per_prompt} "
                      f"samples, temperature {cfg.rollout.temperature}, top_p {cfg.rollout.top_p}, "
                      f"max {cfg.rollout.max_response_tokens} tokens (library output: {log})\n")
        report, prompts, results, seconds = evaluate(cfg, model_dir, seed, a.bootstrap)
    except ConfigError as err:
        console.write(f"config error: {err}\n")
        return 2
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    out = {"model": str(model_dir) if policy is None else None, "checkpoint": str(policy) if policy else None,
           "config": a.config, "overrides": a.overrides, "seed": seed,
           "sampling": {"temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
                        "max_response_tokens": cfg.rollout.max_response_tokens},
           "eval_s": seconds, **report.to_json()}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    if a.samples_out:
        k = report.samples_per_prompt
        with open(a.samples_out, "w") as f:
            for i, g in enumerate(results):
                f.write(json.dumps({"prompt": prompts[i // k].uid, "sample": i % k, "token_ids": list(g.token_ids),
                                    "reward": report.rewards[i // k][i % k], "finish_reason": g.finish_reason}) + "\n")
    console.write(report.table() + f"\n[evaluate] {seconds:.1f} s" + (f"; wrote {a.out}" if a.out else "") + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
