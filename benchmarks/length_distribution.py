"""Response lengths of an SFT start model on its task: histogram PNG + percentiles.

Samples responses with the run's own sampling settings (temperature, cap) from the model in HF
format (transformers ``generate``, CPU) on held-out prompts of the config's data, and compares the
lengths with the long-tail targets: median <= 0.2 x max_response_tokens, p99 >= 0.7 x cap.

    .venv/bin/python benchmarks/length_distribution.py [--config examples/longtail_cpu.yaml]
        [--prompts 64] [--samples 4] [--out benchmarks/results/longtail_lengths.json]

Also reports the lengths of the task's correct (SFT) responses on the same prompts, the model's
accuracy, and decode tokens/s (what a 1,024-token response costs on this CPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_tppo.config_io import load_config  # noqa: E402
from megatron_tppo.data.arith import parse_answer  # noqa: E402
from megatron_tppo.data.longtail import percentiles  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "examples" / "longtail_cpu.yaml"))
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "longtail_lengths.json"))
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)

    import torch
    from transformers import AutoModelForCausalLM

    from megatron_tppo.data import tokenizer as chartok
    from megatron_tppo.data.datasets import read_records

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    d = cfg.data
    recs = read_records(d.eval_path, d.prompt_key, d.answer_key, d.bad_rows, d.task, "data.eval_path").items[:a.prompts]
    model = AutoModelForCausalLM.from_pretrained(cfg.model.hf_path, dtype=torch.float32).eval()
    enc = chartok.VOCAB
    inv = {i: c for c, i in enc.items()}
    cap = cfg.rollout.max_response_tokens
    jobs = [(text, meta) for text, meta in recs for _ in range(a.samples)]
    lengths, correct, ref, tokens, t0 = [], 0, [], 0, time.time()
    for s in range(0, len(jobs), a.batch):
        chunk = jobs[s:s + a.batch]
        ids = [[enc.get(c, chartok.UNK_ID) for c in t] for t, _ in chunk]
        width = max(map(len, ids))
        x = torch.tensor([[chartok.PAD_ID] * (width - len(i)) + i for i in ids])
        mask = (x != chartok.PAD_ID).long()
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=cap, do_sample=True,
                                 temperature=cfg.rollout.temperature, top_k=0, top_p=1.0,
                                 eos_token_id=chartok.EOS_ID, pad_token_id=chartok.PAD_ID)
        for (text, meta), row in zip(chunk, out[:, width:].tolist()):
            n = next((k + 1 for k, t in enumerate(row) if t == chartok.EOS_ID), len(row))
            n = min(n, cap)
            lengths.append(n)
            tokens += n
            resp = "".join(inv.get(t, "") for t in row[:n] if t not in (chartok.EOS_ID, chartok.PAD_ID))
            correct += parse_answer(resp) == int(meta["answer"])
            ref.append(11 * (len(text.split()) - 2) + 4)  # the correct response: 11 tokens per prompt term
        print(f"[length_distribution] {len(lengths)}/{len(jobs)} samples, {time.time() - t0:.0f} s", flush=True)
    secs = time.time() - t0
    pc, pref = percentiles(lengths), percentiles(ref)
    res = {"config": a.config, "model": cfg.model.hf_path, "max_response_tokens": cap, "samples": len(lengths),
           "temperature": cfg.rollout.temperature, "percentiles": pc, "reference_percentiles": pref,
           "targets": {"median_max": 0.2 * cap, "p99_min": 0.7 * cap,
                       "median_ok": pc["p50"] <= 0.2 * cap, "p99_ok": pc["p99"] >= 0.7 * cap},
           "accuracy": correct / len(lengths), "truncated_at_cap": sum(n >= cap for n in lengths) / len(lengths),
           "generate_s": secs, "tokens_per_s": tokens / secs, "lengths": lengths}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    from plot_png import histogram

    histogram(out.with_suffix(".png"), lengths, 32, 0, cap,
              f"response lengths of {cfg.model.hf_path} (n={len(lengths)}, T={cfg.rollout.temperature:g})",
              "response tokens", {"p50": pc["p50"], "p99": pc["p99"], "0.2 cap": 0.2 * cap, "0.7 cap": 0.7 * cap})
    print(f"{'':<10}" + "".join(f"{k:>8}" for k in ("p50", "p90", "p95", "p99", "max", "mean")))
    for name, q in (("model", pc), ("reference", pref)):
        print(f"{name:<10}" + "".join(f"{q[k]:>8.0f}" for k in ("p50", "p90", "p95", "p99", "max", "mean")))
    print(f"targets: p50 <= {0.2 * cap:.0f} ({'ok' if res['targets']['median_ok'] else 'MISSED'}), p99 >= "
          f"{0.7 * cap:.0f} ({'ok' if res['targets']['p99_ok'] else 'MISSED'}); accuracy {res['accuracy']:.3f}; "
          f"{res['tokens_per_s']:.0f} tok/s; wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
