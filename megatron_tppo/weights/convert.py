"""HF safetensors <-> megatron torch_dist checkpoint conversion (the library behind tools/convert_*).

Both directions reuse the one name/layout map (:mod:`~megatron_tppo.weights.hf_mapping`), the lazy
HF reader (:func:`~megatron_tppo.weights.hf_io.load_hf_into`), the TP gather
(:func:`~megatron_tppo.weights.gather.iter_full_params`) and :class:`TrainEngine`'s checkpoints.

* Everything that can be checked without megatron is checked first, in the calling process, with
  named errors (:class:`ConvertError`, or :class:`~megatron_tppo.weights.hf_io.HFCheckpointError`):
  unsupported architecture, config/tensor-shape mismatch, layout that does not divide the model,
  missing shard, existing output without ``force``.
* Then ``lcm(tp*pp)`` ranks are spawned (gloo on CPU; torchrun-style env set here), each job is
  run in every rank at its own layout (extra ranks are data-parallel replicas): one launch serves
  many jobs, which is what the tests use.
* megatron -> HF streams: tensors are gathered one at a time, mapped, and their bytes appended to a
  safetensors shard whose header was planned in advance from the parameter shapes (meta tensors
  through the same map), so no shard is ever buffered. Each pipeline stage writes its own shards;
  the caller renames them ``model-0000i-of-0000N.safetensors`` and writes the index.

A checkpoint written here carries ``tppo_convert.json`` (ModelConfig, source, layout, dtype, role)
and ``hf_files/`` (the source's config.json, generation_config.json and tokenizer files), so it
converts back without the HF directory. A critic converts to HF as a CausalLM whose ``lm_head`` is
tied to the embedding (the critic has no LM head) plus ``value_head.safetensors`` (weight [1, H],
bias [1]; outside the index, so transformers and vLLM ignore it; converting that directory back
with ``critic=True`` restores the head).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_tppo.config import ModelConfig
from megatron_tppo.weights.hf_config import hf_config_kwargs, model_config_from_hf
from megatron_tppo.weights.hf_io import HFCheckpoint
from megatron_tppo.weights.hf_mapping import FAMILIES, megatron_to_hf
from megatron_tppo.weights.safetensors_stream import ShardStreamWriter, finish_hf_dir, plan_stage

SIDECAR, EXTRA_DIR, VALUE_HEAD_FILE = "tppo_convert.json", "hf_files", "value_head.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class ConvertError(ValueError):
    """A conversion that cannot work, found before any heavy work (the message names the cause)."""


# ------------------------------------------------------------------ checks (no megatron import)


def check_output(path, force: bool) -> Path:
    """Refuse an existing non-empty output directory unless ``force``."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not force:
        raise ConvertError(f"output {str(path)!r} already exists; pass --force to overwrite it")
    return path


def _reset_output(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def check_layout(m: ModelConfig, tp: int, pp: int) -> None:
    """Every size a TP/PP layout must divide, named."""
    bad = [f"{what}={n} is not divisible by {name}={k}" for what, n, name, k in (
        ("num_attention_heads", m.num_attention_heads, "tp", tp), ("num_query_groups", m.num_query_groups, "tp", tp),
        ("ffn_hidden_size", m.ffn_hidden_size, "tp", tp), ("padded_vocab_size", m.padded_vocab_size, "tp", tp),
        ("num_layers", m.num_layers, "pp", pp)) if k < 1 or n % k]
    if bad:
        raise ConvertError(f"layout tp={tp} pp={pp} does not fit the model: {'; '.join(bad)}")


def expected_hf_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for ``m``, from a transformers model built on the meta device."""
    import transformers

    cfg_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                          "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[m.arch]
    with torch.device("meta"):
        model = model_cls(cfg_cls(**hf_config_kwargs(m)))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_hf_shapes(ckpt: HFCheckpoint, m: ModelConfig) -> None:
    """Compare every tensor's shape (read from the safetensors headers only) with config.json's model."""
    from safetensors import safe_open

    got = {}
    for file in sorted(set(ckpt.files.values())):
        with safe_open(str(file), framework="pt") as f:
            got.update({n: tuple(f.get_slice(n).get_shape()) for n in f.keys() if ckpt.files.get(n) == file})
    want = expected_hf_shapes(m)
    optional = {"lm_head.weight"} if m.tie_word_embeddings else set()
    missing = sorted(set(want) - set(got) - optional)
    extra = sorted(n for n in set(got) - set(want) if not n.endswith("rotary_emb.inv_freq"))
    wrong = sorted(f"{n}: {got[n]} (config.json implies {want[n]})" for n in set(got) & set(want) if got[n] != want[n])
    if missing or extra or wrong:
        parts = [f"{label}: {items[:5]}{' ...' if len(items) > 5 else ''}" for label, items in
                 (("missing tensors", missing), ("unexpected tensors", extra), ("shape mismatch", wrong)) if items]
        raise ConvertError(f"{ckpt.path} does not match its config.json: " + "; ".join(parts))


def read_hf_model(hf_dir, dtype: str = "auto", tp: int = 1, pp: int = 1) -> tuple[ModelConfig, dict]:
    """Validate an HF model directory for conversion at (tp, pp); returns (ModelConfig, config.json)."""
    ckpt = HFCheckpoint(hf_dir)  # names a missing directory, config.json or shard
    cfg = ckpt.config
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        raise ConvertError(f"unsupported architecture model_type={mt!r} (architectures="
                           f"{cfg.get('architectures')}) in {ckpt.path}/config.json; supported: {', '.join(FAMILIES)}")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConvertError(f"unsupported rope scaling {rope} in {ckpt.path}/config.json")
    if cfg.get("use_sliding_window"):
        raise ConvertError(f"unsupported: sliding-window attention in {ckpt.path}/config.json")
    if dtype == "auto":
        dtype = _HF_DTYPE.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"), "fp32")
    if dtype not in DTYPES:
        raise ConvertError(f"dtype must be one of {list(DTYPES)} or auto, got {dtype!r}")
    m = model_config_from_hf(cfg, params_dtype=dtype, hf_path=str(ckpt.path))
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != m.head_size:
        raise ConvertError(f"unsupported: head_dim={head_dim} differs from hidden_size/num_attention_heads="
                           f"{m.head_size} in {ckpt.path}/config.json")
    check_layout(m, tp, pp)
    check_hf_shapes(ckpt, m)
    return m, cfg


def parse_size(text) -> int:
    """'2GB' / '500MB' / '1.5GiB' / 123 -> bytes."""
    s = str(text).strip().upper().replace("IB", "B")
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


# ------------------------------------------------------------------ sidecar and extra files


def write_sidecar(ckpt_dir, m: ModelConfig, **info) -> None:
    (Path(ckpt_dir) / SIDECAR).write_text(json.dumps(
        {"format": 1, "model_config": dataclasses.asdict(m), **info}, indent=1, default=str))


def read_sidecar(ckpt_dir) -> Optional[dict]:
    path = Path(ckpt_dir) / SIDECAR
    return json.loads(path.read_text()) if path.is_file() else None


def model_config_from_dict(d: dict, **overrides) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{**{k: v for k, v in d.items() if k in names}, **overrides})


def copy_extra_files(src, dst, names=TOKENIZER_FILES + ("generation_config.json", "config.json")) -> list[str]:
    """Copy whichever of ``names`` exist in ``src`` to ``dst``; returns the copied names."""
    src, dst = Path(src), Path(dst)
    done = [n for n in names if (src / n).is_file()]
    if done:
        dst.mkdir(parents=True, exist_ok=True)
    for n in done:
        shutil.copy2(src / n, dst / n)
    return done


# ------------------------------------------------------------------ launching ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    warnings.filterwarnings("ignore")  # megatron's Apex/TE fallback notices, once per rank: noise here
    from megatron_tppo.training import destroy_parallel

    try:
        fn(*args)
    finally:
        destroy_parallel()


def run_ranks(fn, world: int, *args) -> None:
    """Run ``fn(*args)`` in ``world`` spawned processes forming one torch.distributed job."""
    import torch.multiprocessing as mp

    try:
        mp.start_processes(_rank_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True,
                           start_method="spawn")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:  # the failing rank's traceback is in the message
        raise RuntimeError(f"a conversion rank failed: {e}") from None


def _write_rank_stats(stats_dir: str, **extra) -> None:
    rank = int(os.environ.get("RANK", "0"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    (Path(stats_dir) / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_bytes": peak, **extra}))


def _read_rank_stats(stats_dir: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(stats_dir).glob("rank*.json"))]


def summarize(stats: dict) -> str:
    """One line: bytes, time, GB/s and the peak RSS of the busiest rank and of this process."""
    gb, sec = stats["bytes"] / 1e9, stats["seconds"]
    peak = max(r["peak_rss_bytes"] for r in stats["ranks"])
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    work = max(r.get("work_seconds", 0.0) for r in stats["ranks"]) or float("nan")
    return (f"converted {gb:.3f} GB in {sec:.1f} s ({gb / sec:.3f} GB/s with {stats['world']} rank(s) and start-up; "
            f"load+write alone {work:.1f} s, {gb / work:.3f} GB/s); peak RSS per rank {peak / 2**20:.0f} MiB, "
            f"launcher {own / 2**20:.0f} MiB")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                mininterval=0.5)


# ------------------------------------------------------------------ HF -> megatron


@dataclass
class HFToMegatronJob:
    """One HF directory -> one torch_dist checkpoint at (tp, pp)."""

    hf_dir: str
    output: str
    tp: int = 1
    pp: int = 1
    dtype: str = "auto"
    """fp32 | bf16 | fp16 | auto (the HF config's dtype)."""
    critic: bool = False
    """Write a critic: same backbone, value head from ``value_head.safetensors`` if present, else fresh."""
    seed: int = 1234


def convert_hf_to_megatron(jobs: list[HFToMegatronJob], *, force: bool = False, device: str = "cpu",
                           progress: bool = True) -> dict:
    """Validate every job, then convert them all in one launch of lcm(tp*pp) ranks. Returns stats."""
    plans = []
    for j in jobs:
        m, _ = read_hf_model(j.hf_dir, j.dtype, j.tp, j.pp)
        plans.append((j, m, check_output(j.output, force)))
    for _, _, out in plans:
        _reset_output(out)
    world = math.lcm(*(j.tp * j.pp for j in jobs))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as stats_dir:
        run_ranks(_hf_to_megatron_rank, world, [(j, m) for j, m, _ in plans], device, progress, stats_dir)
        ranks = _read_rank_stats(stats_dir)
    for j, m, out in plans:
        write_sidecar(out, m, source=str(Path(j.hf_dir).resolve()), tp=j.tp, pp=j.pp, dtype=m.params_dtype,
                      role="critic" if j.critic else "policy")
        copy_extra_files(j.hf_dir, out / EXTRA_DIR)
    nbytes = sum(sum(f.stat().st_size for f in Path(j.hf_dir).glob("*.safetensors")) for j in jobs)
    return {"seconds": time.perf_counter() - t0, "bytes": nbytes, "world": world, "ranks": ranks}


def _hf_to_megatron_rank(plans, device: str, progress: bool, stats_dir: str) -> None:
    from megatron_tppo.config import LayoutConfig, OptimizerConfig
    from megatron_tppo.training import TrainEngine, init_parallel
    from megatron_tppo.weights.hf_io import load_hf_into

    work = 0.0
    for j, m in plans:
        info = init_parallel(j.tp, j.pp, device)
        layout = LayoutConfig(tensor_parallel=j.tp, pipeline_parallel=j.pp, data_parallel=info.dp)
        eng = TrainEngine(m, layout, OptimizerConfig(), role="critic" if j.critic else "policy", device=device,
                          seed=j.seed, with_optimizer=False)
        t0 = time.perf_counter()
        total = sum(p.numel() * p.element_size() for p in eng.module.parameters())
        shown = progress and info.tp_rank == 0 and info.dp_rank == 0
        with _progress(2 * total, f"{Path(j.output).name} stage {info.pp_rank}: load+save", shown) as bar:
            n = load_hf_into(eng.module, j.hf_dir, m, skip_prefixes=("output_layer.",) if j.critic else ())
            head = Path(j.hf_dir) / VALUE_HEAD_FILE
            if j.critic and info.is_last_stage and head.is_file():
                from safetensors.torch import load_file

                with torch.no_grad():
                    for k, v in load_file(str(head)).items():
                        getattr(eng.module.output_layer, k.split(".")[-1]).copy_(v)
            bar.set_postfix(tensors=n)
            bar.update(total)
            eng.save(j.output, with_optimizer=False)
            bar.update(total)
        work += time.perf_counter() - t0
        del eng
    _write_rank_stats(stats_dir, work_seconds=work)


# ------------------------------------------------------------------ megatron -> HF


@dataclass
class MegatronToHFJob:
    """One torch_dist checkpoint -> one HF directory, loaded at (tp, pp)."""

    checkpoint: str
    output: str
    tp: int = 1
    pp: int = 1
    dtype: Optional[str] = None
    """Output dtype; None keeps the checkpoint's."""
    hf_config: Optional[str] = None
    """An HF directory whose config.json describes the model (needed without ``tppo_convert.json``)."""
    max_shard_size: int = 2 * 10**9


def _resolve_checkpoint(j: MegatronToHFJob) -> tuple[ModelConfig, str, str, Optional[Path]]:
    """(ModelConfig at the checkpoint's dtype, role, output dtype, dir with extra files)."""
    ckpt = Path(j.checkpoint)
    if not (ckpt / "metadata.json").is_file():
        raise ConvertError(f"{str(ckpt)!r} is not a torch_dist checkpoint (no metadata.json)")
    side = read_sidecar(ckpt)
    if j.hf_config is not None:
        hf = Path(j.hf_config)
        cfg = json.loads((hf / "config.json" if hf.is_dir() else hf).read_text())
        if cfg.get("model_type") not in FAMILIES:
            raise ConvertError(f"unsupported architecture model_type={cfg.get('model_type')!r} in {j.hf_config}")
        dtype = j.dtype or (side or {}).get("dtype") or "fp32"
        m, extra = model_config_from_hf(cfg, params_dtype=(side or {}).get("dtype", dtype)), hf if hf.is_dir() else None
    elif side is not None:
        m, extra = model_config_from_dict(side["model_config"]), ckpt / EXTRA_DIR
        dtype = j.dtype or side["dtype"]
    else:
        raise ConvertError(f"{ckpt} has no {SIDECAR}: pass --hf-config with the model's config.json directory")
    if dtype not in DTYPES:
        raise ConvertError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    role = (side or {}).get("role")
    if role is None:
        from megatron.core import dist_checkpointing

        role = dist_checkpointing.load_common_state_dict(str(ckpt)).get("role", "policy")
    check_layout(m, j.tp, j.pp)
    return m, role, dtype, extra


def convert_megatron_to_hf(jobs: list[MegatronToHFJob], *, force: bool = False, device: str = "cpu",
                           progress: bool = True) -> dict:
    """Validate every job, convert them all in one launch of lcm(tp*pp) ranks. Returns stats."""
    plans = [(j, *_resolve_checkpoint(j), check_output(j.output, force)) for j in jobs]
    for *_, out in plans:
        _reset_output(out)
        out.mkdir(parents=True)
    world = math.lcm(*(j.tp * j.pp for j in jobs))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as stats_dir:
        run_ranks(_megatron_to_hf_rank, world, [(j, m, role, dtype) for j, m, role, dtype, _, _ in plans],
                  device, progress, stats_dir)
        ranks = _read_rank_stats(stats_dir)
    nbytes = 0
    for j, m, role, dtype, extra, out in plans:
        nbytes += finish_hf_dir(out, j.pp)
        orig = json.loads((extra / "config.json").read_text()) if extra and (extra / "config.json").is_file() else {}
        write_hf_config(out, dataclasses.replace(m, tie_word_embeddings=m.tie_word_embeddings or role == "critic"),
                        dtype, orig)
        if extra is not None:
            copy_extra_files(extra, out, TOKENIZER_FILES + ("generation_config.json",))
    return {"seconds": time.perf_counter() - t0, "bytes": nbytes, "world": world, "ranks": ranks}


def write_hf_config(out, m: ModelConfig, dtype: str, original: dict) -> None:
    """config.json (+ generation_config.json) for ``m``; token ids come from the original config."""
    import transformers

    kw = hf_config_kwargs(m, eos_token_id=original.get("eos_token_id"))
    kw.update({k: original[k] for k in ("bos_token_id", "pad_token_id") if k in original})
    kw["dtype"] = {v: k for k, v in _HF_DTYPE.items()}[dtype]
    name = {"qwen2": "Qwen2", "llama": "Llama"}[m.arch]
    cfg = getattr(transformers, f"{name}Config")(**kw)
    cfg.architectures = [f"{name}ForCausalLM"]
    cfg.save_pretrained(out)
    transformers.GenerationConfig.from_model_config(cfg).save_pretrained(out)


def stream_stage_to_hf(eng, m: ModelConfig, info, out_dir, dtype: str, max_shard_size: int,
                       progress: bool = False) -> None:
    """Collective over one TP group: gather this stage tensor by tensor, write its HF shards.

    The writing rank (tp_rank 0, dp_rank 0) leaves ``part-<stage>-*.safetensors`` and
    ``part-<stage>.json`` in ``out_dir`` (and a critic's value head); :func:`finish_hf_dir` joins
    the stages. ``info`` is the :class:`~megatron_tppo.training.ParallelInfo` of this rank.
    """
    from megatron_tppo.weights.gather import iter_full_params

    out_dir, out_dtype, critic = Path(out_dir), DTYPES[dtype], eng.role == "critic"
    writer = info.tp_rank == 0 and info.dp_rank == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    w = ShardStreamWriter(out_dir, f"part-{info.pp_rank:03d}", plan_stage(eng.module, m, info.tp, out_dtype, critic),
                          out_dtype, max_shard_size)
    with _progress(w.total_bytes, f"{out_dir.name} stage {info.pp_rank}", progress and writer) as bar:
        for name, t in iter_full_params(eng.module, eng.tp_group, include_output_layer=not critic, dtype=out_dtype):
            for hf_name, ht in megatron_to_hf(name, t, m):
                if writer:
                    bar.update(w.write(hf_name, ht))
                    bar.set_postfix(tensors=w.written, refresh=False)
    if not writer:
        return
    (out_dir / f"part-{info.pp_rank:03d}.json").write_text(json.dumps(w.finish()))
    if critic and info.is_last_stage:
        from safetensors.torch import save_file

        head = eng.module.output_layer
        save_file({"value_head.weight": head.weight.detach().to(out_dtype).contiguous(),
                   "value_head.bias": head.bias.detach().to(out_dtype).contiguous()}, str(out_dir / VALUE_HEAD_FILE))


def _megatron_to_hf_rank(plans, device: str, progress: bool, stats_dir: str) -> None:
    from megatron_tppo.config import LayoutConfig, OptimizerConfig
    from megatron_tppo.training import TrainEngine, init_parallel

    work = 0.0
    for j, m, role, dtype in plans:
        info = init_parallel(j.tp, j.pp, device)
        layout = LayoutConfig(tensor_parallel=j.tp, pipeline_parallel=j.pp, data_parallel=info.dp)
        eng = TrainEngine(m, layout, OptimizerConfig(), role=role, device=device, with_optimizer=False)
        t0 = time.perf_counter()
        eng.load(j.checkpoint, with_optimizer=False)
        stream_stage_to_hf(eng, m, info, j.output, dtype, j.max_shard_size, progress)
        work += time.perf_counter() - t0
        del eng
    _write_rank_stats(stats_dir, work_seconds=work)
