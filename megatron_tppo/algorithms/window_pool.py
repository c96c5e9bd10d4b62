"""Window pool: the successive-batching state of T-PPO (docs/TPPO.md sections 1 and 7).

Slots and groups
    The pool has ``num_slots`` response slots; each holds one in-flight :class:`Sample` (one
    response to one prompt). Taking a prompt from the stream creates its group of
    ``samples_per_prompt`` samples (group uid = prompt uid), which wait in a FIFO pending queue.
    A free slot takes the next pending sample; a new prompt is taken only when the queue is empty
    and a slot is free. Groups therefore may straddle refills, and after :meth:`WindowPool.refill`
    exactly ``num_slots`` slots are active while prompts remain.

Windows and segments
    The tokens a sample generated since its last step boundary form its open *segment*.
    :meth:`WindowPool.end_step` closes every open segment and returns them: they are the
    loss-bearing tokens of this step's policy update (section 3); everything before is context.
    A closed segment is a window: the next one starts where it ended, with a fresh budget of
    ``window_tokens``. A response ends on EOS (``"eos"``) or on reaching ``max_response_tokens``
    (``"length_cap"``); its slot is then free until the next ``refill``.

No common window start (section 7)
    Each sample carries its own ``segment_start``, so nothing assumes that all slots began their
    window together. A driver may refill a slot the moment it finishes, stream tokens in with
    several :meth:`WindowPool.append` calls, and end a step on a token budget.

Window steps and budget steps
    A step is a *window step* unless :meth:`WindowPool.begin_budget_step` made it a *budget
    step* (``rollout.refill=continuous``):

    * window step (the paper): a segment holds at most ``window_tokens`` tokens; the step ends
      when the driver says so (normally once every slot filled its window or finished).
    * budget step: a segment is bounded only by the response's room before
      ``max_response_tokens``; all slots together may append at most
      ``num_slots * window_tokens`` tokens (the step's budget, enforced by ``append``). A slot
      whose response ends takes the next sample at once (:meth:`WindowPool.upcoming` says which
      samples come next, :meth:`WindowPool.start` puts one into the freed slot), so one slot
      may hold, in one step, the last segment of one response and the first segments of the
      next ones. Whatever is in flight when the budget is spent is truncated at ``end_step``.

    Either way a closed segment's tokens all came from the weights of one step (the policy lag
    stays below one step). In budget steps a response may live through more than
    ``ceil(max_response_tokens / window_tokens)`` windows, and a segment may be longer than
    ``window_tokens`` when slots progress unevenly; in window steps both bounds hold.

Lifetime of a sample
    pending -> slot (in flight) -> finished. Finished samples stay in the pool until their whole
    group has finished (group-relative rewards and dynamic sampling need the group); the group is
    returned by the next ``end_step`` and stays addressable by ``set_reward``/``set_values``
    until the ``end_step`` after that.

Choices
    * Per-token data are python lists (int token ids, float behaviour log-probs in nats, int
      policy versions, float-or-None values): cheap to extend while streaming, trivially
      serializable; the trainer packs them into tensors. Inputs may be lists or 1-D
      tensors/arrays (anything with ``tolist``); the module imports no torch at all.
    * Sample uids are a running counter, so they are unique and deterministic for a given stream.
    * The prompt stream is not part of :meth:`WindowPool.state_dict` (an iterator cannot be
      serialized); the state records ``prompts_taken`` and the caller builds the pool for
      :meth:`WindowPool.load_state_dict` with the stream resumed at that position.
    * :meth:`WindowPool.upcoming` may take prompts from the stream before a slot needs them
      (a continuous driver hands a few upcoming samples to each engine ahead of time); they
      wait in the pending queue, saved with it, until a slot starts them.
"""
from __future__ import annotations

import copy
import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Optional, Sequence

_COUNTERS = ("step", "prompts_taken", "samples_started", "samples_finished", "groups_completed",
             "tokens_generated", "next_sample_uid")
_STATE_FORMAT = 2  # 2 added the budget-step fields; format 1 states load as window steps


def _as_list(x: Any, kind: type) -> list:
    """A 1-D list/tuple/tensor/array -> python list of ``kind`` (int or float)."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    return [kind(v) for v in x]


@dataclass
class Prompt:
    """One prompt of the stream."""

    uid: int
    """Unique id (normally the stream position); also the uid of the prompt's group."""
    prompt_ids: list[int]
    """Prompt token ids, chat template applied."""
    meta: dict = field(default_factory=dict)
    """Plain, picklable data for scoring (e.g. the reference answer); shared by the group."""


@dataclass
class Sample:
    """One response: in flight in a slot, pending, or finished. Per-token lists have equal length."""

    uid: int
    prompt_uid: int
    index: int
    """Position within the group, 0 .. samples_per_prompt - 1."""
    prompt_ids: list[int]
    meta: dict
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    """Behaviour log-prob (nats) of each response token under the policy that generated it."""
    versions: list[int] = field(default_factory=list)
    """Policy version that generated each response token."""
    values: list[Optional[float]] = field(default_factory=list)
    """Critic value V(s_t) per response token, None until ``set_values``; kept across windows."""
    value_after: Optional[float] = None
    """V of the state after the last token with a value: the exact bootstrap of a truncated segment."""
    segment_start: int = 0
    """Response index where the current, still-open segment began."""
    windows: int = 0
    """Number of closed segments (windows) this response has lived through."""
    finish_reason: Optional[str] = None
    """None while in flight or pending; "eos" or "length_cap" once finished."""
    reward: Optional[float] = None

    @property
    def group_uid(self) -> int:
        return self.prompt_uid

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class WindowRequest:
    """What a slot asks the generator for: continue ``token_ids`` by up to ``max_new_tokens``."""

    slot: int
    sample_uid: int
    token_ids: list[int]
    """Prompt + response so far (resume from token ids, never from re-tokenized text)."""
    max_new_tokens: int
    """min(tokens left in the slot's window, tokens left before max_response_tokens); >= 1."""


@dataclass
class Segment:
    """The loss-bearing tokens of one sample in one step: response positions [start, end)."""

    sample_uid: int
    prompt_uid: int
    token_ids: list[int]
    """Full context: prompt + response[:end]; loss positions are prompt_len + [start, end)."""
    prompt_len: int
    start: int
    end: int
    logprobs: list[float]
    """Behaviour log-probs (nats) of the segment's tokens, length end - start."""
    versions: list[int]
    window: int
    """0-based index of this window within its response."""
    finished: bool
    """True when the response ended in this segment (EOS or length cap); False: truncated."""

    @property
    def segment_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len + self.start:]


@dataclass
class StepBatch:
    """What one step hands to scoring, the critic and EGAE."""

    step: int
    segments: list[Segment]
    """One per sample that generated tokens since the last boundary, finished ones first."""
    finished: list[Sample]
    """Whole samples (all windows) finished during this step, in finishing order."""
    completed_groups: dict[int, list[Sample]]
    """Group uid -> its samples (by index), for groups whose last sample finished this step."""


class WindowPool:
    """Successive-batching slots, groups and windows; see the module docstring."""

    def __init__(self, num_slots: int, samples_per_prompt: int, window_tokens: int,
                 max_response_tokens: int, prompts: Iterable[Prompt]):
        for name, v in (("num_slots", num_slots), ("samples_per_prompt", samples_per_prompt),
                        ("window_tokens", window_tokens), ("max_response_tokens", max_response_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.num_slots, self.samples_per_prompt = num_slots, samples_per_prompt
        self.window_tokens, self.max_response_tokens = window_tokens, max_response_tokens
        self._stream = iter(prompts)
        self._exhausted = False
        self._slots: list[Optional[Sample]] = [None] * num_slots
        self._pending: deque[Sample] = deque()
        self._open: dict[int, list[Sample]] = {}       # groups with an unfinished sample
        self._completed: dict[int, list[Sample]] = {}  # completed since the last end_step
        self._retired: dict[int, list[Sample]] = {}    # returned by the last end_step
        self._finished_step: list[Sample] = []
        self._by_uid: dict[int, Sample] = {}           # every sample in any of the above
        # Counters (named in _COUNTERS, so state_dict saves them all): steps ended, prompts
        # taken from the stream, samples put into a slot / finished, groups returned as
        # completed, response tokens appended, and the uid the next sample will get.
        self.step = self.prompts_taken = self.samples_started = self.samples_finished = 0
        self.groups_completed = self.tokens_generated = self.next_sample_uid = 0
        self.step_budget: Optional[int] = None
        """Token budget of the current budget step; None in a window step."""
        self.step_tokens = 0
        """Tokens appended since the last ``end_step`` (all slots)."""

    # ---------------------------------------------------------------- filling slots
    def _take_prompt(self) -> bool:
        if self._exhausted:
            return False
        try:
            p = next(self._stream)
        except StopIteration:
            self._exhausted = True
            return False
        if p.uid in self._open or p.uid in self._completed or p.uid in self._retired:
            raise ValueError(f"prompt uid {p.uid} is already in the pool; prompt uids must be unique")
        ids = _as_list(p.prompt_ids, int)
        if not ids:
            raise ValueError(f"prompt {p.uid} has no tokens")
        group = [Sample(self.next_sample_uid + i, p.uid, i, ids, p.meta)
                 for i in range(self.samples_per_prompt)]
        self.next_sample_uid += self.samples_per_prompt
        self.prompts_taken += 1
        self._open[p.uid] = group
        self._pending.extend(group)
        self._by_uid.update((s.uid, s) for s in group)
        return True

    def refill(self) -> list[int]:
        """Put a pending sample into every free slot; returns the slot ids filled, ascending.

        Called at window boundaries (paper) and at the start of a budget step, whose later
        refills are :meth:`start` calls.
        """
        filled = []
        for slot in range(self.num_slots):
            if self._slots[slot] is not None:
                continue
            if not self._pending and not self._take_prompt():
                break  # stream exhausted: remaining slots stay empty
            self._slots[slot] = self._pending.popleft()
            self.samples_started += 1
            filled.append(slot)
        return filled

    def upcoming(self, k: int, skip: Collection[int] = ()) -> list[Sample]:
        """The first ``k`` pending samples (FIFO order) whose uids are not in ``skip``.

        What free slots take next. Prompts are taken from the stream as needed (their groups
        join the pending queue, exactly as :meth:`refill` would take them), so fewer than ``k``
        come back only once the stream is exhausted. Nothing is started: the samples stay
        pending until :meth:`start` (or :meth:`refill`) puts them into a slot. ``skip``: uids
        already handed out (e.g. to another engine) and not yet started.
        """
        if k <= 0:
            return []
        out = [s for s in self._pending if s.uid not in skip][:k]
        while len(out) < k and self._take_prompt():
            out += [s for s in list(self._pending)[-self.samples_per_prompt:] if s.uid not in skip]
        return out[:k]

    def start(self, slot: int, sample_uid: int) -> Sample:
        """Put the pending sample ``sample_uid`` into the free ``slot``; returns it.

        Continuous refill: the engine took this sample (one :meth:`upcoming` returned) the
        moment the slot's previous response ended. :meth:`refill` is ``start`` of the queue's
        head in every free slot.
        """
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot!r} does not exist (num_slots={self.num_slots})")
        if self._slots[slot] is not None:
            raise ValueError(f"slot {slot} is busy with sample {self._slots[slot].uid}")
        for i, s in enumerate(self._pending):
            if s.uid == sample_uid:
                del self._pending[i]
                self._slots[slot] = s
                self.samples_started += 1
                return s
        raise ValueError(f"sample {sample_uid} is not pending (never taken, already started or finished)")

    def begin_budget_step(self) -> int:
        """Make the current step a budget step (continuous refill); returns its token budget.

        Until the next :meth:`end_step`: a segment is bounded only by the response's room before
        ``max_response_tokens`` (not by ``window_tokens``), and :meth:`append` refuses tokens
        beyond ``num_slots * window_tokens`` for the step, all slots together. Must come before
        the step's first token.
        """
        if self.step_tokens:
            raise ValueError(f"begin_budget_step after {self.step_tokens} tokens were appended in this step")
        self.step_budget = self.num_slots * self.window_tokens
        return self.step_budget

    @property
    def budget_left(self) -> Optional[int]:
        """Tokens the current budget step may still append (None in a window step)."""
        return None if self.step_budget is None else self.step_budget - self.step_tokens

    # ---------------------------------------------------------------- generation
    def _sample_at(self, slot: int) -> Sample:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot!r} does not exist (num_slots={self.num_slots})")
        s = self._slots[slot]
        if s is None:
            raise ValueError(f"slot {slot} is empty (finished or never filled; call refill())")
        return s

    def max_new_tokens(self, slot: int) -> int:
        """Tokens the slot may still generate in its current window (0: window full).

        In a budget step: the response's room before ``max_response_tokens`` (the step's budget
        is shared by all slots; see :attr:`budget_left`).
        """
        s = self._sample_at(slot)
        n = len(s.response_ids)
        if self.step_budget is not None:
            return self.max_response_tokens - n
        return min(self.window_tokens - (n - s.segment_start), self.max_response_tokens - n)

    def requests(self, slots: Optional[Sequence[int]] = None) -> list[WindowRequest]:
        """Generation requests of the given (default: all active) slots that can still generate.

        A slot whose window is full is left out (generators reject max_tokens=0).
        """
        if slots is None:
            slots = [i for i, s in enumerate(self._slots) if s is not None]
        out = []
        for slot in slots:
            n = self.max_new_tokens(slot)
            if n > 0:
                s = self._slots[slot]
                out.append(WindowRequest(slot, s.uid, s.prompt_ids + s.response_ids, n))
        return out

    def append(self, slot: int, token_ids: Sequence[int], logprobs: Sequence[float],
               policy_version: int, eos: bool = False) -> Optional[Sample]:
        """Add generated tokens (and their behaviour log-probs) to the slot's response.

        May be called several times per step (streaming). ``eos``: the last token ended the
        response. Returns the sample if it finished (its slot is now free), else None.
        """
        s = self._sample_at(slot)
        ids, lps = _as_list(token_ids, int), _as_list(logprobs, float)
        if len(ids) != len(lps):
            raise ValueError(f"slot {slot}: {len(ids)} token ids but {len(lps)} logprobs")
        limit = self.max_new_tokens(slot)
        if len(ids) > limit:
            raise ValueError(
                f"slot {slot}: {len(ids)} new tokens exceed the {limit} allowed (window_tokens="
                f"{self.window_tokens}, {len(s.response_ids) - s.segment_start} used in this window, "
                f"response {len(s.response_ids)}/{self.max_response_tokens} tokens)")
        if self.step_budget is not None and len(ids) > self.step_budget - self.step_tokens:
            raise ValueError(f"slot {slot}: {len(ids)} new tokens exceed the step's token budget "
                             f"({self.step_tokens} of {self.step_budget} used)")
        if eos and not ids:
            raise ValueError(f"slot {slot}: eos=True needs at least the EOS token")
        s.response_ids += ids
        s.logprobs += lps
        s.versions += [int(policy_version)] * len(ids)
        s.values += [None] * len(ids)
        self.tokens_generated += len(ids)
        self.step_tokens += len(ids)
        if eos or len(s.response_ids) >= self.max_response_tokens:
            self._finish(slot, s, "eos" if eos else "length_cap")  # EOS at the cap counts as EOS
            return s
        return None

    def _finish(self, slot: int, s: Sample, reason: str) -> None:
        s.finish_reason = reason
        self._slots[slot] = None
        self._finished_step.append(s)
        self.samples_finished += 1
        if all(x.finished for x in self._open[s.group_uid]):
            self._completed[s.group_uid] = self._open.pop(s.group_uid)

    # ---------------------------------------------------------------- step boundary
    def end_step(self) -> StepBatch:
        """Close the open segment of every sample that generated tokens since its last boundary."""
        segments = []
        for s in self._finished_step + [s for s in self._slots if s is not None]:
            a, b = s.segment_start, len(s.response_ids)
            if a == b:  # e.g. filled after the step's last generate call: no segment yet
                continue
            segments.append(Segment(s.uid, s.prompt_uid, s.prompt_ids + s.response_ids[:b],
                                    len(s.prompt_ids), a, b, s.logprobs[a:b], s.versions[a:b],
                                    s.windows, s.finished))
            s.windows += 1
            s.segment_start = b
        for group in self._retired.values():  # the previous step's groups are no longer addressable
            for s in group:
                del self._by_uid[s.uid]
        self._retired, self._completed = self._completed, {}
        self.groups_completed += len(self._retired)
        batch = StepBatch(self.step, segments, self._finished_step, dict(self._retired))
        self._finished_step = []
        self.step += 1
        self.step_budget, self.step_tokens = None, 0
        return batch

    # ---------------------------------------------------------------- critic and rewards
    def sample(self, sample_uid: int) -> Sample:
        """A sample still held by the pool (pending, in flight, in an open or just completed group)."""
        try:
            return self._by_uid[sample_uid]
        except KeyError:
            raise ValueError(f"sample uid {sample_uid} is not (or no longer) in the pool") from None

    def set_values(self, sample_uid: int, start: int, values: Sequence[float],
                   after: Optional[float] = None) -> None:
        """Store critic values for response positions [start, start + len(values)) and, as
        ``value_after``, the value of the state after the last of them (None: unknown)."""
        s = self.sample(sample_uid)
        vals = _as_list(values, float)
        if start < 0 or start + len(vals) > len(s.response_ids):
            raise ValueError(f"sample {sample_uid}: values for [{start}, {start + len(vals)}) "
                             f"outside its response of {len(s.response_ids)} tokens")
        s.values[start:start + len(vals)] = vals
        s.value_after = None if after is None else float(after)

    def set_reward(self, sample_uid: int, reward: float) -> None:
        """Score a finished response (truncated responses get no reward, section 1)."""
        s = self.sample(sample_uid)
        if not s.finished:
            raise ValueError(f"sample {sample_uid} has not finished; only finished responses get rewards")
        s.reward = float(reward)

    # ---------------------------------------------------------------- accounting
    @property
    def exhausted(self) -> bool:
        """The prompt stream has run out (found by the refill that asked for one more prompt)."""
        return self._exhausted

    @property
    def num_active(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def in_flight(self) -> dict[int, Sample]:
        """Slot id -> the sample it holds, active slots only."""
        return {i: s for i, s in enumerate(self._slots) if s is not None}

    def pending(self) -> list[Sample]:
        return list(self._pending)

    def is_drained(self) -> bool:
        """Nothing left to do: stream exhausted, no pending or in-flight sample, step closed."""
        return (self._exhausted and not self._pending and self.num_active == 0
                and not self._finished_step)

    def stats(self) -> dict[str, int]:
        """Counters; invariant: prompts_taken * samples_per_prompt == finished + in_flight + pending."""
        out = {name: getattr(self, name) for name in _COUNTERS if name != "next_sample_uid"}
        out.update(in_flight=self.num_active, pending=self.num_pending, open_groups=len(self._open),
                   exhausted=int(self._exhausted))
        return out

    # ---------------------------------------------------------------- checkpointing
    def _config(self) -> dict[str, int]:
        return dict(num_slots=self.num_slots, samples_per_prompt=self.samples_per_prompt,
                    window_tokens=self.window_tokens, max_response_tokens=self.max_response_tokens)

    def state_dict(self) -> dict:
        """Everything but the prompt stream, as plain python (a deep copy; safe to pickle)."""
        uids = lambda samples: [s.uid for s in samples]  # noqa: E731
        groups = lambda d: [[g, uids(ss)] for g, ss in d.items()]  # noqa: E731
        return {
            "format": _STATE_FORMAT,
            "config": self._config(),
            "counters": {name: getattr(self, name) for name in _COUNTERS},
            "exhausted": self._exhausted,
            "step_budget": self.step_budget,
            "step_tokens": self.step_tokens,
            "samples": [dataclasses.asdict(s) for s in self._by_uid.values()],  # asdict deep-copies
            "slots": [None if s is None else s.uid for s in self._slots],
            "pending": uids(self._pending),
            "finished_step": uids(self._finished_step),
            "open": groups(self._open),
            "completed": groups(self._completed),
            "retired": groups(self._retired),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` exactly. The stream given to ``__init__`` must already be
        positioned after ``state["counters"]["prompts_taken"]`` prompts."""
        if state.get("format") not in (1, _STATE_FORMAT):
            raise ValueError(f"window pool state format {state.get('format')!r}, expected {_STATE_FORMAT}")
        if state["config"] != self._config():
            raise ValueError(f"window pool state was saved with {state['config']}, "
                             f"this pool has {self._config()}")
        by_uid = {d["uid"]: Sample(**copy.deepcopy(d)) for d in state["samples"]}
        groups = lambda pairs: {g: [by_uid[u] for u in us] for g, us in pairs}  # noqa: E731
        self._by_uid = by_uid
        self._slots = [None if u is None else by_uid[u] for u in state["slots"]]
        self._pending = deque(by_uid[u] for u in state["pending"])
        self._finished_step = [by_uid[u] for u in state["finished_step"]]
        self._open, self._completed = groups(state["open"]), groups(state["completed"])
        self._retired = groups(state["retired"])
        self._exhausted = bool(state["exhausted"])
        for name in _COUNTERS:
            setattr(self, name, int(state["counters"][name]))
        self.step_budget, self.step_tokens = state.get("step_budget"), int(state.get("step_tokens", 0))
