"""Numerical parity of one model across HF transformers, megatron-core (any TP/PP) and vLLM.

    python tools/check_parity.py --hf-dir HF --tp 2 --pp 1 [--checkpoint CKPT] [--vllm] [--tol 1e-4]
    python tools/check_parity.py --hf-dir HF --layouts 1x1,2x1,1x2 --vllm      # several layouts, one launch
    python tools/check_parity.py --hf-dir HF --layouts 2x1,1x2 --vllm-tp 2     # a TP=2 vLLM engine
    python tools/check_parity.py --hf-dir HF --vllm-tp 2 --transport ipc        # the sync over ipc

* HF: transformers' CausalLM from --hf-dir (fp32), the reference.
* megatron: the policy at each layout, in its own tp*pp processes (lcm over --layouts; extra ranks
  are data-parallel replicas), loaded from --hf-dir (load_hf_into) or from --checkpoint (a
  torch_dist checkpoint, resharded on load: this checks a conversion). Log-probs come from
  TrainEngine.forward; logits from a plain forward whose TP-sharded vocabulary is gathered here.
* vLLM (--vllm, or --vllm-tp N for an engine with N worker processes): started with random weights
  (``load_format="dummy"``; --hf-dir gives the config), then loaded with each layout's megatron
  weights through the run's own sync path: one transfer group per pipeline stage (--transport:
  gloo, or ipc, which shares the senders' buckets in place; megatron_tppo/weights/ipc.py)
  (megatron_tppo.weights.transfer.StageSender on the ranks; the engine workers' receive path,
  VLLMEngine.join_weight_transfer / receive_weights), so a broken sync or a corrupt checkpoint
  shows. Only the orchestration differs from a run's (no Ray: each stage sender publishes its
  rendezvous port, which the OS picked, through a file).

The same random token sequences go through all of them. Prints a table of max/mean |Δ log-prob|
(tokens 1..T-1) and |Δ logit|, then, as the LAST line, the worst max |Δ|; exits 1 above --tol.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tppo.weights.convert import ConvertError, read_hf_model, run_ranks  # noqa: E402
from megatron_tppo.weights.hf_io import HFCheckpointError  # noqa: E402


def _megatron_logits(eng, tokens: torch.Tensor, device: str) -> torch.Tensor:
    """Full-vocabulary logits [B, T, V_pad] on the last stage (None elsewhere); collective over PP and TP."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, t = tokens.shape
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    tokens = tokens.to(dev)
    captured = []

    def loss_func(output):
        captured.append(output.detach().float())
        return output.new_zeros(()), {}

    def step(data_iterator, model):
        next(data_iterator)
        pos = torch.arange(t, device=dev).expand(b, t)
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=dev), diagonal=1)[None, None]
        return model(tokens, pos, mask if device == "cpu" else None), loss_func

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=[eng.model],
                                num_microbatches=1, seq_length=t, micro_batch_size=b, forward_only=True)
    if not eng.is_last_stage:
        return None
    local = captured[0]
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(eng.tp_group))]
    dist.all_gather(parts, local.contiguous(), group=eng.tp_group)
    return torch.cat(parts, dim=-1)


def _parity_rank(layouts, m, hf_dir, checkpoint, tokens, out_dir, sync, device) -> None:
    """One rank: every layout in turn; with ``sync`` (``{"world_size", "bucket_bytes", "timeout_s",
    "backend"}``) each layout's weights go to the engine afterwards. Each stage's sender opens its
    rendezvous on a port the OS picks and publishes it (:func:`_publish_port`), so no port chosen in
    advance can be taken by another process in between."""
    import torch.distributed as dist

    from megatron_tppo.config import LayoutConfig, OptimizerConfig
    from megatron_tppo.training import TrainEngine, init_parallel
    from megatron_tppo.weights.hf_io import load_hf_into
    from megatron_tppo.weights.transfer import StageSender

    for i, (tp, pp) in enumerate(layouts):
        info = init_parallel(tp, pp, device)
        layout = LayoutConfig(tensor_parallel=tp, pipeline_parallel=pp, data_parallel=info.dp)
        eng = TrainEngine(m, layout, OptimizerConfig(), role="policy", device=device, with_optimizer=False)
        if checkpoint:
            eng.load(checkpoint, with_optimizer=False)
        else:
            load_hf_into(eng.module, hf_dir, m)
        logp = eng.forward({"tokens": tokens, "attention_mask": torch.ones_like(tokens)})["logprobs"].cpu()
        logits = _megatron_logits(eng, tokens, device)
        if info.is_last_stage and info.tp_rank == 0 and info.dp_rank == 0:
            torch.save({"logprobs": logp, "logits": logits[..., : m.vocab_size].cpu()}, f"{out_dir}/tp{tp}pp{pp}.pt")
        if sync:
            sender = StageSender(eng.module, eng.tp_group, tp, m, is_sender=info.tp_rank == 0 and info.dp_rank == 0,
                                 takes_part=info.dp_rank == 0, dtype=torch.float32)
            if sender.is_sender:
                _publish_port(out_dir, i, info.pp_rank, sender.open("127.0.0.1", sync["timeout_s"])[1])
                sender.join(sync["backend"], sync["world_size"], sync["timeout_s"], {}, f"stage {info.pp_rank}")
            sender.send(sync["bucket_bytes"])
            sender.close()
        dist.barrier()  # the next layout re-creates the model-parallel groups on every rank
        del eng


def _publish_port(out_dir: str, layout: int, stage: int, port: int) -> None:
    tmp = Path(out_dir) / f".port_{layout}_{stage}.tmp"
    tmp.write_text(str(port))
    tmp.replace(Path(out_dir) / f"port_{layout}_{stage}")  # atomic: a reader sees all of it or nothing


def _published_ports(out_dir: str, layout: int, stages: int, ranks: "_Background", timeout_s: float) -> list[int]:
    """The ports layout ``layout``'s stage senders published; a failed rank is raised at once."""
    files = [Path(out_dir) / f"port_{layout}_{stage}" for stage in range(stages)]
    deadline = time.monotonic() + timeout_s
    while not all(f.is_file() for f in files):
        if not ranks.alive():
            ranks.join()  # re-raises the ranks' error
            raise RuntimeError(f"the megatron ranks ended without opening layout {layout}'s weight transfer")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the megatron ranks opened no weight transfer for layout {layout} in {timeout_s:g} s")
        time.sleep(0.05)
    return [int(f.read_text()) for f in files]


def _vllm_logprobs(engine, layouts, tokens, sync, out_dir: str, ranks: "_Background") -> dict:
    """Engine side of the sync: per layout, join its stages' groups, receive, score the tokens."""
    out = {}
    for version, (tp, pp) in enumerate(layouts, start=1):
        ports = _published_ports(out_dir, version - 1, pp, ranks, sync["timeout_s"])
        groups = [dict(backend=sync["backend"], host="127.0.0.1", port=port, world_size=sync["world_size"],
                       timeout_s=sync["timeout_s"]) for port in ports]
        engine.join_weight_transfer({r: [dict(g, rank=1 + r) for g in groups]
                                     for r in range(sync["world_size"] - 1)})
        engine.receive_weights(version)
        engine.close_weight_transfer()
        out[(tp, pp)] = torch.tensor(engine.prompt_logprobs(tokens.tolist()))
    return out


def _hf_reference(hf_dir: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()
    return logits, _token_logprobs(logits, tokens)


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, T-1]: log p(token t | tokens < t) for t >= 1."""
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]


def _stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.double() - b.double()).abs()
    return d.max().item(), d.mean().item()


def parse_layouts(a) -> list[tuple[int, int]]:
    if a.layouts:
        return [tuple(int(x) for x in s.lower().split("x")) for s in a.layouts.split(",")]
    return [(a.tp, a.pp)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf-dir", required=True, help="HF model directory: the reference (and vLLM's start)")
    ap.add_argument("--checkpoint", default=None, help="torch_dist checkpoint to check instead of loading --hf-dir")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--layouts", default=None, help="several layouts in one launch, e.g. 1x1,2x1,1x2 (TPxPP)")
    ap.add_argument("--vllm", action="store_true", help="also compare a vLLM engine synced from megatron")
    ap.add_argument("--vllm-tp", type=int, default=None,
                    help="vLLM tensor-parallel size (worker processes; implies --vllm; default 1)")
    ap.add_argument("--transport", default="gloo", choices=["gloo", "ipc"],
                    help="weight-sync transport into vLLM (rollout.weight_transport; nccl needs a run's GPUs)")
    ap.add_argument("--bucket-mb", type=float, default=16.0, help="size bound of one weight-sync bucket (MiB)")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest allowed max |Δ| (log-prob and logit)")
    ap.add_argument("--num-seqs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = ap.parse_args(argv)
    layouts = parse_layouts(a)
    vllm_tp = a.vllm_tp or 1
    use_vllm = a.vllm or a.vllm_tp is not None
    try:
        if vllm_tp < 1:
            raise ConvertError(f"--vllm-tp must be >= 1, got {vllm_tp}")
        for tp, pp in layouts:
            m, _ = read_hf_model(a.hf_dir, "fp32", tp, pp)
    except (ConvertError, HFCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seq_len = min(a.seq_len, m.max_position_embeddings - 1)
    tokens = torch.randint(0, m.vocab_size, (a.num_seqs, seq_len), generator=torch.Generator().manual_seed(a.seed))
    ref_logits, ref_logp = _hf_reference(a.hf_dir, tokens)
    rows = []  # (comparison, max |Δ logp|, mean |Δ logp|, max |Δ logit|, mean |Δ logit|)
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    engine, vllm = None, {}
    with tempfile.TemporaryDirectory(dir=shm, prefix="tppo_parity_") as out:
        world = math.lcm(*(tp * pp for tp, pp in layouts))
        sync = None
        if use_vllm:
            from megatron_tppo.rollout.vllm_backend import VLLMEngine

            # started first (a vLLM that cannot start fails before any rank waits for it), from
            # random weights: every number it reports afterwards came through the sync
            engine = VLLMEngine(a.hf_dir, max_model_len=seq_len + 1, max_num_seqs=max(a.num_seqs, 1),
                                tensor_parallel=vllm_tp, load_format="dummy")
            sync = {"world_size": 1 + vllm_tp, "bucket_bytes": max(1, int(a.bucket_mb * 2**20)), "timeout_s": 300.0,
                    "backend": a.transport}
        ranks = _Background(run_ranks, _parity_rank, world, layouts, m, a.hf_dir, a.checkpoint, tokens, out, sync,
                            a.device)
        try:
            if engine is not None:
                vllm = _vllm_logprobs(engine, layouts, tokens, sync, out, ranks)
            ranks.join()
        finally:
            if engine is not None:
                engine.shutdown()
        meg = {}
        for tp, pp in layouts:
            res = torch.load(f"{out}/tp{tp}pp{pp}.pt")
            meg[(tp, pp)] = res["logprobs"][:, 1:]
            rows.append((f"megatron tp{tp}pp{pp} vs HF", *_stats(meg[(tp, pp)], ref_logp),
                         *_stats(res["logits"], ref_logits)))
        name = "vLLM" if vllm_tp == 1 else f"vLLM(tp{vllm_tp})"
        for (tp, pp), v in vllm.items():
            rows.append((f"{name}<-megatron tp{tp}pp{pp} vs HF", *_stats(v, ref_logp), math.nan, math.nan))
            rows.append((f"{name}<-megatron tp{tp}pp{pp} vs megatron", *_stats(v, meg[(tp, pp)]), math.nan, math.nan))
    print(f"{a.num_seqs} sequences x {seq_len} tokens, fp32; |Δ| over tokens 1..{seq_len - 1} (logits: full vocabulary)")
    print(f"{'comparison':<40} {'max|Δlogp|':>11} {'mean|Δlogp|':>11} {'max|Δlogit|':>11} {'mean|Δlogit|':>12}")
    for name, *vals in rows:
        print(f"{name:<40} " + " ".join(f"{v:>11.3e}" if not math.isnan(v) else f"{'-':>11}" for v in vals))
    worst = max(v for r in rows for v in (r[1], r[3]) if not math.isnan(v))
    print(f"worst max |Δ| = {worst:.3e} (tol {a.tol:.1e}, {'OK' if worst <= a.tol else 'FAIL'})")
    return 0 if worst <= a.tol else 1


class _Background:
    """``fn(*args)`` in a thread; :meth:`join` waits and re-raises its exception."""

    def __init__(self, fn, *args):
        import threading

        self.error = None

        def target():
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to join()
                self.error = e

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


if __name__ == "__main__":
    sys.exit(main())
