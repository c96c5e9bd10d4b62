"""Run configuration: documented dataclasses, loaded from YAML and dotted ``key.sub=value`` overrides.

The dataclasses below are the only copy of the schema. YAML files and command-line overrides are
both applied onto them field by field (:func:`megatron_tppo.config_io.load_config`), with types
checked against the annotations, and :meth:`TPPOConfig.validate` runs before anything heavy (Ray,
megatron, vLLM) starts. Every field carries a docstring directly under it;
:func:`megatron_tppo.config_io.field_docs` reads them back for ``--help`` output.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal, Optional


class ConfigError(ValueError):
    """A configuration that cannot work, raised before any heavy component starts."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Architecture of the policy (and the critic backbone): a Qwen2/Llama-family decoder."""

    arch: Literal["qwen2", "llama"] = "qwen2"
    """Model family; decides the HF names and defaults (Qwen2 has QKV bias, Llama does not)."""
    hf_path: Optional[str] = None
    """Directory of a Hugging Face model to start from (required to train; `make run` builds the
    tiny default with tools/build_tiny_model.py)."""
    tokenizer_path: Optional[str] = None
    """Tokenizer directory; None means the same directory as ``hf_path``."""
    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 256
    """Model width."""
    ffn_hidden_size: int = 704
    """SwiGLU intermediate width (per gate/up projection)."""
    num_attention_heads: int = 4
    """Query heads. hidden_size / num_attention_heads is the head size (vLLM on CPU needs >= 32)."""
    num_query_groups: int = 2
    """Key/value heads for grouped-query attention (= num_attention_heads for plain MHA)."""
    vocab_size: int = 512
    """Vocabulary size of the tokenizer (the embedding may be padded for TP divisibility)."""
    max_position_embeddings: int = 2048
    """Longest sequence (prompt + response) the model is used at."""
    rope_theta: float = 1_000_000.0
    """RoPE base frequency."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    qkv_bias: bool = True
    """Add a bias to the Q/K/V projections (Qwen2: True, Llama: False)."""
    tie_word_embeddings: bool = True
    """Share the input embedding and the output layer."""
    params_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter/compute dtype. Use fp32 on CPU (bf16 matmul there is ~700x slower)."""
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """Transformer Engine FP8 format for linear layers; None disables FP8 (needs a GPU and TE).
    Micro-batch widths are then padded to multiples of 16 (32 for mxfp8) and linear widths per TP
    rank must be such multiples too (TE's FP8 GEMM rule; megatron_tppo/training/batching.py)."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    """Transformer Engine FP8 scaling recipe (used only when ``fp8`` is set)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding rows to a multiple of this (layout-independent, so checkpoints move
    across TP sizes); every tensor-parallel size used must divide the padded vocabulary."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialization (models built from a seed)."""

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocab_size rounded up to ``make_vocab_size_divisible_by``."""
        d = max(self.make_vocab_size_divisible_by, 1)
        return -(-self.vocab_size // d) * d


@dataclass
class LayoutConfig:
    """Parallel layout of one trained model (policy or critic)."""

    tensor_parallel: int = 1
    """Tensor-parallel size (splits attention heads and MLP columns)."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size (splits layers into stages; 1F1B schedule when > 1)."""
    data_parallel: int = 1
    """Data-parallel replicas; the distributed optimizer shards optimizer state when > 1."""
    micro_batch_tokens: int = 4096
    """Token budget of one micro-batch after length sorting/packing (bounds activation memory)."""
    recompute: Literal["none", "full"] = "none"
    """Activation recomputation: full recomputes every layer in backward (megatron-core
    recompute_granularity='full', method 'uniform', 1 layer), keeping only layer inputs."""

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel


@dataclass
class ParallelConfig:
    """Where the models run."""

    policy: LayoutConfig = field(default_factory=LayoutConfig)
    """Layout of the policy (actor) trainer."""
    critic: LayoutConfig = field(default_factory=LayoutConfig)
    """Layout of the value model (critic) trainer."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Compute device; auto picks cuda when a GPU is visible, else cpu (gloo)."""
    ray_address: Optional[str] = None
    """Ray cluster to join ("auto" or host:port, as ``ray start`` printed); None starts a local one."""
    local_gpus: Optional[int] = None
    """GPUs the local Ray cluster declares when the driver starts one (ray_address None); None lets
    Ray detect them. On a CPU machine, N > 0 logical GPUs make the GPU placement (one bundle per GPU,
    colocation, TP groups within a node) run for real, with CPU compute inside the actors."""
    threads_per_worker: int = 0
    """torch intra-op threads per trainer/rollout process; 0 keeps torch's default."""
    trainers: Literal["split", "shared"] = "split"
    """How policy and critic divide the GPUs. split: the policy the first GPUs, the critic the next;
    both update at once. shared: both from GPU 0, taking turns (the idle one offloaded), so each
    engine worker's GPU holds a policy rank and a sync stays on the GPUs. Needs rollout.colocate."""


@dataclass
class OptimizerConfig:
    """Adam(W) optimizer and learning-rate schedule of one model."""

    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up in optimizer steps."""
    decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate decay after warm-up."""
    lr_decay_steps: int = 0
    """Optimizer steps over which linear/cosine decay reaches min_lr; 0 means the run's total steps."""


@dataclass
class OptimConfig:
    """Optimizers of the two trained models (decoupled, as T-PPO prescribes)."""

    policy: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-6))
    """Policy (actor) optimizer; the paper uses about 1e-6 at 32B."""
    critic: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-6))
    """Critic optimizer; the paper uses 2e-6 at 32B."""


@dataclass
class RolloutConfig:
    """Windowed generation with successive batching (TPPO.md section 1)."""

    backend: Literal["vllm"] = "vllm"
    """Generation backend (imported lazily)."""
    num_slots: int = 64
    """Active response slots kept busy every step (paper: 512 prompts x 16 = 8192)."""
    samples_per_prompt: int = 8
    """Samples per prompt; they form a group (paper: 16)."""
    window_tokens: int = 64
    """Window length W: new tokens a slot generates per step (paper: 8192)."""
    max_response_tokens: int = 256
    """Maximum response length L_max; a response reaching it is forced finished (paper: 24576)."""
    refill: Literal["window", "continuous"] = "window"
    """When a finished slot takes the next sample, and what ends a step. window (the paper): slots
    refill only at step boundaries; each active slot generates up to window_tokens tokens per step,
    and a slot whose response ended early idles until the step's last slot is done. continuous
    (TPPO.md section 7): a slot whose response ends takes the next pending sample at once; the step
    ends once num_slots x window_tokens tokens were generated (over all engines, each with its
    share), and what is in flight then is truncated and resumes next step from its token ids.
    Weights are fixed within a step either way (policy lag below one step)."""
    temperature: float = 1.0
    """Sampling temperature (> 0); the trainer's log-probs use it too (:meth:`logprob_temperature`)."""
    top_p: float = 1.0
    """Nucleus sampling threshold; below 1 only with logprobs_mode raw (processed log-probs are
    renormalized over the nucleus, which the trainer does not reproduce)."""
    tensor_parallel: int = 1
    """vLLM tensor-parallel size per engine."""
    num_engines: int = 1
    """Number of vLLM engines (data-parallel rollout)."""
    colocate: bool = True
    """Share devices with training (release/restore vLLM memory around generation)."""
    gpu_memory_utilization: Optional[float] = None
    """Fraction of each GPU's memory an engine worker may take (vLLM's budget for weights,
    activations and KV cache; GPU only). None: what the memory schedule leaves it while the engines
    are awake (megatron_tppo/planning/schedule.py ``max_utilization``), computed in each engine
    actor from its GPU (an engine alone on its GPUs, as the evaluator's, takes vLLM's default). A
    value is checked against that limit there, before vLLM starts, and by ``plan``."""
    cpu_kv_cache_gb: float = 1.0
    """KV-cache size in GiB for vLLM on CPU (VLLM_CPU_KVCACHE_SPACE)."""
    weight_sync_bucket_mb: int = 512
    """Size bound of one bucket when streaming policy weights into vLLM."""
    weight_transport: Literal["auto", "gloo", "nccl", "ipc"] = "auto"
    """How weights reach the engine workers (one rule chooses: megatron_tppo/weight_route.py).
    ipc: buckets shared in place (CUDA IPC; /dev/shm on cpu), from the policy rank on each engine
    worker's GPU when every one has one (parallel.trainers=shared), else from each stage's sender on
    its node. gloo: host buffers over TCP. nccl: CUDA buffers to engines on GPUs of their own. auto:
    ipc when each engine worker's GPU holds a policy rank; else nccl on cuda, ipc on the senders'
    node, gloo otherwise; gloo on cpu."""
    logprobs_mode: Literal["processed", "raw"] = "processed"
    """Behaviour log-probs of the PPO ratio, and the trainer's alike: processed, of the sampling
    distribution log_softmax(logits / temperature); raw, of the temperature-1 model (then the
    samples come from another distribution than the ratio assumes if temperature != 1 or top_p < 1)."""
    enforce_eager: Optional[bool] = None
    """vLLM without CUDA graphs. None: True on CPU (no graphs there), False on GPU (decode replays
    captured graphs; the capture costs start-up time and its memory pool, which vLLM's sleep mode
    neither frees nor re-captures: graphs stay valid because weights and KV cache wake at the same
    addresses). True on GPU trades decode speed for that memory and a faster start."""
    max_num_seqs: Optional[int] = None
    """Most sequences one vLLM engine batches at once. None: the slots it serves,
    ceil(num_slots / num_engines) (its share, for both refill modes). A smaller value is a
    configuration error: the engine would queue its own slots and the window would take waves."""
    seeded: Optional[bool] = None
    """Seed every request (reproducible generation: a resumed run, or a step undone by a stop
    signal, regenerates the same tokens; unseeded it generates other, equally valid ones).
    None: True on CPU, False on GPU, where a per-request torch.Generator makes vLLM's sampler
    draw that row's noise in its own kernel (a Python loop over seeded rows each decode step) and
    skip the FlashInfer top-p/top-k kernel (vllm/v1/sample/ops/topk_topp_sampler.py)."""

    def logprob_temperature(self) -> float:
        """The temperature of the behaviour log-probs, at which the trainer scores tokens too."""
        return self.temperature if self.logprobs_mode == "processed" else 1.0

    def slots_per_engine(self) -> int:
        """Slots one engine serves: ceil(num_slots / num_engines) (controller/continuous.py shares)."""
        return -(-self.num_slots // self.num_engines)


@dataclass
class AlgorithmConfig:
    """T-PPO: EGAE, losses and decoupled updates (TPPO.md sections 2-4)."""

    gamma: float = 1.0
    """Discount factor."""
    critic_lambda: float = 1.0
    """GAE lambda of the critic targets (1.0 = Monte-Carlo return)."""
    policy_lambda_alpha: float = 0.05
    """Length-adaptive policy lambda: lambda = 1 - 1/(alpha * L) (VAPO)."""
    policy_lambda_min: float = 0.95
    """Floor of the length-adaptive policy lambda."""
    truncated_tail_ignore: int = 8
    """Zero the advantage of the last N tokens of a truncated segment (their estimates are worst)."""
    advantage_clamp: float = 10.0
    """Clamp whitened advantages to +-this value; 0 disables the clamp."""
    advantage_whiten: Literal["mean_std", "std", "none"] = "mean_std"
    """Advantages over the batch's loss tokens: minus the mean, over the std (the recipe); over the
    std only (a truncated segment's near-zero advantages stay near zero); or as they are."""
    truncation_bootstrap: Literal["last_value", "exact"] = "last_value"
    """V(s_l) after a truncated segment: its last token's value V(s_{l-1}) (TPPO.md), or exact:
    the critic's value after that token, from the same forward."""
    clip_low: float = 0.2
    """PPO ratio lower clip: ratio >= 1 - clip_low."""
    clip_high: float = 0.28
    """PPO ratio upper clip (clip-higher): ratio <= 1 + clip_high."""
    dual_clip: float = 10.0
    """Dual-clip bound c for negative advantages; 0 disables it."""
    positive_lm_coef: float = 0.1
    """Weight of the NLL loss on responses with reward 1 (VAPO positive-example LM loss)."""
    value_clip: float = 0.5
    """Clip range of the value update around the old values."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    kl_coef: float = 0.0
    """KL penalty to a frozen reference policy. Not implemented (it needs a third, forward-only
    model group): any value but 0, the paper's setting, is a configuration error."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: groups whose samples all got one reward leave the policy update (not
    resampled). Only where a group is generated and trained in one step (PPO: window refill, window
    >= max_response_tokens, num_slots a multiple of samples_per_prompt); else a configuration error."""
    critic_warmup_steps: int = 10
    """Critic-only steps before the policy starts to move."""
    overlong_penalty: float = 0.0
    """Reward subtracted from a response forced finished at max_response_tokens."""
    policy_epochs: int = 1
    """Passes over one step's policy batch."""
    critic_epochs: int = 1
    """Passes over one step's critic batch."""
    max_nonfinite_updates: int = 10
    """Stop the run after this many consecutive updates skipped for a NaN/inf loss."""


@dataclass
class DataConfig:
    """Prompts and evaluation data."""

    task: Literal["arith", "jsonl", "parquet"] = "arith"
    """Prompt source: the built-in synthetic arithmetic task, or a JSONL/Parquet dataset."""
    train_path: Optional[str] = None
    """Training prompts file (jsonl/parquet tasks)."""
    eval_path: Optional[str] = None
    """Held-out evaluation file (jsonl/parquet tasks)."""
    prompt_key: str = "prompt"
    """Column holding the prompt text."""
    answer_key: str = "answer"
    """Column holding the reference answer."""
    template: str = "{prompt}"
    """Prompt template; ``{prompt}`` is replaced by the row's prompt."""
    eval_every: int = 10
    """Evaluate on the held-out set every N steps; 0 disables evaluation."""
    eval_every_s: float = 0.0
    """Evaluate every this many seconds of training instead of every ``eval_every`` steps: after
    the first step that takes the sum of step seconds (evaluations excluded) past the next multiple
    (and after the last step). 0: by steps. Needs ``eval_every`` > 0 (0 disables evaluation)."""
    eval_samples_per_prompt: int = 4
    """k in pass@1 averaged over k samples."""
    eval_prompts: int = 128
    """Number of held-out prompts per evaluation."""
    bad_rows: Literal["skip", "error"] = "skip"
    """Malformed dataset rows: skip and count them, or stop with the file and line."""
    shuffle: bool = True
    """Shuffle the prompt stream every epoch (seeded)."""
    reward: str = "auto"
    """Reward function (megatron_tppo.rewards): auto = arith for the arith task, else math (boxed
    answers); arith; math; or a user function ``"package.module:function"`` taking (response text,
    row meta) and returning a float (it runs in a separate process with the timeout below)."""
    reward_timeout_s: float = 5.0
    """A reward call running longer than this scores 0 and is counted as a timeout."""
    arith_max_steps: int = 17
    """Arith task: cap on the chain length (17 steps -> a 174-token correct response with EOS)."""
    arith_continue_prob: float = 0.75
    """Arith task: probability that a chain goes on after each step (geometric tail, median 3 steps)."""
    arith_train_size: int = 200_000
    """Arith task: problems in one epoch of the train split (generated lazily, one per index)."""


@dataclass
class LoggingConfig:
    """Console and TensorBoard output."""

    output_dir: str = "runs/tppo"
    """Run directory: TensorBoard events, logs and checkpoints go under it."""
    tensorboard: bool = True
    """Write TensorBoard event files under ``<output_dir>/tensorboard``."""
    progress_bar: bool = True
    """Show a progress bar over steps on the console."""
    rollout_dump: bool = False
    """Write every finished response (prompt uid, sample index, reward, length, windows, policy
    versions, text) to ``<output_dir>/rollouts/step_<N>.jsonl``; a redone step (after a resume)
    replaces its file, so the files always describe one history."""


@dataclass
class CheckpointConfig:
    """Run checkpoints (models, optimizers, window pool, data position, RNG)."""

    save_every: int = 0
    """Save a run checkpoint every N steps; 0 saves only at the end and on termination signals."""
    save_every_s: float = 0.0
    """Also save a run checkpoint at the end of the first step that ends at least this many
    seconds (wall clock) after the previous save, or after the loop started; 0 disables it. With
    steps of hours, a step count alone may leave more than a job's time limit between saves.
    Either cadence triggers a save; the time a step waits for it is logged as perf/checkpoint_s."""
    keep_last: int = 2
    """Number of whole checkpoints to keep."""
    resume: bool = False
    """Continue from the latest whole checkpoint under ``<output_dir>/checkpoints``."""
    load_policy: Optional[str] = None
    """torch_dist checkpoint to initialize the policy from (e.g. made by convert_hf_to_megatron)."""
    load_critic: Optional[str] = None
    """torch_dist checkpoint to initialize the critic from; None: the backbone of ``model.hf_path``
    with a fresh value head."""


@dataclass
class TPPOConfig:
    """Everything a T-PPO run needs. Sections mirror the YAML files in examples/."""

    seed: int = 1234
    """Global random seed (prompt order, sampling, initialization)."""
    steps: int = 100
    """Number of T-PPO steps (one window of generation plus updates each)."""
    time_budget_s: float = 0.0
    """Wall-clock budget of the training loop in seconds (0: none). The step during which it runs
    out is the last: evaluated and checkpointed like a final step (a resumed run gets a new budget)."""
    time_budget_excludes_eval: bool = False
    """Do not count held-out evaluations against ``time_budget_s`` (the deadline moves by each
    evaluation's duration): the budget is then training time only (benchmarks/tppo_vs_ppo.py)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layouts."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizers."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Windowed generation."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Algorithm settings."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt data and evaluation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""

    @property
    def max_windows(self) -> int:
        """Windows a response can live through: ceil(L_max / W)."""
        return math.ceil(self.rollout.max_response_tokens / self.rollout.window_tokens)

    @property
    def is_ppo_baseline(self) -> bool:
        """W >= L_max: every response finishes in its first window (synchronous PPO)."""
        return self.rollout.window_tokens >= self.rollout.max_response_tokens

    def validate(self) -> "TPPOConfig":
        """Check cross-field constraints; raise ConfigError naming the field. Cheap, no imports."""
        errors: list[str] = []

        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                errors.append(f"{name}: {msg}")

        m, r, a = self.model, self.rollout, self.algorithm
        check(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
        check(self.time_budget_s >= 0, "time_budget_s", f"must be >= 0, got {self.time_budget_s}")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "max_position_embeddings"):
            check(getattr(m, name) > 0, f"model.{name}", f"must be > 0, got {getattr(m, name)}")
        if m.num_attention_heads > 0 and m.hidden_size > 0:
            check(m.hidden_size % m.num_attention_heads == 0, "model.hidden_size",
                  f"{m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}")
        if m.num_query_groups > 0:
            check(m.num_attention_heads % m.num_query_groups == 0, "model.num_query_groups",
                  f"model.num_attention_heads={m.num_attention_heads} is not a multiple of {m.num_query_groups}")
        check(m.rope_theta > 0, "model.rope_theta", f"must be > 0, got {m.rope_theta}")
        check(m.make_vocab_size_divisible_by >= 1, "model.make_vocab_size_divisible_by",
              f"must be >= 1, got {m.make_vocab_size_divisible_by}")
        check(m.init_std > 0, "model.init_std", f"must be > 0, got {m.init_std}")
        if m.fp8 is not None:
            check(self.parallel.device != "cpu", "model.fp8",
                  "FP8 needs a GPU with Transformer Engine; parallel.device is cpu")
            check(m.params_dtype != "fp32", "model.fp8", "FP8 training expects params_dtype bf16 or fp16")
            self._check_fp8_widths(check)

        lg = self.parallel.local_gpus
        if lg is not None:
            check(lg >= 0, "parallel.local_gpus", f"must be >= 0, got {lg}")
            check(self.parallel.ray_address is None, "parallel.local_gpus",
                  "only applies to a local Ray cluster; with parallel.ray_address the cluster declares its GPUs")
        for role in ("policy", "critic"):
            lay: LayoutConfig = getattr(self.parallel, role)
            for name in ("tensor_parallel", "pipeline_parallel", "data_parallel", "micro_batch_tokens"):
                check(getattr(lay, name) >= 1, f"parallel.{role}.{name}", f"must be >= 1, got {getattr(lay, name)}")
            if lay.tensor_parallel >= 1 and m.num_query_groups > 0:
                check(m.num_attention_heads % lay.tensor_parallel == 0 and m.num_query_groups % lay.tensor_parallel == 0,
                      f"parallel.{role}.tensor_parallel",
                      f"{lay.tensor_parallel} must divide model.num_attention_heads={m.num_attention_heads} "
                      f"and model.num_query_groups={m.num_query_groups}")
                check(m.ffn_hidden_size % lay.tensor_parallel == 0, f"parallel.{role}.tensor_parallel",
                      f"{lay.tensor_parallel} must divide model.ffn_hidden_size={m.ffn_hidden_size}")
                if m.vocab_size > 0 and m.make_vocab_size_divisible_by >= 1:
                    check(m.padded_vocab_size % lay.tensor_parallel == 0, f"parallel.{role}.tensor_parallel",
                          f"{lay.tensor_parallel} must divide the padded vocabulary {m.padded_vocab_size} "
                          f"(model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by})")
            if lay.pipeline_parallel >= 1:
                check(m.num_layers % lay.pipeline_parallel == 0, f"parallel.{role}.pipeline_parallel",
                      f"{lay.pipeline_parallel} must divide model.num_layers={m.num_layers}")

        for role in ("policy", "critic"):
            o: OptimizerConfig = getattr(self.optim, role)
            check(o.lr >= 0, f"optim.{role}.lr", f"must be >= 0, got {o.lr}")
            check(0 <= o.min_lr <= max(o.lr, 0), f"optim.{role}.min_lr", f"must be in [0, lr={o.lr}], got {o.min_lr}")
            check(0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1, f"optim.{role}.adam_beta1",
                  "Adam betas must be in [0, 1)")
            check(o.clip_grad >= 0, f"optim.{role}.clip_grad", f"must be >= 0, got {o.clip_grad}")
            check(o.warmup_steps >= 0, f"optim.{role}.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
            check(o.lr_decay_steps >= 0, f"optim.{role}.lr_decay_steps", f"must be >= 0, got {o.lr_decay_steps}")

        check(r.num_slots >= 1, "rollout.num_slots", f"must be >= 1, got {r.num_slots}")
        check(r.samples_per_prompt >= 1, "rollout.samples_per_prompt", f"must be >= 1, got {r.samples_per_prompt}")
        check(r.window_tokens >= 1, "rollout.window_tokens", f"must be >= 1, got {r.window_tokens}")
        check(r.max_response_tokens >= 1, "rollout.max_response_tokens",
              f"must be >= 1, got {r.max_response_tokens}")
        check(r.refill in ("window", "continuous"), "rollout.refill",
              f"must be window or continuous, got {r.refill!r}")
        check(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
        check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
        check(r.top_p == 1 or r.logprobs_mode == "raw", "rollout.top_p",
              f"{r.top_p} < 1 with rollout.logprobs_mode=processed: vLLM renormalizes those log-probs over the nucleus, "
              "which the trainer cannot reproduce (on-policy ratio = nucleus mass, not 1); use top_p=1 or logprobs_mode=raw")
        check(r.gpu_memory_utilization is None or 0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
              f"must be in (0, 1], got {r.gpu_memory_utilization}")
        check(r.cpu_kv_cache_gb > 0, "rollout.cpu_kv_cache_gb", f"must be > 0, got {r.cpu_kv_cache_gb}")
        check(r.tensor_parallel >= 1 and r.num_engines >= 1, "rollout.tensor_parallel",
              "rollout.tensor_parallel and rollout.num_engines must be >= 1")
        check(r.weight_sync_bucket_mb >= 1, "rollout.weight_sync_bucket_mb", "must be >= 1")
        if r.max_num_seqs is not None and r.num_engines >= 1:
            check(r.max_num_seqs >= r.slots_per_engine(), "rollout.max_num_seqs",
                  f"{r.max_num_seqs} is below the slots each engine serves: ceil(rollout.num_slots={r.num_slots} / "
                  f"rollout.num_engines={r.num_engines}) = {r.slots_per_engine()}")
        from megatron_tppo.weight_route import TransportError, check_request

        try:
            check_request(r.weight_transport, self.parallel.device, r.colocate)
        except TransportError as err:
            check(False, "rollout.weight_transport", str(err))
        check(self.parallel.trainers == "split" or r.colocate, "parallel.trainers",
              "shared needs rollout.colocate=true (the trainers take turns on the engines' GPUs)")
        if m.num_attention_heads > 0 and r.tensor_parallel >= 1:
            check(m.num_attention_heads % r.tensor_parallel == 0, "rollout.tensor_parallel",
                  f"{r.tensor_parallel} must divide model.num_attention_heads={m.num_attention_heads}")

        check(0 < a.gamma <= 1, "algorithm.gamma", f"must be in (0, 1], got {a.gamma}")
        check(0 <= a.critic_lambda <= 1, "algorithm.critic_lambda", f"must be in [0, 1], got {a.critic_lambda}")
        check(a.policy_lambda_alpha > 0, "algorithm.policy_lambda_alpha", f"must be > 0, got {a.policy_lambda_alpha}")
        check(0 <= a.policy_lambda_min <= 1, "algorithm.policy_lambda_min",
              f"must be in [0, 1], got {a.policy_lambda_min}")
        check(a.truncated_tail_ignore >= 0, "algorithm.truncated_tail_ignore", "must be >= 0")
        if r.window_tokens >= 1:
            check(a.truncated_tail_ignore < r.window_tokens, "algorithm.truncated_tail_ignore",
                  f"{a.truncated_tail_ignore} would zero every token of a truncated window "
                  f"(rollout.window_tokens={r.window_tokens})")
        check(a.advantage_clamp >= 0, "algorithm.advantage_clamp", "must be >= 0")
        check(0 <= a.clip_low < 1, "algorithm.clip_low", f"must be in [0, 1), got {a.clip_low}")
        check(a.clip_high >= 0, "algorithm.clip_high", f"must be >= 0, got {a.clip_high}")
        check(a.dual_clip == 0 or a.dual_clip > 1, "algorithm.dual_clip",
              f"must be 0 (off) or > 1, got {a.dual_clip}")
        check(a.value_clip >= 0, "algorithm.value_clip", "must be >= 0")
        for name in ("positive_lm_coef", "entropy_coef", "kl_coef", "overlong_penalty"):
            check(getattr(a, name) >= 0, f"algorithm.{name}", f"must be >= 0, got {getattr(a, name)}")
        check(a.kl_coef == 0, "algorithm.kl_coef",
              f"a KL penalty to a reference policy is not implemented (no reference model is built); "
              f"set it to 0, got {a.kl_coef}")
        if a.dynamic_sampling:
            check(r.refill == "window" and self.is_ppo_baseline and r.num_slots % max(r.samples_per_prompt, 1) == 0,
                  "algorithm.dynamic_sampling", "needs every group generated and trained in one step: rollout.refill "
                  f"window (got {r.refill}), rollout.window_tokens ({r.window_tokens}) >= rollout.max_response_tokens "
                  f"({r.max_response_tokens}), rollout.num_slots ({r.num_slots}) a multiple of "
                  f"rollout.samples_per_prompt ({r.samples_per_prompt}); a group's earlier windows and siblings are "
                  "trained before its rewards are known and nothing would be resampled")
        check(a.critic_warmup_steps >= 0, "algorithm.critic_warmup_steps", "must be >= 0")
        check(a.max_nonfinite_updates >= 1, "algorithm.max_nonfinite_updates", "must be >= 1")
        check(a.policy_epochs >= 1 and a.critic_epochs >= 1, "algorithm.policy_epochs",
              "policy_epochs and critic_epochs must be >= 1")

        d = self.data
        if d.task in ("jsonl", "parquet"):
            check(d.train_path is not None, "data.train_path", f"required when data.task={d.task!r}")
        check(d.eval_every >= 0, "data.eval_every", "must be >= 0")
        check(d.eval_every_s >= 0, "data.eval_every_s", f"must be >= 0, got {d.eval_every_s}")
        check(d.eval_every_s == 0 or d.eval_every > 0, "data.eval_every_s",
              "evaluates on the training clock only while data.eval_every > 0 (0 disables evaluation)")
        check(d.eval_samples_per_prompt >= 1, "data.eval_samples_per_prompt", "must be >= 1")
        check(d.eval_prompts >= 1, "data.eval_prompts", "must be >= 1")
        check("{prompt}" in d.template, "data.template", "must contain the placeholder {prompt}")
        check(d.reward in ("auto", "arith", "math") or re.fullmatch(r"[\w.]+:\w+", d.reward) is not None,
              "data.reward", f"must be auto, arith, math or 'module:function', got {d.reward!r}")
        check(d.reward_timeout_s > 0, "data.reward_timeout_s", f"must be > 0, got {d.reward_timeout_s}")
        check(1 <= d.arith_max_steps <= 26, "data.arith_max_steps", f"must be in [1, 26], got {d.arith_max_steps}")
        check(0 <= d.arith_continue_prob < 1, "data.arith_continue_prob",
              f"must be in [0, 1), got {d.arith_continue_prob}")
        check(d.arith_train_size >= 1, "data.arith_train_size", "must be >= 1")

        c = self.checkpoint
        check(c.save_every >= 0, "checkpoint.save_every", "must be >= 0")
        check(c.save_every_s >= 0 and math.isfinite(c.save_every_s), "checkpoint.save_every_s",
              f"must be a finite number of seconds >= 0, got {c.save_every_s}")
        check(c.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        check(bool(self.logging.output_dir), "logging.output_dir", "must not be empty")

        if errors:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
        return self

    def _check_fp8_widths(self, check) -> None:
        """FP8 GEMM operands need both dims divisible by 16 (32 for mxfp8): the token dim is
        padded by the engine, the weight dims per tensor-parallel rank are checked here."""
        m = self.model
        align = 32 if m.fp8_recipe == "mxfp8" else 16
        check(m.hidden_size % align == 0, "model.fp8", f"model.hidden_size={m.hidden_size} must be a multiple "
              f"of {align} for FP8 GEMMs (recipe {m.fp8_recipe})")
        if m.num_attention_heads <= 0 or m.hidden_size % m.num_attention_heads:
            return
        for role in ("policy", "critic"):
            tp = getattr(self.parallel, role).tensor_parallel
            if tp < 1:
                continue
            widths = {"model.ffn_hidden_size": m.ffn_hidden_size / tp,
                      "attention output (num_attention_heads x head size)": m.num_attention_heads * m.head_size / tp,
                      "QKV (num_attention_heads + 2 x num_query_groups heads)":
                          (m.num_attention_heads + 2 * m.num_query_groups) * m.head_size / tp}
            for what, width in widths.items():
                check(width == int(width) and int(width) % align == 0, "model.fp8",
                      f"{what} per tensor-parallel rank of the {role} (parallel.{role}.tensor_parallel={tp}) "
                      f"is {width:g}, not a multiple of {align} as FP8 GEMMs need (recipe {m.fp8_recipe})")
