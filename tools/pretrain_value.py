"""Value pretraining (VAPO-style): fit the critic to the fixed SFT policy's returns, once, offline.

    python tools/pretrain_value.py --model .cache/tiny_sft [--config examples/tiny_cpu.yaml]

Writes ``<model>/value_critic/`` (a torch_dist critic checkpoint, loadable at any layout with
``checkpoint.load_critic``) and ``tppo_value.json`` in it. Without it, an RL run starts its critic
from the SFT backbone with a fresh head and has to spend ``algorithm.critic_warmup_steps`` whole
steps (generation included) with the policy frozen, inside the run's time budget; with it, RL
starts with a critic that already explains the returns and the warm-up can be 0.

What it does, with the run config's own settings (so the data is what RL's first steps would see):
1. samples ``--prompts`` training prompts (the RL prompt stream's split and template, its own seed)
   x ``rollout.samples_per_prompt`` responses from the SFT model with the run's rollout engine
   (vLLM, in a child process; ``rollout``'s temperature, top-p and ``max_response_tokens``);
2. scores them with the run's reward (``overlong_penalty`` for a response that hits the cap, as the
   loop does);
3. trains the project's megatron critic (``TrainEngine(role="critic")`` on the SFT backbone with a
   fresh head) with exactly the RL critic update: per batch of ``--batch`` responses a forward for
   the old values, ``critic_batch`` targets (``algorithm.gamma``, ``critic_lambda``) and one
   ``critic_objective`` step (``value_clip``) at ``optim.critic``'s learning rate, ``--passes``
   times over the data;
4. reports the explained variance of the returns on held-out responses (10% of the prompt groups,
   never trained on), before and after.

Idempotent: reruns with the same settings and the same SFT build exit at once (``--force``).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMAT = 1


def _generate_child(model_dir: str, cfg, prompts: list, seed: int, conn) -> None:
    """Child process: the RL run's own engine (``rollout.backend``) samples the responses."""
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the console is for people
    try:
        from megatron_tppo.rollout import engine_class
        from megatron_tppo.rollout.base import Sampling

        r = cfg.rollout
        engine = engine_class(r.backend).from_config(model_dir, r, cfg.model)
        res = engine.generate(prompts, r.max_response_tokens, Sampling(r.temperature, r.top_p, seed),
                              n=r.samples_per_prompt)
        conn.send([(g.token_ids, g.finish_reason) for g in res])
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(err)
    finally:
        conn.close()


def sample_responses(model_dir: Path, cfg, n_prompts: int, seed: int) -> list[dict]:
    """``n_prompts`` x samples_per_prompt SFT responses: {"group", "prompt_ids", "response_ids", "reward"}.

    Sampled by the run's rollout engine in a child process (vLLM and the megatron trainer of this
    process stay apart), with the run's temperature, top-p and length cap.
    """
    import multiprocessing as mp

    from megatron_tppo.data.datasets import build_prompt_stream, reward_name
    from megatron_tppo.data.tokenizer import load_tokenizer, make_encoder
    from megatron_tppo.rewards import make_safe_reward

    d = cfg.data
    tok = load_tokenizer(model_dir)
    reward = make_safe_reward(reward_name(d), d.reward_timeout_s)
    stream = build_prompt_stream(d, make_encoder(tok), seed)
    prompts = [next(stream) for _ in range(n_prompts)]
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_generate_child, args=(str(model_dir), cfg, [p.prompt_ids for p in prompts], seed, send))
    child.start()
    send.close()
    try:
        got = recv.recv()
    except EOFError:  # the child died without a word (killed, out of memory, a crash in native code)
        child.join()
        raise SystemExit(f"[pretrain_value] the sampling process died (exit code {child.exitcode})") from None
    child.join()
    if isinstance(got, BaseException):
        raise SystemExit(f"[pretrain_value] sampling failed: {got!r}")
    k = cfg.rollout.samples_per_prompt
    out: list[dict] = []
    for i, (resp, finish) in enumerate(got):
        p = prompts[i // k]
        capped = finish != "stop"
        score = reward(tok.decode(resp, skip_special_tokens=True), p.meta).score
        out.append({"group": i // k, "prompt_ids": p.prompt_ids, "response_ids": list(resp),
                    "reward": score - (cfg.algorithm.overlong_penalty if capped else 0.0), "capped": capped})
    return out


def _context(batch: list[dict]) -> dict:
    from megatron_tppo.algorithms.tppo_batch import pad_token_rows, row_attention_mask

    rows = [s["prompt_ids"] + s["response_ids"] for s in batch]
    width = max(len(x) for x in rows)
    return {"tokens": pad_token_rows(rows, width), "attention_mask": row_attention_mask(rows, width)}


def critic_rows(engine, batch: list[dict], cfg) -> dict:
    """The RL critic update's batch for these responses: old values from a forward, EGAE targets."""
    from megatron_tppo.algorithms.tppo_batch import ResponseInput, critic_batch

    values = engine.forward(_context(batch))["values"]
    resp = []
    for i, s in enumerate(batch):
        a, n = len(s["prompt_ids"]), len(s["response_ids"])
        resp.append(ResponseInput(s["prompt_ids"] + s["response_ids"], a, values[i, a:a + n].tolist(), s["reward"]))
    a = cfg.algorithm
    return critic_batch(resp, gamma=a.gamma, lam=a.critic_lambda)


def explained_variance(engine, data: list[dict], cfg, batch: int) -> float:
    """1 - Var(R - V) / Var(R) over every response token of ``data`` (R: the critic targets)."""
    import torch

    errs, rets = [], []
    for s in range(0, len(data), batch):
        b = critic_rows(engine, data[s:s + batch], cfg)  # its old values are the critic's current ones
        m = b["loss_mask"].bool()
        rets.append(b["returns"][m])
        errs.append((b["returns"] - b["old_values"])[m])
    r, e = torch.cat(rets), torch.cat(errs)
    return float(1 - e.var() / r.var()) if r.var() > 1e-12 else 0.0


def settings_of(args, cfg, sft_info: dict) -> dict:
    a, r = cfg.algorithm, cfg.rollout
    return {"format": FORMAT, "prompts": args.prompts, "passes": args.passes, "batch": args.batch, "seed": args.seed,
            "sft": {k: sft_info.get(k) for k in ("settings", "steps", "heldout_accuracy")},
            "rollout": {k: getattr(r, k) for k in ("samples_per_prompt", "temperature", "top_p", "max_response_tokens")},
            "algorithm": {k: getattr(a, k) for k in ("gamma", "critic_lambda", "value_clip", "overlong_penalty")},
            "lr": cfg.optim.critic.lr, "data": {"task": cfg.data.task, "train_path": cfg.data.train_path}}


def pretrain(args) -> dict:
    from megatron_tppo.config_io import load_config

    cfg = load_config(args.config, args.override + [f"model.hf_path={args.model}"])
    model_dir = Path(args.model)
    out = Path(args.out) if args.out else model_dir / "value_critic"
    build_json = model_dir / "tppo_build.json"
    if not build_json.is_file():
        raise SystemExit(f"{build_json}: no complete SFT build here (run tools/build_tiny_model.py first)")
    settings = settings_of(args, cfg, json.loads(build_json.read_text()))
    info_path = out / "tppo_value.json"
    if not args.force and info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("settings") == settings:
            print(f"[pretrain_value] {out} already holds this critic (held-out explained variance "
                  f"{info['explained_variance_after']:.2f}); reusing it")
            return info

    import warnings

    import torch

    from megatron_tppo.algorithms.objectives import critic_objective
    from megatron_tppo.config import LayoutConfig
    from megatron_tppo.training import TrainEngine, destroy_parallel, init_parallel
    from megatron_tppo.weights.hf_io import load_hf_into

    warnings.filterwarnings("ignore")  # megatron-core's CPU-path notices
    t0 = time.time()
    torch.set_num_threads(args.threads)
    info_path.unlink(missing_ok=True)  # incomplete until the end
    data = sample_responses(model_dir, cfg, args.prompts, args.seed)
    t_sample = time.time() - t0
    groups = sorted({s["group"] for s in data})
    held = set(groups[-max(1, len(groups) // 10):])
    train = [s for s in data if s["group"] not in held]
    heldout = [s for s in data if s["group"] in held]
    steps = args.passes * -(-len(train) // args.batch)
    init_parallel(1, 1, "cpu")
    try:
        layout = LayoutConfig(micro_batch_tokens=cfg.parallel.critic.micro_batch_tokens)
        engine = TrainEngine(cfg.model, layout, cfg.optim.critic, role="critic", device="cpu", seed=cfg.seed + 1,
                             total_steps=steps)
        load_hf_into(engine.module, model_dir, cfg.model, skip_prefixes=("output_layer.",))
        engine.weights_changed()
        ev_before = explained_variance(engine, heldout, cfg, args.batch)
        rng = random.Random(args.seed)
        loss = lambda o, mb, n: critic_objective(o, mb, n, value_clip=cfg.algorithm.value_clip)  # noqa: E731
        for p in range(args.passes):
            order = train[:]
            rng.shuffle(order)
            for s in range(0, len(order), args.batch):
                b = critic_rows(engine, order[s:s + args.batch], cfg)
                n = float(b.pop("num_tokens"))
                engine.train_step(b, loss, n)
            print(f"[pretrain_value] pass {p + 1}/{args.passes}: {time.time() - t0:.0f}s", flush=True)
        ev_after = explained_variance(engine, heldout, cfg, args.batch)
        out.mkdir(parents=True, exist_ok=True)
        engine.save(str(out), with_optimizer=False)
    finally:
        destroy_parallel()
    rewards = [s["reward"] for s in data]
    info = {"settings": settings, "responses": len(data), "train_responses": len(train),
            "heldout_responses": len(heldout), "critic_steps": steps,
            "reward_mean": sum(rewards) / len(rewards), "capped": sum(s["capped"] for s in data),
            "explained_variance_before": ev_before, "explained_variance_after": ev_after,
            "sample_seconds": round(t_sample, 1), "seconds": round(time.time() - t0, 1)}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"[pretrain_value] {len(data)} SFT responses (reward mean {info['reward_mean']:.2f}), {steps} critic "
          f"steps in {info['seconds']:.0f}s; held-out explained variance {ev_before:.2f} -> {ev_after:.2f}; "
          f"saved to {out}")
    return info


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="SFT model directory (tools/build_tiny_model.py --out)")
    ap.add_argument("--out", default=None, help="critic checkpoint directory (default: <model>/value_critic)")
    ap.add_argument("--config", default=str(ROOT / "examples" / "tiny_cpu.yaml"), help="run config")
    ap.add_argument("--override", action="append", default=[], help="config override key.sub=value (repeatable)")
    ap.add_argument("--prompts", type=int, default=192, help="training prompts to sample (x samples_per_prompt)")
    ap.add_argument("--passes", type=int, default=2, help="passes over the sampled responses")
    ap.add_argument("--batch", type=int, default=64, help="responses per critic step")
    ap.add_argument("--seed", type=int, default=4321, help="prompt order and sampling seed (not the RL run's)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--force", action="store_true", help="retrain even if the same critic exists")
    return ap.parse_args(argv)


if __name__ == "__main__":
    pretrain(parse_args())
