"""Build the tiny default policy: the character tokenizer plus a small Qwen2 SFT-trained on the
synthetic arithmetic task (megatron_tppo/data/arith.py), saved in Hugging Face format.

    python tools/build_tiny_model.py --out .cache/tiny_sft [--steps N] [--config examples/tiny_cpu.yaml]

* Architecture from the config's ``model`` section (Qwen2: QKV bias, tied embeddings; ``llama``
  for the Llama variant); embedding rows = ``model.vocab_size`` (the tokenizer's 99 entries are
  padded up). fp32 on CPU, ``torch.set_num_threads(2)``.
* SFT on worked solutions of the train split, loss on response tokens only (prompt tokens are
  context). Every problem is fresh (index = step * batch + j), so nothing repeats. Batches are
  drawn 8 at a time and sorted by length so padding stays small despite the long tail.
* The model should end with PARTIAL held-out accuracy (short chains right, long chains often
  wrong) so that RL has something to improve: training stops as soon as a teacher-forced
  exact-match probe on held-out problems reaches ``--target-accuracy``. Measured learning curve
  (lr 1e-3, cosine over 2000 steps): everything but the units digit of each result is learned by
  step ~400, the units digit stays at chance (probe ~0.02) until a sharp transition at steps
  ~850-1000 (probe 0.04 -> 0.40 within 100 steps), so the build stops near step 1000 (~7-8 min on
  2 cores) at ~0.5 greedy accuracy. With lr 2e-3 or 4e-3 the transition had not come by step 1000.
  The held-out accuracy is measured greedily with HF ``generate`` and stored in ``tppo_build.json``.
* Idempotent: when ``--out`` already holds a complete build with the same settings it exits at
  once (``--force`` rebuilds). ``tppo_build.json`` is written last, so a killed build is redone;
  Ctrl-C stops training early but still evaluates and saves (marked ``interrupted``: never reused).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_tppo.config import ModelConfig  # noqa: E402

from megatron_tppo.config_io import load_config  # noqa: E402
from megatron_tppo.data import tokenizer as chartok  # noqa: E402
from megatron_tppo.data.arith import ArithTask, parse_answer  # noqa: E402
from megatron_tppo.data.longtail import LongTailTask, steps_for_length  # noqa: E402

BUILD_FORMAT = 1
MODEL_FILES = ("config.json", "model.safetensors") + chartok.TOKENIZER_FILES


def hf_config(m: ModelConfig):
    """transformers config of the policy described by ``m`` (fp32), with the char tokenizer's ids."""
    import transformers

    from megatron_tppo.weights.hf_config import hf_config_kwargs

    try:
        kw = hf_config_kwargs(m, eos_token_id=chartok.EOS_ID)
    except ValueError as err:  # e.g. qwen2 without Q/K/V bias
        raise SystemExit(str(err)) from None
    kw.update(bos_token_id=chartok.EOS_ID, pad_token_id=chartok.PAD_ID)
    return (transformers.Qwen2Config if m.arch == "qwen2" else transformers.LlamaConfig)(**kw)


def encode_example(problem, with_solution: bool) -> tuple[list[int], int]:
    """Character ids of prompt (+ solution + EOS) and the prompt length (the loss mask boundary)."""
    enc = {c: i for c, i in chartok.VOCAB.items()}
    prompt = [enc.get(c, chartok.UNK_ID) for c in problem.prompt]
    if not with_solution:
        return prompt, len(prompt)
    return prompt + [enc.get(c, chartok.UNK_ID) for c in problem.solution] + [chartok.EOS_ID], len(prompt)


def batches(task: ArithTask, seed: int, batch_size: int, group: int = 8):
    """Endless (input_ids, labels) batches; labels = -100 on prompt and padding."""
    import torch

    rng, index = random.Random(seed), 0
    while True:
        exs = [encode_example(task.problem("train", index + j, seed), True) for j in range(batch_size * group)]
        index += batch_size * group
        exs.sort(key=lambda e: len(e[0]))  # length-sorted groups: little padding
        chunks = [exs[i:i + batch_size] for i in range(0, len(exs), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), chartok.PAD_ID, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for r, (seq, plen) in enumerate(chunk):
                ids[r, :len(seq)] = torch.tensor(seq)
                labels[r, plen:len(seq)] = torch.tensor(seq[plen:])
            yield ids, labels


def teacher_forced_batch(task: ArithTask, n: int, seed: int):
    """A fixed batch of ``n`` distinct held-out problems with solutions (for the exact-match probe)."""
    import torch

    exs = [encode_example(p, True) for p in task.heldout_set(n, seed)]
    width = max(len(ids) for ids, _ in exs)
    ids = torch.full((n, width), chartok.PAD_ID, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for r, (seq, plen) in enumerate(exs):
        ids[r, :len(seq)] = torch.tensor(seq)
        labels[r, plen:len(seq)] = torch.tensor(seq[plen:])
    return ids, labels


def exact_match(logits, labels):
    """Share of rows whose argmax matches every response token given the true prefix.

    If it does, greedy decoding reproduces the worked solution exactly, so this is (a tight lower
    bound of) the greedy accuracy, at the cost of one forward pass instead of a generate loop.
    """
    pred, tgt = logits[:, :-1].argmax(-1), labels[:, 1:]
    ok = (pred == tgt) | (tgt == -100)
    return ok.all(dim=1).float().mean().item()


def train_loop(model, opt, sched, data, bar, probe_ids, probe_labels, args, stats: dict) -> int:
    """SFT steps over ``bar``; ``stats`` (ema loss, tokens, probe, steps) is updated in place so a
    Ctrl-C leaves it current. Returns the number of optimizer steps done."""
    import torch

    stats.update(ema=None, tokens=0, probe=0.0, steps=0)
    t_end = time.time() + args.max_train_s if getattr(args, "max_train_s", 0) > 0 else float("inf")
    for step in bar:
        if time.time() >= t_end:
            break
        if args.target_accuracy > 0 and step > 0 and step % args.probe_every == 0:
            # Stop as soon as the held-out greedy accuracy (exact-match probe) reaches the target:
            # the model must stay PARTIAL, so RL has something to learn.
            model.eval()
            with torch.no_grad():
                mask = (probe_ids != chartok.PAD_ID).long()
                stats["probe"] = exact_match(model(input_ids=probe_ids, attention_mask=mask).logits, probe_labels)
            model.train()
            if stats["probe"] >= args.target_accuracy:
                break
        ids, labels = next(data)
        logits = model(input_ids=ids, attention_mask=(ids != chartok.PAD_ID).long()).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        stats["tokens"] += ids.numel()
        stats["ema"] = loss.item() if stats["ema"] is None else 0.95 * stats["ema"] + 0.05 * loss.item()
        stats["steps"] = step + 1
        bar.set_postfix(loss=f"{stats['ema']:.3f}", heldout_em=f"{stats['probe']:.2f}",
                        lr=f"{sched.get_last_lr()[0]:.1e}")
    return stats["steps"]


def evaluate(model, task: ArithTask, n: int, seed: int, max_new_tokens: int, batch_size: int = 100) -> dict:
    """Greedy accuracy on ``n`` distinct held-out problems (HF generate, left padding)."""
    import torch

    problems = task.heldout_set(n, seed)
    correct: list[tuple[int, bool]] = []
    model.eval()
    for s in range(0, n, batch_size):
        chunk = problems[s:s + batch_size]
        prompts = [encode_example(p, False)[0] for p in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[chartok.PAD_ID] * (width - len(p)) + p for p in prompts])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=chartok.EOS_ID, pad_token_id=chartok.PAD_ID)
        inv = {i: c for c, i in chartok.VOCAB.items()}
        for p, row in zip(chunk, out[:, width:].tolist()):
            text = "".join(inv.get(t, "") for t in row if t not in (chartok.EOS_ID, chartok.PAD_ID))
            correct.append((p.steps, parse_answer(text) == p.answer))
    model.train()
    by_steps: dict[str, list[int]] = {}
    for steps, ok in correct:
        key = "1-2" if steps <= 2 else "3-5" if steps <= 5 else "6+"
        by_steps.setdefault(key, [0, 0])
        by_steps[key][0] += ok
        by_steps[key][1] += 1
    return {"accuracy": sum(ok for _, ok in correct) / len(correct), "prompts": len(correct),
            "by_steps": {k: f"{c}/{t}" for k, (c, t) in sorted(by_steps.items())}}


def init_from(model, src: Path) -> None:
    """Start from another build's weights (e.g. the arith SFT model for the long-tailed task: the same
    per-step arithmetic, longer chains). Every tensor must have the shape the config gives it; the
    context length may differ (RoPE has no position weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True, dtype=torch.float32)
    mine, theirs = model.state_dict(), other.state_dict()
    bad = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape]
    if bad:
        raise SystemExit(f"--init-from {src}: its architecture differs from the config's model section "
                         f"(first mismatch: {bad[0]})")
    model.load_state_dict(theirs, strict=False)


def settings_of(args, cfg) -> dict:
    """Everything that determines the build's bytes (the idempotence key)."""
    m = cfg.model
    return {"format": BUILD_FORMAT, "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
            "lr": args.lr, "eval_prompts": args.eval_prompts, "target_accuracy": args.target_accuracy,
            "probe_every": args.probe_every, "tokenizer_vocab": chartok.VOCAB_SIZE,
            "task": ({"max_steps": cfg.data.arith_max_steps, "continue_prob": cfg.data.arith_continue_prob}
                     if args.task == "arith" else {"name": "longtail", **vars(make_task(args, cfg)),
                                                   "max_train_s": args.max_train_s, "files": args.jsonl_rows}),
            "model": {k: getattr(m, k) for k in ("arch", "num_layers", "hidden_size", "ffn_hidden_size",
                                                 "num_attention_heads", "num_query_groups", "vocab_size",
                                                 "max_position_embeddings", "rope_theta", "norm_epsilon",
                                                 "qkv_bias", "tie_word_embeddings", "init_std")}}


def settings_with_init(args, cfg) -> dict:
    """:func:`settings_of` plus, with ``--init-from``, the settings of the build it starts from."""
    s = settings_of(args, cfg)
    if args.init_from:
        src = Path(args.init_from) / "tppo_build.json"
        if not src.is_file():
            raise SystemExit(f"--init-from {args.init_from}: no complete build there (tppo_build.json missing)")
        s["init_from"] = json.loads(src.read_text())["settings"]
    return s


def make_task(args, cfg):
    """The task the SFT data comes from: the arith default, or the long-tailed variant whose cap is
    ``rollout.max_response_tokens`` (``--task longtail``)."""
    if args.task == "arith":
        return ArithTask(max_steps=cfg.data.arith_max_steps, continue_prob=cfg.data.arith_continue_prob)
    return LongTailTask(max_steps=steps_for_length(cfg.rollout.max_response_tokens))


def write_jsonl(out: Path, task, rows: int, seed: int) -> None:
    """train.jsonl (``rows`` problems) and heldout.jsonl (distinct held-out problems) for the
    ``jsonl`` data task: the RL run's prompts, disjoint by construction (prompt-hash split)."""
    def line(p):
        return json.dumps({"prompt": p.prompt, "answer": p.answer, "steps": p.steps}) + "\n"

    (out / "train.jsonl").write_text("".join(line(task.problem("train", i, seed)) for i in range(rows)))
    (out / "heldout.jsonl").write_text("".join(line(p) for p in task.heldout_set(max(1, rows // 20), seed)))


def existing_build(out: Path, settings: dict) -> dict | None:
    """The recorded build info if ``out`` holds a complete build with exactly ``settings``."""
    info_path = out / "tppo_build.json"
    if not info_path.is_file() or not all((out / f).is_file() for f in MODEL_FILES):
        return None
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError:
        return None
    return info if info.get("settings") == settings and not info.get("interrupted") else None


def build(args) -> dict:
    cfg = load_config(args.config, args.override)
    out = Path(args.out)
    settings = settings_with_init(args, cfg)
    if not args.force and (info := existing_build(out, settings)) is not None:
        print(f"[build_tiny_model] {out} already holds this build "
              f"(held-out accuracy {info['heldout_accuracy']:.2f}); reusing it")
        return info
    if cfg.model.vocab_size < chartok.VOCAB_SIZE:
        raise SystemExit(f"model.vocab_size={cfg.model.vocab_size} < tokenizer vocabulary {chartok.VOCAB_SIZE}")

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, GenerationConfig

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    (out / "tppo_build.json").unlink(missing_ok=True)  # mark incomplete until the end
    chartok.save_tokenizer(out, model_max_length=cfg.model.max_position_embeddings)
    task = make_task(args, cfg)
    model = AutoModelForCausalLM.from_config(hf_config(cfg.model), dtype=torch.float32)
    if args.init_from:
        init_from(model, Path(args.init_from))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    # linear warm-up then cosine decay to 10%: the usual recipe for a short from-scratch run
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, args.steps - warmup))))))
    model.train()
    data = batches(task, args.seed, args.batch_size)
    # seed + 1: the probe that decides when to stop is not the set the accuracy is reported on
    probe_ids, probe_labels = teacher_forced_batch(task, args.eval_prompts, args.seed + 1)
    bar = tqdm(range(args.steps), desc="SFT", mininterval=2.0, disable=args.quiet)
    stats: dict = {}
    interrupted = False
    try:
        train_loop(model, opt, sched, data, bar, probe_ids, probe_labels, args, stats)
    except KeyboardInterrupt:  # Ctrl-C: keep what was learned, but never reuse it as a complete build
        interrupted = True
    ema, tokens, probe, steps_done = stats["ema"], stats["tokens"], stats["probe"], stats["steps"]
    bar.close()
    train_s = time.time() - t0
    result = evaluate(model, task, args.eval_prompts, args.seed, cfg.rollout.max_response_tokens)
    model.generation_config = GenerationConfig(eos_token_id=chartok.EOS_ID, pad_token_id=chartok.PAD_ID,
                                               bos_token_id=chartok.EOS_ID, do_sample=False)
    model.save_pretrained(str(out))
    if args.task == "longtail":
        write_jsonl(out, task, args.jsonl_rows, args.seed)
    info = {"settings": settings, "seed": args.seed, "max_steps": args.steps, "steps": steps_done,
            "stopped_at_target": not interrupted and steps_done < args.steps, "interrupted": interrupted, "heldout_exact_match_probe": probe, "parameters": n_params,
            "final_loss_ema": ema, "train_tokens_padded": tokens, "train_seconds": round(train_s, 1),
            "build_seconds": round(time.time() - t0, 1), "heldout_accuracy": result["accuracy"],
            "heldout_prompts": result["prompts"], "heldout_by_steps": result["by_steps"],
            "tokenizer_vocab": chartok.VOCAB_SIZE, "model_vocab": cfg.model.vocab_size}
    (out / "tppo_build.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"[build_tiny_model] {n_params / 1e6:.2f}M params, {steps_done} steps in {train_s:.0f}s; held-out "
          f"greedy accuracy {result['accuracy']:.2f} on {result['prompts']} prompts {result['by_steps']}; "
          f"saved to {out}")
    return info


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (HF model + tokenizer)")
    ap.add_argument("--config", default=str(ROOT / "examples" / "tiny_cpu.yaml"), help="run config (model section)")
    ap.add_argument("--override", action="append", default=[], help="config override key.sub=value (repeatable)")
    ap.add_argument("--steps", type=int, default=2000, help="most SFT optimizer steps (sets the LR schedule's length)")
    ap.add_argument("--target-accuracy", type=float, default=0.45,
                    help="stop once the held-out exact-match probe reaches this (0: run all --steps)")
    ap.add_argument("--probe-every", type=int, default=25, help="steps between held-out probes")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--eval-prompts", type=int, default=100, help="held-out prompts for the greedy accuracy")
    ap.add_argument("--task", choices=("arith", "longtail"), default="arith",
                    help="SFT data: the arith default, or the long-tailed variant (data/longtail.py; also "
                         "writes train.jsonl/heldout.jsonl beside the model)")
    ap.add_argument("--max-train-s", type=float, default=0.0, help="stop SFT after this many seconds (0: none)")
    ap.add_argument("--jsonl-rows", type=int, default=20000, help="--task longtail: rows of train.jsonl")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--init-from", default=None, help="start from this build's weights (same architecture) "
                                                      "instead of a random initialization")
    ap.add_argument("--force", action="store_true", help="rebuild even if --out holds the same build")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


if __name__ == "__main__":
    build(parse_args())
