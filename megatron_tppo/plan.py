"""``python -m megatron_tppo.plan --config FILE --nodes K [--gpus-per-node 8] [--fill] [key=value ...]``

Does a config fit a cluster, and where does a step's time go? The command line of
:mod:`megatron_tppo.planning` (pure arithmetic: no ray, vllm, megatron or torch import): the
layout of every component, the memory of every phase on its fullest GPU, the host memory at its
peak, the step's roofline (the weight sync term by term, naming its dominant term), the projected
start-up, and the config's trainer layout beside the other one (``parallel.trainers`` split or
shared: step times, memory fit, which is faster). Exits 3 naming the reason when the layout
cannot divide or a phase cannot fit. Every field of :class:`~megatron_tppo.planning.hardware.Links`
is a flag (``--nvlink-gb-s``, ``--hbm-copy-gb-s``, ``--ib-gb-s``, ...). ``--fill`` scales the
data-parallel sizes and the number of vLLM engines to the cluster (the YAML states the smallest
layout). ``--json`` prints one JSON document on stdout and nothing else: with the placement and
the memory, ``sync`` (route, seconds, terms, dominant term, every engine worker's transport) and
``layouts`` (both trainer layouts' step times and fit). ``--compare-modes``: wall-clock per 1,000 finished
responses of PPO and both T-PPO modes (:mod:`megatron_tppo.planning.projection`).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from typing import Optional

from megatron_tppo.config import ConfigError, TPPOConfig
from megatron_tppo.config_io import field_docs, load_config
from megatron_tppo.planning.hardware import GPU, Host, Links, gpu_memory_gib
from megatron_tppo.planning.plan import PlanError, fill_layout, make_plan


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--fill", action="store_true",
                   help="scale data-parallel sizes and vLLM engines to the cluster (prints the overrides)")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length bound for KV/time (default 1024)")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0,
                   help="GPU memory: H100 80, H200 141 (marketed GB; other values are taken as GiB); default 80")
    p.add_argument("--host-mem-gb", type=float, default=Host.memory_gib,
                   help=f"host memory per node in GiB (default {Host.memory_gib:g})")
    p.add_argument("--object-store-gb", type=float, default=None,
                   help="Ray object store per node in GiB (default Ray's: 30%% of host memory, at most 200 GB)")
    p.add_argument("--pcie-gb-s", type=float, default=Host.pcie_gb_s,
                   help=f"host <-> GPU copy GB/s per GPU: turn swaps, host staging (default {Host.pcie_gb_s:g})")
    docs = field_docs(Links)
    for f in dataclasses.fields(Links):  # one flag per link of the sync model
        what = " ".join(docs.get(f.name, "").split()).split(" (assumption")[0].split(". ")[0].rstrip(".")
        p.add_argument("--" + f.name.replace("_", "-"), type=float, default=None, dest=f"link_{f.name}",
                       metavar=f.name.rsplit("_", 2)[-1].upper() if f.name.endswith("_ms") else "GB_S",
                       help=f"{what} (default {f.default}; planning/hardware.py Links)".replace("%", "%%"))
    p.add_argument("--json", action="store_true",
                   help="print the plan as JSON alone: placement, numbers, per-phase memory, host memory, start-up")


def run_plan(cfg: TPPOConfig, args: argparse.Namespace, out=None) -> int:
    """Print the plan for ``cfg`` (CLI args from :func:`add_plan_args`); 0 when it fits, 3 when not."""
    out = out or sys.stdout
    overrides: list[str] = []
    try:
        if args.nodes is None or args.nodes < 1 or args.gpus_per_node < 1:
            raise PlanError("--nodes and --gpus-per-node must be >= 1")
        cfg = copy.deepcopy(cfg)
        if args.fill:
            overrides = fill_layout(cfg, args.nodes * args.gpus_per_node)
            cfg.validate()
        gpu = GPU(memory_gib=gpu_memory_gib(args.gpu_mem_gb))
        host = Host(memory_gib=args.host_mem_gb, object_store_gib=getattr(args, "object_store_gb", None),
                    pcie_gb_s=getattr(args, "pcie_gb_s", None) or Host.pcie_gb_s)
        links = Links(**{f.name: getattr(args, f"link_{f.name}") for f in dataclasses.fields(Links)
                         if getattr(args, f"link_{f.name}", None) is not None})
        plan = make_plan(cfg, args.nodes, args.gpus_per_node, gpu, prompt_tokens=args.prompt_tokens, host=host,
                         links=links)
    except (PlanError, ConfigError) as err:
        print(f"plan refused: {err}", file=sys.stderr)
        return 3
    if getattr(args, "json", False):
        print(json.dumps(dict(plan.to_json(), overrides=overrides), indent=1), file=out)
    else:
        if overrides:
            print("layout filled to the cluster; pass these overrides: " + " ".join(overrides), file=out)
        print("\n".join(plan.lines), file=out)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_tppo.plan", description=__doc__.split("\n")[2])
    p.add_argument("--config", help="YAML config file")
    add_plan_args(p)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--compare-modes", action="store_true", help="wall-clock per 1,000 finished responses of PPO, "
                   "T-PPO and continuous T-PPO at 4, 8, 16 nodes (megatron_tppo/planning/projection.py; default "
                   "config: examples/qwen2.5_32b/tppo.yaml)")
    args = p.parse_args(argv)
    if args.compare_modes:
        from megatron_tppo.planning.projection import report

        print(report(load_config(args.config or "examples/qwen2.5_32b/tppo.yaml", args.overrides)))
        return 0
    if args.nodes is None:
        p.error("--nodes is required")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return run_plan(cfg, args)


if __name__ == "__main__":
    raise SystemExit(main())
