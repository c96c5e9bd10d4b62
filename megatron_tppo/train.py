"""Entry point: ``python -m megatron_tppo.train --config FILE [key.sub=value ...]``.

Parses and validates the configuration before anything heavy is imported (a bad key or value
fails in well under a second, naming the field), writes the resolved config into the run
directory, then runs the job.

Status: the Ray controller that runs the full T-PPO loop (issue 6) is not built yet. Until it
lands, the job is an honest one: validate the config and drive the window pool (the real
successive-batching state machine) with simulated response lengths, reporting slot utilization
of T-PPO against synchronous PPO for the configured window. It says so when it runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_tppo.config import ConfigError, TPPOConfig, dump_yaml, help_text, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_tppo.train",
        description="Train a policy with Truncated PPO (T-PPO). Overrides: key.sub=value (see --help-config).",
    )
    p.add_argument("--config", help="YAML config file (examples/*.yaml); defaults apply when omitted")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type, default and doc")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


def parse_config(argv: list[str] | None = None) -> tuple[TPPOConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    if args.help_config:
        print(help_text())
        raise SystemExit(0)
    return load_config(args.config, args.overrides), args


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_config(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    out = Path(cfg.logging.output_dir)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(cfg))
    except OSError as err:
        print(f"config error: logging.output_dir={str(out)!r} is not writable: {err}", file=sys.stderr)
        return 2
    print(f"[tppo] run directory: {out.resolve()}")
    print(f"[tppo] window {cfg.rollout.window_tokens} tokens, max response {cfg.rollout.max_response_tokens} "
          f"({cfg.max_windows} windows), {cfg.rollout.num_slots} slots x groups of {cfg.rollout.samples_per_prompt}"
          + (" [PPO baseline mode]" if cfg.is_ppo_baseline else ""))
    print("[tppo] NOTE: the end-to-end trainer (Ray controller, megatron-core, vLLM) is not built yet (issue 6).")
    print("[tppo] Running the window-pool simulation instead: simulated lengths, no model.")
    from megatron_tppo.algorithms.simulate import compare_utilization, format_table

    rows = compare_utilization(cfg, seed=cfg.seed)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
