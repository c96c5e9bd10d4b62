"""vLLM rollout backend: a ``vllm.LLM`` driven with token ids.

Workers: ``tensor_parallel=1`` on CPU runs the engine inside this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``; 3-5 s to start instead of 24-47 s). ``tensor_parallel > 1``
runs vLLM's multiprocess executor (``distributed_executor_backend="mp"``, explicit so that vLLM
does not pick its Ray executor inside a placement group): one worker process per TP rank, on CPU
each bound to its own cores (``VLLM_CPU_OMP_THREADS_BIND="0|1"`` style, from this process's
allowed cores; :func:`cpu_bind_mask`). On GPU vLLM's default (engine core in its own process) is
left alone. CPU runs fp32 (bf16 matmul is ~700x slower there), eager, with a KV cache of
``VLLM_CPU_KVCACHE_SPACE`` GiB; the CPU attention kernels need a head size >= 32, checked before
vLLM starts.

Weights: every worker carries :class:`~megatron_tppo.rollout.vllm_ext.WeightReceiverExtension`
(``worker_extension_cls``). A run's sync joins one transfer group per policy pipeline stage
(:meth:`join_weight_transfer`) and receives straight from the trainers (:meth:`receive_weights`;
:mod:`megatron_tppo.controller.weight_sync` orchestrates). :meth:`load_weights` takes (HF name,
tensor) pairs held by this process: in-process it hands them to ``reload_weights`` as an iterator;
with worker processes (RPC arguments are serialized, an iterator cannot travel) it broadcasts them
over a local gloo group to the workers' same receive path. Either way vLLM reloads HF-named tensors
layer by layer into the live model (re-running its per-layer processing, e.g. the oneDNN repacking
on CPU, which is why ``model.load_weights`` alone fails there) and then the prefix cache is reset
so no KV computed with old weights is reused. A tied model's ``lm_head.weight`` is fed along with
the embedding (:func:`~megatron_tppo.rollout.vllm_common.with_tied_lm_head`). vLLM buffers a
layer until *all* its tensors arrived; :mod:`megatron_tppo.weights.buckets` keeps each layer's
tensors in one bucket.

Sleep (colocated GPUs): :meth:`sleep` defaults to level 2. vLLM's level 2 discards the weights
and the KV cache (it keeps only model buffers, copied to host, and its runtime state); level 1
would first copy every weight to host memory. Every sync reloads every weight, so that copy is
wasted: the order is ``wake_up(["weights"])`` -> sync -> ``wake_up(["kv_cache"])`` -> generate ->
``sleep()``. After a level-2 sleep the engine refuses to generate until weights were loaded
again (a step that skips the sync must sleep at level 1). On CPU vLLM's sleep does nothing; the
same state is tracked so the same order is enforced.

Behaviour log-probs: vLLM's default ``logprobs_mode="raw_logprobs"`` reports log-softmax of the
*raw* logits, i.e. the temperature-1 model distribution, even when sampling at another temperature
or with top_p. We default to ``"processed"`` (``processed_logprobs``): log-softmax after temperature
and top-p masking, i.e. the distribution the token was really drawn from, which is what the PPO
ratio's denominator needs. At temperature 1 and top_p 1 (the T-PPO setting) both modes are the
same number: the policy's own log-prob. The trainer scores tokens at the same temperature
(``RolloutConfig.logprob_temperature``). vLLM 0.32's order (vllm/v1/sample/sampler.py) is logits
-> penalties -> / temperature -> min-p -> top-k/top-p (the rest set to -inf) -> log_softmax, so
with top_p < 1 a processed log-prob is log p_T(token) - log(nucleus mass): the trainer cannot
reproduce that without the nucleus, and the config refuses top_p < 1 with processed log-probs
(measured on a tiny model: an on-policy ratio of 0.90 at top_p 0.9). Greedy (temperature 0)
results report the temperature-1 log-probs in both modes. (On GPU, FlashInfer's top-p sampler
cannot return processed log-probs; vLLM then uses its native sampler.)
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence, Union

import torch

from megatron_tppo.rollout.base import (GenerationResult, RolloutEngine, Sampling, StartWeights,
                                        normalize_max_tokens)
from megatron_tppo.rollout.stream import StreamRequest, StreamUpdate
from megatron_tppo.rollout.vllm_common import sampled_logprobs, with_tied_lm_head

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


EXTENSION = "megatron_tppo.rollout.vllm_ext.WeightReceiverExtension"
_BIND_SET_HERE: Optional[str] = None  # the last VLLM_CPU_OMP_THREADS_BIND this module wrote


def cpu_bind_mask(workers: int, cores: Optional[Sequence[int]] = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``workers`` CPU workers: the allowed cores (default: this
    process's affinity) split into contiguous, disjoint groups, ``"0|1"`` or ``"0,1,2|3,4,5"``. With
    fewer cores than workers, workers share cores round-robin (slow, but it runs)."""
    cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
    if not cores:
        raise ValueError("no CPU cores to bind vLLM workers to")
    if len(cores) < workers:
        return "|".join(str(cores[i % len(cores)]) for i in range(workers))
    per, extra = divmod(len(cores), workers)
    groups, start = [], 0
    for i in range(workers):
        n = per + (1 if i < extra else 0)
        groups.append(",".join(map(str, cores[start:start + n])))
        start += n
    return "|".join(groups)


def _set_engine_env(on_cpu: bool, tensor_parallel: int, kv_cache_gb: float) -> None:
    """Environment vLLM reads when the engine is built (not at import)."""
    global _BIND_SET_HERE
    import vllm.envs as envs

    envs.disable_envs_cache()  # an earlier in-process engine froze the env reads; this one has its own
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not on_cpu:
        return  # GPU: vLLM's own default (engine core and workers in their own processes)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(kv_cache_gb)))  # vLLM parses an int (GiB)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if tensor_parallel > 1 else "0"
    if tensor_parallel > 1:
        user = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
        if user is None or user == _BIND_SET_HERE or len(user.split("|")) != tensor_parallel:
            _BIND_SET_HERE = os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_mask(tensor_parallel)


def llm_kwargs(model_path: str, *, on_cpu: bool, max_model_len: int, max_num_seqs: int, tensor_parallel: int = 1,
               logprobs_mode: str = "processed", seed: int = 0, dtype: Optional[str] = None,
               load_format: str = "auto", gpu_memory_utilization: Optional[float] = 0.5,
               enforce_eager: Optional[bool] = None) -> dict:
    """The ``vllm.LLM`` keyword arguments for this platform (pure: unit-tested for both branches).

    CPU: eager (vLLM has no graphs there), float32, no chunked prefill. GPU: CUDA graphs unless
    ``enforce_eager``, bfloat16, sleep mode (its cumem pool holds the "weights" and "kv_cache"
    tags; the graph pool is outside it, stays resident while asleep and is not re-captured on
    wake_up, vllm/v1/worker/gpu_worker.py)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    # On CPU, chunked prefill makes vLLM discard the token sampled for a partly prefilled
    # request and rewind that request's seeded generator with Generator.set_offset, which CPU
    # generators do not have ("CPU Generator does not use offset"): seeded sampling of a
    # large batch crashes. Without chunking, a prefill that does not fit waits a step instead.
    # The step's token budget: 8192, but no more than all sequences can hold (vLLM warns above that).
    budget = max(max_model_len, min(8192, max_num_seqs * max_model_len))
    extra = (dict(enable_chunked_prefill=False, max_num_batched_tokens=budget) if on_cpu
             else dict(enable_sleep_mode=True))
    if not on_cpu and gpu_memory_utilization is not None:  # None: vLLM's own default (an engine alone on its GPUs)
        extra["gpu_memory_utilization"] = gpu_memory_utilization
    if tensor_parallel > 1:
        extra["distributed_executor_backend"] = "mp"
    return dict(
        model=model_path,
        skip_tokenizer_init=True,  # token ids in and out; the trainer owns the tokenizer
        dtype=dtype or ("float32" if on_cpu else "bfloat16"),
        enforce_eager=on_cpu if enforce_eager is None else bool(enforce_eager),
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        tensor_parallel_size=tensor_parallel,
        logprobs_mode=f"{logprobs_mode}_logprobs",
        seed=seed,
        worker_extension_cls=EXTENSION,
        load_format=load_format,
        **extra,
    )


class VLLMEngine(RolloutEngine):
    """:class:`RolloutEngine` on a ``vllm.LLM`` loaded from an HF model directory.

    Args:
        model_path: HF model directory (config.json + safetensors); tokenizer not needed.
        max_model_len: longest prompt + response in tokens.
        device: "auto" (vLLM's platform), "cpu" or "gpu" (only checked against the platform).
        cpu_kv_cache_gb: KV cache in GiB on CPU.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (GPU only; None: vLLM's default, for an engine alone on its GPUs).
        tensor_parallel: vLLM tensor-parallel size (> 1: one worker process per rank).
        logprobs_mode: "processed" (the sampling distribution) or "raw" (temperature 1, no top-p).
        stop_token_ids: tokens that finish a response; None reads EOS from the model directory.
        max_num_seqs: most sequences vLLM batches at once.
        seed: engine seed (used for sampling when a call gives no seed).
        dtype: vLLM dtype; None picks float32 on CPU and bfloat16 on GPU.
        load_format: vLLM's load format; "dummy" starts from placeholder weights (vLLM fills every
            parameter with small uniform values, not reading the safetensors; the model directory
            then only gives the config): generating is refused until weights were loaded.
        enforce_eager: no CUDA graphs; None = True on CPU, False on GPU (:func:`llm_kwargs`).
    """

    def __init__(self, model_path: Union[str, Path], *, max_model_len: int = 2048, device: str = "auto",
                 cpu_kv_cache_gb: float = 1.0, gpu_memory_utilization: Optional[float] = 0.5, tensor_parallel: int = 1,
                 logprobs_mode: Literal["processed", "raw"] = "processed",
                 stop_token_ids: Optional[Sequence[int]] = None, max_num_seqs: int = 256, seed: int = 0,
                 dtype: Optional[str] = None, load_format: str = "auto", enforce_eager: Optional[bool] = None):
        self.model_path = str(model_path)
        hf_config = read_hf_config(model_path)
        if device == "cpu":
            check_cpu_head_size(hf_config)  # fail in milliseconds, before the vLLM engine starts
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, got {device!r}")
        if logprobs_mode not in ("processed", "raw"):
            raise ValueError(f"logprobs_mode must be processed or raw, got {logprobs_mode!r}")
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if device != "auto" and (device == "cpu") != self.on_cpu:
            raise ValueError(f"device={device!r} but vLLM's platform is {current_platform.device_type}")
        if self.on_cpu:
            check_cpu_head_size(hf_config)  # "auto" landed on CPU: still before the engine starts
        _set_engine_env(self.on_cpu, tensor_parallel, cpu_kv_cache_gb)
        from vllm import LLM

        self.tensor_parallel = int(tensor_parallel)
        # worker processes (TP > 1, or vLLM's default engine-core process on GPU): RPC arguments
        # are serialized, so weights held here reach the workers over a local group instead
        self.remote_workers = self.tensor_parallel > 1 or os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0"
        self.stop_token_ids = list(default_stop_token_ids(model_path) if stop_token_ids is None else stop_token_ids)
        self.tied_embeddings = bool(hf_config.get("tie_word_embeddings", False))
        self.policy_version = 0
        self.last_load_seconds = 0.0
        self._asleep: set[str] = set()  # tags vLLM holds asleep ("weights", "kv_cache")
        # why the engine holds no real weights (load before generating), None once it does
        self._no_weights: Optional[str] = "it started from dummy weights" if load_format == "dummy" else None
        self.llm = LLM(**llm_kwargs(
            self.model_path, on_cpu=self.on_cpu, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            tensor_parallel=self.tensor_parallel, logprobs_mode=logprobs_mode, seed=seed, dtype=dtype,
            load_format=load_format, gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager))

    @classmethod
    def from_config(cls, model_path: Union[str, Path], rollout, model, *,
                    weights: StartWeights = "checkpoint") -> "VLLMEngine":
        """Build from :class:`~megatron_tppo.config.RolloutConfig` and ``ModelConfig``; ``weights``
        "dummy" starts vLLM with ``load_format="dummy"`` (no safetensors read; see :data:`StartWeights`)."""
        if weights not in ("checkpoint", "dummy"):
            raise ValueError(f"weights must be 'checkpoint' or 'dummy', got {weights!r}")
        return cls(model_path, max_model_len=model.max_position_embeddings,
                   load_format="dummy" if weights == "dummy" else "auto",
                   cpu_kv_cache_gb=rollout.cpu_kv_cache_gb, gpu_memory_utilization=rollout.gpu_memory_utilization,
                   tensor_parallel=rollout.tensor_parallel, logprobs_mode=rollout.logprobs_mode,
                   max_num_seqs=rollout.max_num_seqs or rollout.slots_per_engine(), enforce_eager=rollout.enforce_eager,
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
        self._check_can_generate("generate")
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
                        logprobs=sampled_logprobs(comp.token_ids, comp.logprobs),
                        finish_reason=_finish_reason(comp.finish_reason),
                        policy_version=self.policy_version, prompt_index=i, sample_index=j)
        return results  # type: ignore[return-value]

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Log-probs of each given token after its prefix: [num_seqs][len_i - 1] (token 0 has none).

        A scoring pass (one prefill), e.g. to compare vLLM's numerics with the trainer's.
        """
        from vllm.inputs import TokensPrompt

        self._check_can_generate("prompt_logprobs")
        params = self._sampling_params(Sampling(temperature=0.0), 1, None, 1, prompt_logprobs=0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, s))) for s in sequences],
                                    params, use_tqdm=False)
        return [sampled_logprobs(s[1:], out.prompt_logprobs[1:]) for s, out in zip(sequences, outputs)]

    def stream(self, requests: Sequence[StreamRequest], budget: int, sampling: Sampling = Sampling(),
               expect_more: bool = True) -> StreamUpdate:
        """:meth:`RolloutEngine.stream` on vLLM's engine loop (:mod:`megatron_tppo.rollout.vllm_stream`).

        Every result carries the ``policy_version`` of the weights when the stream opened.
        """
        from megatron_tppo.rollout.vllm_stream import VLLMStream

        session = self.__dict__.get("_stream_session")
        if session is None:
            self._check_can_generate("stream")

            def make_params(s: Sampling, max_tokens: int, seed: Optional[int]):
                return self._sampling_params(s, max_tokens, seed, 1, logprobs=0)

            session = self._stream_session = VLLMStream(self.llm.llm_engine, make_params, self.policy_version)
        try:
            update = session.run(requests, budget, sampling, expect_more)
        except BaseException:
            self._stream_session = None
            session.abandon()
            raise
        if update.closed:
            self._stream_session = None
        return update

    # -- weights and memory ----------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int,
                     bucket_bytes: int = 256 << 20) -> None:
        """(HF name, full tensor) pairs held by this process -> the live model; stamps ``version``.

        With worker processes the pairs travel in buckets of about ``bucket_bytes`` over a local
        gloo group into the workers' receive path (:meth:`receive_weights`'s).
        """
        self._check_awake("weights", "load_weights")
        t0 = time.perf_counter()
        if self.remote_workers:
            self._load_through_local_group(weights, bucket_bytes)
        else:
            if self.tied_embeddings:
                weights = with_tied_lm_head(weights)
            self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=iter(weights),
                                                                  is_checkpoint_format=True))
        self._weights_loaded(version)
        self.last_load_seconds = time.perf_counter() - t0

    def _load_through_local_group(self, weights, bucket_bytes: int, timeout_s: float = 300.0) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from megatron_tppo.weights.transfer import send_buckets
        from megatron_tppo.weights.transports import join, open_store

        store = open_store("127.0.0.1", timeout_s=timeout_s)
        spec = dict(backend="gloo", host="127.0.0.1", port=store.port, world_size=1 + self.tensor_parallel,
                    timeout_s=timeout_s)
        plan = {r: [dict(spec, rank=1 + r)] for r in range(self.tensor_parallel)}
        with ThreadPoolExecutor(1) as pool:  # the workers block in the group while this thread sends
            joined = pool.submit(self.llm.collective_rpc, "tppo_join_transfer", kwargs=dict(key="local", plan=plan))
            transport = join("gloo", 0, spec["world_size"], store=store, timeout_s=timeout_s)
            joined.result()
            try:
                got = pool.submit(self.llm.collective_rpc, "tppo_receive_weights",
                                  kwargs=dict(key="local", tied=self.tied_embeddings))
                tied = self.tied_embeddings  # the workers feed the embedding to lm_head themselves
                send_buckets(transport, _greedy_buckets(((n, t) for n, t in weights
                                                         if not (tied and n == "lm_head.weight")), bucket_bytes))
                got.result()
            finally:
                self.llm.collective_rpc("tppo_close_transfer", kwargs=dict(key="local"))
                transport.close()

    def weight_transfer_devices(self) -> list[dict]:
        """Per worker: rank, device, GPU UUID (None on CPU), pid, node (this engine actor's: its
        workers run on its machine)."""
        from megatron_tppo.weights.ipc import this_node

        node = this_node()
        return [{**d, "node": node} for d in self.llm.collective_rpc("tppo_device")]

    def join_weight_transfer(self, plan: dict) -> list[dict]:
        """Every worker joins its transfer groups (blocks until all did): ``plan`` maps each worker
        rank to its groups (``{"backend", "host", "port", "world_size", "timeout_s", "rank"}``)."""
        return self.llm.collective_rpc("tppo_join_transfer", kwargs=dict(key="sync", plan=plan))

    def receive_weights(self, version: int) -> dict:
        """Receive a sync from the joined groups (the senders broadcast meanwhile); stamps ``version``.

        Returns per-worker stats under ``"workers"`` (bytes, buckets, wire/load seconds, memory growth).
        """
        self._check_awake("weights", "receive_weights")
        t0 = time.perf_counter()
        workers = self.llm.collective_rpc("tppo_receive_weights", kwargs=dict(key="sync", tied=self.tied_embeddings))
        self._weights_loaded(version)
        self.last_load_seconds = time.perf_counter() - t0
        return {"workers": workers, "seconds": self.last_load_seconds}

    def close_weight_transfer(self) -> None:
        self.llm.collective_rpc("tppo_close_transfer", kwargs=dict(key="sync"))

    def worker_memory(self, reset: bool = False) -> list[dict]:
        """Resident set of each worker process (current, peak since the last ``reset=True``)."""
        return self.llm.collective_rpc("tppo_memory", kwargs=dict(reset=reset))

    def _weights_loaded(self, version: int) -> None:
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.policy_version = int(version)
        self._no_weights = None

    def _check_awake(self, tag: str, what: str) -> None:
        if tag in self._asleep:
            raise RuntimeError(f"{what}: the engine's {tag} are asleep; wake_up([{tag!r}]) first")

    def _check_can_generate(self, what: str) -> None:
        if self._asleep:
            raise RuntimeError(f"{what}: the engine sleeps ({sorted(self._asleep)}); wake_up() first")
        if self._no_weights:
            raise RuntimeError(f"{what}: the engine holds no real weights ({self._no_weights}); "
                               f"sync or load them before generating")

    def memory_state(self) -> dict:
        return {"asleep": sorted(self._asleep), "no_weights": self._no_weights or None}

    def sleep(self, level: int = 2) -> None:
        """Free the GPU for training: level 2 drops weights and KV cache, level 1 keeps the weights
        in host memory (see the module doc). Prefix cache is reset either way. No-op on vLLM's CPU
        side (state is still tracked)."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if self._asleep:
            return
        if not self.on_cpu:
            self.llm.reset_prefix_cache()
            self.llm.sleep(level=level)
        self._asleep = {"weights", "kv_cache"}
        if level == 2 and not self._no_weights:
            self._no_weights = "sleep(level=2) discarded them"

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Re-allocate ``tags`` ("weights", "kv_cache"; None = both). Order for a sync:
        ``wake_up(["weights"])``, load, ``wake_up(["kv_cache"])``."""
        wake = set(self._asleep if tags is None else tags)
        unknown = wake - {"weights", "kv_cache"}
        if unknown:
            raise ValueError(f"unknown wake_up tags {sorted(unknown)}; use weights and/or kv_cache")
        wake &= self._asleep
        if not wake:
            return
        if not self.on_cpu:
            self.llm.wake_up(tags=sorted(wake))
        self._asleep -= wake

    def release_memory(self) -> None:
        self.sleep(level=1)  # keeps the weights: restore_memory() alone makes the engine usable again

    def restore_memory(self) -> None:
        self.wake_up()

    def shutdown(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del llm


def _greedy_buckets(weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int):
    """Consecutive (HF name, tensor) pairs in lists of at most ``bucket_bytes`` (or one tensor)."""
    bucket, size = [], 0
    for name, t in weights:
        n = t.numel() * t.element_size()
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


def _finish_reason(reason: Optional[str]) -> str:
    if reason in ("stop", "length"):
        return reason
    raise RuntimeError(f"vLLM finished a request with reason {reason!r}")
