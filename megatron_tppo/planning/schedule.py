"""The memory schedule: who holds what on every GPU in every phase of a run, and the moves between.

One pure plan (no torch, ray or vLLM import), used twice:

* :func:`phase_table` prices every phase on every GPU of a placement (:mod:`.layout`), item by
  item (weights, gradients, optimizer state, activation peak, KV cache, the CUDA/NCCL reserve),
  from what each component holds in its state (:mod:`.occupancy`). A phase that exceeds a GPU
  is a :class:`MemoryPlanError` naming the phase, the GPU and its largest component. ``plan``
  prints the table.
* :func:`transition` says what to release and what to load when the run moves from one phase to
  another. :class:`megatron_tppo.controller.colocation.Colocation` applies exactly that, and
  nothing else, and writes what it did and what the components then reported to
  ``<output_dir>/memory_trace.jsonl``; the rehearsal test compares that trace with this module.

States. A trainer (policy or critic) is ``absent`` (not built yet), ``resident`` (weights,
gradients and optimizer state on the GPU), ``params`` (weights only: the sync reads them) or
``offloaded`` (nothing but its context). An engine is ``absent``, ``awake`` (its whole budget:
``gpu_memory_utilization`` of the GPU for weights, activations and KV cache), ``weights`` (weights
only, the KV cache freed: the sync writes into them), or ``asleep`` at level 1 (weights copied to
host memory) or 2 (weights dropped: only a sync brings them back).

Phases, in the order a run visits them (colocated; every phase has the same states everywhere
when the engines own their GPUs, so nothing moves):

    engine_start     engines start alone: vLLM refuses to start unless ``gpu_memory_utilization``
                     of the GPU is free, so nothing else may be there yet
    trainer_build    engines asleep (level 2: the first sync overwrites their weights), both
                     trainers built (DDP buffers, distributed optimizer)
    checkpoint_load  the starting weights load into the trainers (no optimizer state)
    resume           instead of checkpoint_load: a run checkpoint with optimizer state
    first_sync       the critic and the policy's gradients/optimizer off, engine weights awake
    generation       trainers off, engines awake (also every evaluation)
    values           engines asleep (level 2), trainers back, the critic's forward
    updates          both updates at once (policy and critic on their own GPUs)
    sync             as first_sync, then ``generation`` again
    warmup_values    a step that moves no policy (``algorithm.critic_warmup_steps``): engines
    warmup_updates   sleep at level 1 (their weights wait in host memory), no sync follows
    checkpoint_save  a periodic or final save at a step's end: engines asleep (level 1),
                     trainers back; then ``generation`` again
    signal_generation  a stop signal during generation: the step is undone and saved
    signal_updates   a stop signal after the updates: saved before the sync
    signal_warmup_updates  the same in a critic warm-up step (engines stay at level 1)

Shared trainers (``parallel.trainers=shared``: a GPU holds a policy rank, a critic rank and an
engine worker) take turns, so that a GPU never holds both trainers' state: a phase above where
only the critic works (values, warmup_values, warmup_updates) keeps the policy ``offloaded``; a
phase where both work becomes two, ``<name>@critic`` then ``<name>@policy`` (:data:`TURNS`), each
with the other trainer offloaded (absent while it is not built yet: ``trainer_build@critic``).
The critic goes first everywhere, so that after a step's updates the policy is the one resident,
as the sync needs it.

Release before load: a transition first offloads and puts engines to sleep, then onloads and
wakes, so its peak is never above the larger of the two phases it joins.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

from megatron_tppo.planning.hardware import GPU, GiB
from megatron_tppo.planning.memory import model_params
from megatron_tppo.planning.occupancy import engine_items, offload_buffer_bytes, trainer_items

TRAINER_STATES = ("absent", "resident", "params", "offloaded")
ENGINE_STATES = ("absent", "awake", "weights", "asleep1", "asleep2")


@dataclass(frozen=True)
class Phase:
    name: str
    engine: str
    policy: str
    critic: str
    policy_work: Optional[str] = None
    """What the policy does on top of its state: build, load, resume, gather, train, save."""
    critic_work: Optional[str] = None
    doc: str = ""


def _p(name, engine, policy, critic, pw=None, cw=None, doc=""):
    return Phase(name, engine, policy, critic, pw, cw, doc)


COLOCATED = (
    _p("engine_start", "awake", "absent", "absent", doc="engines start before anything else on their GPUs"),
    _p("trainer_build", "asleep2", "resident", "resident", "build", "build", "trainers built, engines asleep"),
    _p("checkpoint_load", "asleep2", "resident", "resident", "load", "load", "starting weights, no optimizer"),
    _p("resume", "asleep2", "resident", "resident", "resume", "resume", "a run checkpoint with optimizer state"),
    _p("first_sync", "weights", "params", "offloaded", "gather", None, "policy weights into the engines"),
    _p("generation", "awake", "offloaded", "offloaded", doc="engines generate (and evaluate)"),
    _p("values", "asleep2", "resident", "resident", None, "forward", "the critic's values"),
    _p("updates", "asleep2", "resident", "resident", "train", "train", "policy and critic updates at once"),
    _p("sync", "weights", "params", "offloaded", "gather", None, "policy weights into the engines"),
    _p("warmup_values", "asleep1", "resident", "resident", None, "forward", "values of a critic warm-up step"),
    _p("warmup_updates", "asleep1", "resident", "resident", None, "train", "critic update, no policy move"),
    _p("checkpoint_save", "asleep1", "resident", "resident", "save", "save", "a save at a step's end"),
    _p("signal_generation", "asleep1", "resident", "resident", "save", "save", "stop signal during generation"),
    _p("signal_updates", "asleep2", "resident", "resident", "save", "save", "stop signal after the updates"),
    _p("signal_warmup_updates", "asleep1", "resident", "resident", "save", "save",
       "stop signal after a warm-up step's update"),
)
PHASE_NAMES = tuple(p.name for p in COLOCATED)

TURNS = ("critic", "policy")
"""The order of the trainers' turns in a phase both work in (shared trainers)."""


def _take_turns(p: Phase) -> tuple[Phase, ...]:
    """``p`` with shared trainers: the idle trainer offloaded, or one phase per turn (module docstring)."""
    if p.policy != "resident" or p.critic != "resident":
        return (p,)
    if p.policy_work is None or p.critic_work is None:
        idle = "policy" if p.policy_work is None else "critic"
        return (replace(p, **{idle: "offloaded"}),)
    out = []
    for role in TURNS:
        other = "policy" if role == "critic" else "critic"
        idle = "absent" if getattr(p, f"{other}_work") == "build" and role == TURNS[0] else "offloaded"
        out.append(replace(p, name=f"{p.name}@{role}", **{other: idle, f"{other}_work": None},
                           doc=f"{p.doc}: the {role}'s turn"))
    return tuple(out)


SHARED = tuple(q for p in COLOCATED for q in _take_turns(p))
"""Every phase with shared trainers, in :data:`COLOCATED`'s order."""
TURN_PHASES = tuple(p.name for p in COLOCATED if len(_take_turns(p)) > 1)
"""The phases that shared trainers take in turns."""

STARTUP = ("engine_start", "trainer_build", "checkpoint_load", "first_sync", "generation")
"""A fresh run's first phases (``resume`` replaces ``checkpoint_load`` when a checkpoint loads)."""
STEP = ("values", "updates", "sync", "generation")
WARMUP_STEP = ("warmup_values", "warmup_updates", "generation")
SAVE = ("checkpoint_save", "generation")


class MemoryPlanError(ValueError):
    """A phase that does not fit a GPU, or a move the components cannot make."""


def shared(cfg) -> bool:
    """Do the trainers of ``cfg`` take turns on the same GPUs (``parallel.trainers=shared``)?"""
    return cfg.parallel.trainers == "shared"


def phases(cfg) -> tuple[Phase, ...]:
    """Every phase of ``cfg``'s run. Engines on their own GPUs (``rollout.colocate=false``) never
    sleep and trainers never offload: every phase keeps all components as they are. Shared
    trainers (which need colocated engines) take turns: :data:`SHARED`."""
    if shared(cfg):
        return SHARED
    if cfg.rollout.colocate:
        return COLOCATED
    return tuple(p if p.name == "engine_start" else Phase(p.name, "awake", "resident", "resident", p.policy_work,
                                                          p.critic_work, p.doc)
                 for p in COLOCATED)


def phase(cfg, name: str) -> Phase:
    for p in phases(cfg):
        if p.name == name:
            return p
    raise KeyError(f"unknown phase {name!r}; phases: {', '.join(p.name for p in phases(cfg))}")


def turn_name(cfg, name: str, role: Optional[str]) -> str:
    """The phase a trainer's turn in phase ``name`` is: ``<name>@<role>`` for shared trainers in a
    phase of :data:`TURN_PHASES`, else ``name`` (split trainers work at once: one phase)."""
    if not shared(cfg) or name not in TURN_PHASES:
        return name
    if role not in TURNS:
        raise ValueError(f"phase {name} is taken in turns by shared trainers: say whose ({', '.join(TURNS)}), "
                         f"got {role!r}")
    return f"{name}@{role}"


def base_name(name: str) -> str:
    """The phase a turn belongs to: ``updates@critic`` -> ``updates``."""
    return name.split("@", 1)[0]


# ---------------------------------------------------------------------------------------------
# Moves
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Action:
    """One call on one component: ``component.method(*args)``."""

    component: str
    """"policy", "critic" or "rollout"."""
    method: str
    """offload, onload, sleep, wake_up."""
    args: tuple = ()

    def to_json(self) -> list:
        return [self.component, self.method, list(self.args)]


def _trainer_release(name: str, a: str, b: str) -> list[Action]:
    if a == b or a in ("absent", "offloaded") or b == "resident":
        return []
    if a == "resident" and b == "params":  # gradients are dropped: every update zeroes them first
        return [Action(name, "offload", ("grads", "optimizer"))]
    if b in ("offloaded", "absent"):
        return [Action(name, "offload", ("params", "grads", "optimizer") if a == "resident" else ("params",))]
    raise MemoryPlanError(f"{name}: no move from {a} to {b}")


def _trainer_load(name: str, a: str, b: str) -> list[Action]:
    if a == b or b in ("offloaded", "absent") or (a == "resident" and b == "params"):
        return []
    if a == "absent":
        return []  # built by its constructor (the trace records the build)
    if b == "resident":
        return [Action(name, "onload")]
    raise MemoryPlanError(f"{name}: no move from {a} to {b} (an onload restores everything it freed)")


def _engine_moves(a: str, b: str) -> tuple[list[Action], list[Action]]:
    if a == b or b == "absent" or a == "absent":
        return [], []
    if b in ("asleep1", "asleep2"):
        if a in ("asleep1", "asleep2"):
            raise MemoryPlanError(f"engines: no move from {a} to {b} (an engine sleeps once)")
        return [Action("rollout", "sleep", (int(b[-1]),))], []
    if a == "awake" and b == "weights":
        raise MemoryPlanError("engines: no move from awake to weights (sleep first)")
    if a == "asleep2" and b == "awake":
        raise MemoryPlanError("engines: no move from asleep2 to awake: a level-2 sleep dropped the weights; "
                              "sync them (weights) first")
    if b == "weights":
        return [], [Action("rollout", "wake_up", ("weights",))]
    if a == "weights":
        return [], [Action("rollout", "wake_up", ("kv_cache",))]
    return [], [Action("rollout", "wake_up", ("weights", "kv_cache"))]


def transition(a: Phase, b: Phase) -> list[Action]:
    """The calls that take the components from phase ``a`` to phase ``b``: releases first."""
    rel_e, load_e = _engine_moves(a.engine, b.engine)
    release = (_trainer_release("critic", a.critic, b.critic) + _trainer_release("policy", a.policy, b.policy)
               + rel_e)
    load = load_e + _trainer_load("policy", a.policy, b.policy) + _trainer_load("critic", a.critic, b.critic)
    return release + load


def check_sequence(cfg, names) -> None:
    """Every move of the phase sequence ``names`` is one the components can make."""
    ph = [phase(cfg, n) for n in names]
    for a, b in zip(ph, ph[1:]):
        try:
            transition(a, b)
        except MemoryPlanError as err:
            raise MemoryPlanError(f"{a.name} -> {b.name}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Bytes per GPU
# ---------------------------------------------------------------------------------------------

@dataclass
class Holding:
    component: str
    """"policy rank 3", "critic rank 0", "engine 1 worker 2"."""
    item: str
    """weights, grads, optimizer, activations, logits, checkpoint staging, sync buffers, KV and
    activations (the engine's budget), engine weights, engine asleep, context, nccl,
    fragmentation."""
    bytes: float


@dataclass
class GpuPhase:
    gpu: tuple[int, int]
    phase: str
    holdings: list[Holding] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(h.bytes for h in self.holdings)

    def largest(self) -> Holding:
        return max(self.holdings, key=lambda h: h.bytes)


def phase_table(cfg, placement, gpu: GPU, utilization: Optional[float] = None,
                only: Optional[Sequence[Phase]] = None) -> list[GpuPhase]:
    """Every phase (or those of ``only``) x every used GPU of ``placement``: what each component
    holds there. The ranks of both trainers on one GPU (shared trainers) are occupants of their own."""
    util = cfg.rollout.gpu_memory_utilization if utilization is None else utilization
    occupants: dict[tuple[int, int], list] = {}
    for a in placement.policy + placement.critic:
        occupants.setdefault((a.gpus[0].node, a.gpus[0].index), []).append((a.group, a.rank, None))
    for a in placement.engines:
        for w, g in enumerate(a.gpus):
            occupants.setdefault((g.node, g.index), []).append(("engine", a.rank, w))
    out = []
    for ph in phases(cfg) if only is None else only:
        for g in sorted(occupants):
            gp = GpuPhase(g, ph.name)
            for group, rank, worker in occupants[g]:
                if group == "engine":
                    who, items = f"engine {rank} worker {worker}", engine_items(cfg, ph.engine, gpu, util)
                else:
                    state, work = (ph.policy, ph.policy_work) if group == "policy" else (ph.critic, ph.critic_work)
                    who, items = f"{group} rank {rank}", trainer_items(cfg, group, rank, state, work, gpu)
                gp.holdings += [Holding(who, item, b) for item, b in items]
            out.append(gp)
    return out


def check_fits(table: list[GpuPhase], gpu: GPU) -> list[str]:
    """One line per phase whose fullest GPU exceeds the GPU's memory less its headroom: the phase,
    that GPU, its largest component, and how many GPUs of the phase do not fit."""
    limit = gpu.memory_bytes - gpu.headroom_gib * GiB
    over: dict[str, list[GpuPhase]] = {}
    for gp in table:
        if gp.total > limit:
            over.setdefault(gp.phase, []).append(gp)
    errors = []
    for name, gps in over.items():
        gp = max(gps, key=lambda g: g.total)
        big = gp.largest()
        errors.append(f"phase {name}: GPU {gp.gpu[1]} of node {gp.gpu[0]} needs {gp.total / GiB:.1f} GiB > "
                      f"{limit / GiB:.1f} GiB ({gpu.memory_gib:g} GiB less {gpu.headroom_gib:g} GiB headroom; "
                      f"{len(gps)} GPU(s) of this phase do not fit); largest: {big.component} {big.item} "
                      f"{big.bytes / GiB:.1f} GiB"
                      + (f"; try parallel.{big.component.split()[0]}.recompute=full or fewer "
                         f"micro_batch_tokens" if big.item == "activations" else ""))
    return errors


def peaks(table: list[GpuPhase]) -> dict[str, GpuPhase]:
    """Per phase, the GPU that holds the most."""
    out: dict[str, GpuPhase] = {}
    for gp in table:
        if gp.phase not in out or gp.total > out[gp.phase].total:
            out[gp.phase] = gp
    return out


def max_utilization(cfg, placement, gpu: GPU) -> float:
    """The largest ``rollout.gpu_memory_utilization`` for which every phase fits: what the GPU
    leaves for the engine's budget after everything else it holds while the engine is awake
    (the other occupants' states, the engine's context and communicators, and the headroom)."""
    limit = gpu.memory_bytes - gpu.headroom_gib * GiB
    best = 1.0
    for gp in phase_table(cfg, placement, gpu, utilization=0.0):
        ph = phase(cfg, gp.phase)
        if ph.engine != "awake":
            continue
        workers = sum(1 for h in gp.holdings if h.component.startswith("engine") and h.item == "context")
        best = min(best, (limit - gp.total) / (workers * gpu.memory_bytes) if workers else 1.0)
    return max(best, 0.0)


def to_json(table: list[GpuPhase]) -> list[dict]:
    return [dict(phase=gp.phase, node=gp.gpu[0], gpu=gp.gpu[1], total_gib=gp.total / GiB,
                 holdings=[dict(component=h.component, item=h.item, gib=h.bytes / GiB) for h in gp.holdings])
            for gp in table]


def format_peaks(table: list[GpuPhase], gpu: GPU) -> list[str]:
    """The per-phase peak table ``plan`` prints."""
    lines = [f"memory per phase (the fullest GPU of each; {gpu.memory_gib:g} GiB, {gpu.headroom_gib:g} GiB headroom):",
             f"  {'phase':<18}{'GPU':>8}{'total':>9}  held"]
    for name, gp in peaks(table).items():
        items: dict[str, float] = {}
        for h in gp.holdings:
            items[h.item] = items.get(h.item, 0.0) + h.bytes
        held = ", ".join(f"{k} {v / GiB:.1f}" for k, v in sorted(items.items(), key=lambda kv: -kv[1]) if v >= 0.05 * GiB)
        lines.append(f"  {name:<18}{f'{gp.gpu[0]}:{gp.gpu[1]}':>8}{gp.total / GiB:>8.1f}G  {held}")
    return lines


# ---------------------------------------------------------------------------------------------
# Host memory per node
# ---------------------------------------------------------------------------------------------

def host_table(cfg, placement, host) -> dict[int, list[Holding]]:
    """Per node, the host memory at its peak: every trainer rank's offload buffer (allocated at the
    first offload and kept), the engines' level-1 backup of their weights (a save or a warm-up
    step: in host memory at the same time as the buffers), the Ray object store, and the
    processes themselves. Engines on their own GPUs never sleep: no backup. Shared trainers
    offload on the same nodes: both trainers' buffers count there."""
    r, m = cfg.rollout, cfg.model
    out: dict[int, list[Holding]] = {}
    for a in placement.policy + placement.critic:
        node = a.gpus[0].node
        hold = out.setdefault(node, [])
        if r.colocate:
            hold.append(Holding(f"{a.group} rank {a.rank}", "offload buffer", offload_buffer_bytes(cfg, a.group, a.rank)))
        hold.append(Holding(f"{a.group} rank {a.rank}", "process", host.trainer_process_gib * GiB))
    for a in placement.engines:
        for w, g in enumerate(a.gpus):
            hold = out.setdefault(g.node, [])
            if r.colocate:
                hold.append(Holding(f"engine {a.rank} worker {w}", "level-1 sleep backup",
                                    model_params(m) * 2.0 / r.tensor_parallel))
            hold.append(Holding(f"engine {a.rank} worker {w}", "process", host.engine_process_gib * GiB))
    for node, hold in out.items():
        hold.append(Holding("ray", "object store", host.object_store_bytes))
        hold.append(Holding("ray", "raylet and services", host.ray_node_gib * GiB))
    return out


def check_host(table: dict[int, list[Holding]], host) -> list[str]:
    errors = []
    for node, hold in sorted(table.items()):
        total = sum(h.bytes for h in hold)
        if total > host.memory_gib * GiB:
            items: dict[str, float] = {}
            for h in hold:
                items[h.item] = items.get(h.item, 0.0) + h.bytes
            big = max(items, key=items.get)
            errors.append(f"host memory of node {node}: {total / GiB:.0f} GiB > {host.memory_gib:g} GiB "
                          f"(--host-mem-gb); largest: {big} {items[big] / GiB:.0f} GiB")
    return errors


# ---------------------------------------------------------------------------------------------
# What a run should visit, and a check of what it did (the controller's memory_trace.jsonl)
# ---------------------------------------------------------------------------------------------

def run_phases(steps: range, warmup_steps: int, saves: set[int], resumed: bool = False,
               signal: Optional[str] = None, shared: bool = False) -> list[str]:
    """The phases of one process of a run that executes ``steps`` (0-based step indices), saves
    after each step in ``saves`` (1-based counts, as checkpoints are named; a save after the last
    step ends the run) and, with ``signal`` ("generation" or "updates"), is stopped in the step
    after the last of ``steps``. ``shared``: the trainers take turns (every phase of
    :data:`TURN_PHASES` is visited as its turns, critic first)."""
    return with_turns(_split_run_phases(steps, warmup_steps, saves, resumed, signal), shared)


def with_turns(names, shared: bool) -> list[str]:
    """The phase sequence ``names`` (:data:`COLOCATED`'s names) as shared trainers visit it when
    ``shared``: each phase of :data:`TURN_PHASES` as its turns, in :data:`TURNS`' order."""
    return [t for n in names for t in ([f"{n}@{r}" for r in TURNS] if shared and n in TURN_PHASES else [n])]


def _split_run_phases(steps: range, warmup_steps: int, saves: set[int], resumed: bool,
                      signal: Optional[str]) -> list[str]:
    out = list(STARTUP)
    if resumed:
        out[2] = "resume"
    for s in steps:
        out += WARMUP_STEP if s < warmup_steps else STEP
        if s + 1 in saves:  # the save after the run's last step ends it
            out += ["checkpoint_save"] + ([] if s == steps[-1] and signal is None else ["generation"])
    stopped = steps[-1] + 1 if len(steps) else 0  # the step the signal cuts
    if signal == "generation":
        out.append("signal_generation")
    elif signal == "updates" and stopped < warmup_steps:
        out += ["warmup_values", "warmup_updates", "signal_warmup_updates"]
    elif signal == "updates":
        out += ["values", "updates", "signal_updates"]
    return out


def _trainer_state(ranks) -> str:
    if any(r["unscheduled_onloads"] for r in ranks):
        return "unscheduled onload"
    states = set()
    for r in ranks:
        off, dropped = set(r["offloaded"]), set(r["dropped"])
        states.add("resident" if not off and not dropped else "offloaded" if "params" in off else "params")
    return states.pop() if len(states) == 1 else f"mixed {sorted(states)}"


def _engine_state(engines) -> str:
    states = set()
    for e in engines:
        asleep = set(e["asleep"])
        if not asleep:
            states.add("awake")
        elif asleep == {"kv_cache"}:
            states.add("weights")
        else:
            states.add("asleep2" if e["no_weights"] else "asleep1")
    return states.pop() if len(states) == 1 else f"mixed {sorted(states)}"


def check_trace(cfg, records: list[dict]) -> list[list[str]]:
    """Check every record of a ``memory_trace.jsonl`` against the schedule: its calls are exactly
    :func:`transition`'s, and what the components reported afterwards is the new phase's state.
    Shared trainers take every turn in order: a process enters ``<name>@policy`` only from
    ``<name>@critic`` and leaves ``<name>@critic`` only for it (it may end anywhere: killed).
    Returns the phases visited, one list per process (a record with no ``from`` starts one);
    raises :class:`MemoryPlanError` at the first record that differs."""
    runs: list[list[str]] = []
    for i, rec in enumerate(records):
        where = f"trace record {i} ({rec['from']} -> {rec['to']})"
        new = phase(cfg, rec["to"])
        if rec["from"] is None:
            runs.append([])
            want: list = []
        else:
            _check_turn(where, rec["from"], rec["to"])
            try:
                want = [a.to_json() for a in transition(phase(cfg, rec["from"]), new)]
            except MemoryPlanError as err:
                raise MemoryPlanError(f"{where}: {err}") from None
        if rec["actions"] != want:
            raise MemoryPlanError(f"{where}: calls {rec['actions']}, the schedule says {want}")
        seen = rec["observed"]
        got = {"rollout": _engine_state(seen["rollout"])}
        for role in ("policy", "critic"):
            got[role] = "absent" if seen[role] is None else _trainer_state(seen[role])
        for comp, want_state in (("rollout", new.engine), ("policy", new.policy), ("critic", new.critic)):
            # a build phase is entered before the build
            building = comp != "rollout" and got[comp] == "absent" and getattr(new, f"{comp}_work") == "build"
            if got[comp] != want_state and not building:
                raise MemoryPlanError(f"{where}: {comp} reports {got[comp]}, the schedule says {want_state}")
        runs[-1].append(rec["to"])
    return runs


def _check_turn(where: str, a: str, b: str) -> None:
    first, last = (f"@{r}" for r in (TURNS[0], TURNS[-1]))
    if b.endswith(last) and a != base_name(b) + first:
        raise MemoryPlanError(f"{where}: the {TURNS[-1]}'s turn of {base_name(b)} without the {TURNS[0]}'s first")
    if a.endswith(first) and b != base_name(a) + last:
        raise MemoryPlanError(f"{where}: the {TURNS[-1]}'s turn of {base_name(a)} is missing")


def engine_utilization(cfg, placement, gpu_total_bytes: float) -> float:
    """``rollout.gpu_memory_utilization`` for engines on GPUs of ``gpu_total_bytes``: the schedule's
    :func:`max_utilization` when the key is unset, else the key once checked against it (a
    :class:`~megatron_tppo.config.ConfigError` naming the field when it leaves too little).
    Called in each engine actor before vLLM starts."""
    from megatron_tppo.config import ConfigError

    limit = max_utilization(cfg, placement, GPU(memory_gib=gpu_total_bytes / GiB))
    want = cfg.rollout.gpu_memory_utilization
    if want is None:
        return limit
    if want > limit + 1e-9:
        raise ConfigError(f"rollout.gpu_memory_utilization={want} leaves too little of this GPU's "
                          f"{gpu_total_bytes / GiB:.1f} GiB for what the memory schedule keeps there while the "
                          f"engines are awake; at most {limit:.3f} (unset it to take that value)")
    return want
