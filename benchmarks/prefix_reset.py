"""What the prefix-cache reset after a weight sync costs in re-prefill (vLLM, tiny model, CPU).

``python benchmarks/prefix_reset.py [--slots 16] [--context 768] [--window 16] [--repeats 3]``

The same window (every slot's context = prompt + earlier windows, then ``--window`` new
tokens, greedy) is generated twice per repeat: right after ``reset_prefix_cache()`` (what every
step sees after a sync) and with the prefix cache warm from the identical previous call. The
difference is the re-prefill of ``slots x context`` tokens. Prints one JSON line to stdout;
vLLM's own output goes to ``--log`` (:func:`megatron_tppo.console.quiet_process`).

Measured 2026-12-01 on this 2-core machine (shared with other jobs, so noisy), defaults (16 slots x
768 tokens of context = 12,288 re-prefilled tokens, window 16): after the reset 3.85 s (3.18-4.89),
warm cache 2.50 s (2.03-2.73), medians of 3: the reset costs 1.34 s, x1.54 the window. The plan
counts this term at GPU compute rate (megatron_tppo/planning/time_model.py, "re-prefill after the sync").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tppo.config import ModelConfig  # noqa: E402
from megatron_tppo.rollout.base import Sampling  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--context", type=int, default=768)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--log", default="runs/bench_prefix_reset.log", help="where vLLM's output goes")
    a = p.parse_args(argv)
    from megatron_tppo.console import quiet_process

    stdout = os.fdopen(os.dup(1), "w")  # for the JSON line: quiet_process points fd 1 at the log
    console = quiet_process(a.log)
    console.write(f"[prefix_reset] library output (vLLM): {a.log}\n")
    from megatron_tppo.rollout.vllm_backend import VLLMEngine
    from megatron_tppo.weights.hf_config import save_random_hf_model

    max_len = a.context + a.window + 16
    cfg = ModelConfig(arch="qwen2", num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
                      num_query_groups=2, vocab_size=300, max_position_embeddings=max_len, rope_theta=10000.0,
                      qkv_bias=True, tie_word_embeddings=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_hf_model(cfg, Path(tmp), seed=1)
        eng = VLLMEngine(path, max_model_len=max_len, cpu_kv_cache_gb=1, max_num_seqs=a.slots, stop_token_ids=[])
        prompts = [[(7 * s + 13 * i) % 290 + 5 for i in range(a.context)] for s in range(a.slots)]
        greedy = Sampling(temperature=0.0, top_p=1.0, seed=0)

        def window() -> float:
            t0 = time.perf_counter()
            eng.generate(prompts, a.window, greedy)
            return time.perf_counter() - t0

        window()  # start-up effects out of the way
        cold, warm = [], []
        for _ in range(a.repeats):
            eng.llm.reset_prefix_cache()
            cold.append(window())
            warm.append(window())
        eng.shutdown()
    c, w = statistics.median(cold), statistics.median(warm)
    res = dict(slots=a.slots, context=a.context, window=a.window, reprefill_tokens=a.slots * a.context,
               after_reset_s=round(c, 4), warm_cache_s=round(w, 4), reprefill_s=round(c - w, 4),
               ratio=round(c / w, 2), cold_all=[round(x, 4) for x in cold], warm_all=[round(x, 4) for x in warm])
    stdout.write(json.dumps(res) + "\n")
    stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
