"""Slot utilization of synchronous PPO vs T-PPO windows vs continuous refill (TPPO.md section 7).

Simulated long-tailed response lengths (lognormal, capped) driven through the real WindowPool.
Prints a table and writes benchmarks/results/slot_utilization.json.

    .venv/bin/python benchmarks/slot_utilization.py [--slots 1024] [--window 8192] [--max-len 24576]
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

from megatron_tppo.planning.simulate import format_table, simulate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slots", type=int, default=1024)
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--window", type=int, default=8192)
    p.add_argument("--max-len", type=int, default=24576)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.75, 1.0])
    p.add_argument("--horizon-max-lens", type=int, default=6, help="simulated time, in units of max-len")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "slot_utilization.json"))
    a = p.parse_args()
    results = []
    for sigma in a.sigmas:
        t0 = time.time()
        h = a.horizon_max_lens * a.max_len
        rows = [simulate(a.slots, a.group, a.max_len, a.max_len, h, sigma=sigma),
                simulate(a.slots, a.group, a.window, a.max_len, h, sigma=sigma),
                simulate(a.slots, a.group, a.window, a.max_len, h, continuous=True, sigma=sigma)]
        print(f"\nlognormal sigma={sigma}, median={a.max_len / 8:.0f}, cap={a.max_len}, "
              f"{a.slots} slots ({time.time() - t0:.1f} s)")
        print(format_table(rows))
        results += [dict(dataclasses.asdict(r), sigma=sigma, slots=a.slots) for r in rows]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
