"""Window pool: invariants under random generation (hypothesis) and the error paths.

A small simulated generator drives the pool: every sample has a deterministic "natural" length
(where it emits EOS, or beyond max_response_tokens: never), and deterministic tokens, log-probs
and critic values, so two pools fed the same calls must behave identically.
Drive modes: "window" (paper: refill at step start, each slot fills its window in one call),
"continuous" (window steps, but refill right after a slot finishes and tokens streamed in small
chunks; the step ends when every slot's window is full) and "budget" (rollout.refill=continuous:
budget steps driven by the real controller/continuous.py over 1-3 simulated stream engines, whose
replies are taken in a seeded random order and whose requests skip iterations at random, so slots
progress unevenly; the step ends after num_slots * window_tokens tokens).
"""
from __future__ import annotations

import ast
import dataclasses
import itertools
import math
import pickle
import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_tppo.algorithms import window_pool
from megatron_tppo.algorithms.window_pool import Prompt, StepBatch, WindowPool
from megatron_tppo.controller.continuous import ContinuousStep
from megatron_tppo.rollout.base import Sampling
from tests.unit.sim_stream import SimStreamEngine

MODES = ("window", "continuous", "budget")


# ------------------------------------------------------------------ simulated generator
def make_prompts(n: int) -> list[Prompt]:
    return [Prompt(uid=i, prompt_ids=[100 + i] * (1 + i % 3), meta={"answer": str(i)}) for i in range(n)]


@dataclasses.dataclass
class SimGenerator:
    seed: int
    max_len: int

    def natural_len(self, uid: int) -> int:
        r = random.Random(self.seed * 1_000_003 + uid)
        return self.max_len + 1 if r.random() < 0.3 else r.randint(1, self.max_len)

    @staticmethod
    def token(uid: int, pos: int) -> int:
        return (uid * 7919 + pos * 31) % 50_000

    @staticmethod
    def logprob(uid: int, pos: int) -> float:
        return -((uid + pos) % 11) / 10

    @staticmethod
    def value(uid: int, pos: int) -> float:
        return ((uid * 3 + pos) % 7) / 7

    def generate(self, pool: WindowPool, slot: int, n_max: int, version: int):
        """Generate up to n_max tokens for the slot (fewer if EOS comes first); append them."""
        s = pool.in_flight()[slot]
        have, nat = len(s.response_ids), self.natural_len(s.uid)
        n = min(n_max, nat - have)
        ids = [self.token(s.uid, p) for p in range(have, have + n)]
        lps = [self.logprob(s.uid, p) for p in range(have, have + n)]
        if s.uid % 2:  # half the samples feed tensors, as a vLLM backend might
            ids, lps = torch.tensor(ids), torch.tensor(lps, dtype=torch.float64)
        return pool.append(slot, ids, lps, policy_version=version, eos=have + n == nat), n


def check_refill(pool: WindowPool) -> None:
    pool.refill()
    # Active slots stay at num_slots while prompts remain.
    assert pool.num_active == pool.num_slots or (pool.exhausted and pool.num_pending == 0)


def drive_budget_step(pool: WindowPool, gen: SimGenerator, version: int, rng: random.Random,
                      swap_at: int = -1, reload=None) -> WindowPool:
    """A budget step through ContinuousStep over simulated engines (replies in random order).

    ``swap_at``: after that many engine replies, continue on ``reload(pool.state_dict())``, a new
    pool restored from the (pickled) state: a mid-step checkpoint. Returns the pool the step
    ended on.
    """
    engines = [SimStreamEngine(gen, lambda uid: len(pool.sample(uid).prompt_ids), seed=rng.randrange(1 << 30),
                               hiccup=rng.choice([0.0, 0.3]), version=version)
               for _ in range(rng.randint(1, 3))]
    feed = ContinuousStep(pool, len(engines), Sampling(seed=version), reserve=rng.choice([None, 1, 2]))
    assert pool.num_active == pool.num_slots or (pool.exhausted and pool.num_pending == 0)
    calls = {e: c for e, c in enumerate(feed.first_calls()) if c is not None}
    replies = 0
    while calls:
        e = rng.choice(sorted(calls))
        nxt = feed.on_update(e, engines[e].stream(*calls[e].args()))
        # results come when a request ends, so the pool lags the engines' counts until then
        assert 0 <= pool.budget_left and pool.step_tokens <= sum(feed.tokens)
        calls.pop(e) if nxt is None else calls.update({e: nxt})
        replies += 1
        if replies == swap_at:
            state = pool.state_dict()
            pool = feed.pool = reload(pickle.loads(pickle.dumps(state)))
            assert pool.state_dict() == state
    # The budget: never exceeded; spent whole unless the prompt stream ran dry.
    assert pool.step_tokens <= pool.step_budget == pool.num_slots * pool.window_tokens
    assert pool.step_tokens == pool.step_budget or pool.exhausted
    assert feed.stats()["tokens"] == pool.step_tokens
    return pool


def drive_step(pool: WindowPool, gen: SimGenerator, mode: str) -> StepBatch:
    """One T-PPO step: refill, generate, end the step, then score and run the 'critic'."""
    version, rng = pool.step, random.Random(gen.seed * 7 + pool.step)
    if mode == "budget":
        return finish_step(drive_budget_step(pool, gen, version, rng), gen)
    check_refill(pool)
    if mode == "window":
        for r in pool.requests():
            assert r.token_ids == pool.in_flight()[r.slot].prompt_ids + pool.in_flight()[r.slot].response_ids
            gen.generate(pool, r.slot, r.max_new_tokens, version)
    else:
        while reqs := pool.requests():
            for r in reqs:
                finished, _ = gen.generate(pool, r.slot, min(r.max_new_tokens, rng.randint(1, 3)), version)
                if finished is not None:
                    check_refill(pool)  # refill mid-step, in a window step
    return finish_step(pool, gen)


def finish_step(pool: WindowPool, gen: SimGenerator) -> StepBatch:
    batch = pool.end_step()
    for seg in batch.segments:
        pool.set_values(seg.sample_uid, seg.start,
                        [gen.value(seg.sample_uid, p) for p in range(seg.start, seg.end)])
    for s in batch.finished:
        pool.set_reward(s.uid, float(len(s.response_ids) % 2))
    return batch


def canonical(batch: StepBatch):
    """A plain, comparable picture of a batch (objects differ across a state round trip)."""
    return (batch.step, [dataclasses.asdict(s) for s in batch.segments],
            [dataclasses.asdict(s) for s in batch.finished],
            {g: [s.uid for s in ss] for g, ss in batch.completed_groups.items()})


def assert_plain(x) -> None:
    if isinstance(x, dict):
        for k, v in x.items():
            assert isinstance(k, (int, str))
            assert_plain(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            assert_plain(v)
    else:
        assert x is None or isinstance(x, (bool, int, float, str, torch.Tensor)), type(x)


configs = st.fixed_dictionaries(dict(
    num_slots=st.integers(1, 6), spp=st.integers(1, 4), window=st.integers(1, 8),
    max_len=st.integers(1, 20), num_prompts=st.integers(0, 10), seed=st.integers(0, 2**16)))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def new_pool(cfg, prompts) -> WindowPool:
    return WindowPool(cfg["num_slots"], cfg["spp"], cfg["window"], cfg["max_len"], prompts)


# ------------------------------------------------------------------ property tests
@SETTINGS
@given(cfg=configs, mode=st.sampled_from(MODES))
def test_invariants_until_drained(cfg, mode):
    spp, W, L = cfg["spp"], cfg["window"], cfg["max_len"]
    pool, gen = new_pool(cfg, make_prompts(cfg["num_prompts"])), SimGenerator(cfg["seed"], L)
    finished, segments, completed = {}, {}, {}
    max_steps = cfg["num_prompts"] * spp * L + 3
    while not pool.is_drained():
        assert pool.step < max_steps, "pool does not drain"
        batch = drive_step(pool, gen, mode)
        for seg in batch.segments:
            segments.setdefault(seg.sample_uid, []).append(seg)
            assert seg.token_ids[:seg.prompt_len] == pool.sample(seg.sample_uid).prompt_ids
            if mode != "budget" and not seg.finished:  # a truncated window is a full window
                assert seg.end - seg.start == W
        for s in batch.finished:
            assert s.uid not in finished
            finished[s.uid] = s
        for g, ss in batch.completed_groups.items():
            assert g not in completed and [s.index for s in ss] == list(range(spp))
            assert all(s.finished and s.group_uid == g for s in ss)
            completed[g] = ss
        # No prompt lost or duplicated: every sample of every prompt taken is exactly once
        # finished, in flight or pending.
        live = list(pool.in_flight().values()) + pool.pending()
        assert all(not s.finished for s in live)
        keys = [(s.prompt_uid, s.index) for s in itertools.chain(finished.values(), live)]
        assert sorted(keys) == list(itertools.product(range(pool.prompts_taken), range(spp)))
        uids = list(finished) + [s.uid for s in live]
        assert len(set(uids)) == len(uids)
        st_ = pool.stats()
        assert st_["prompts_taken"] * spp == st_["samples_finished"] + st_["in_flight"] + st_["pending"]
        assert st_["samples_finished"] == len(finished) and st_["groups_completed"] == len(completed)

    assert pool.prompts_taken == cfg["num_prompts"] and sorted(completed) == list(range(cfg["num_prompts"]))
    assert pool.stats()["tokens_generated"] == sum(len(s.response_ids) for s in finished.values())
    for uid, s in finished.items():
        n = len(s.response_ids)
        nat = gen.natural_len(uid)
        assert (s.finish_reason, n) == (("eos", nat) if nat <= L else ("length_cap", L))
        assert s.reward == float(n % 2)
        # Segments tile the response: contiguous, no gap or overlap, same tokens/logprobs.
        segs = segments[uid]
        assert [x.start for x in segs] == [0] + [x.end for x in segs[:-1]] and segs[-1].end == n
        assert [x.window for x in segs] == list(range(len(segs))) == list(range(s.windows))
        assert [x.finished for x in segs] == [False] * (len(segs) - 1) + [True]
        assert sum((x.segment_ids for x in segs), []) == s.response_ids
        assert sum((x.logprobs for x in segs), []) == s.logprobs
        assert sum((x.versions for x in segs), []) == s.versions
        assert s.values == [gen.value(uid, p) for p in range(n)]  # earlier windows' values kept
        if mode != "budget":
            assert s.windows == math.ceil(n / W) <= math.ceil(L / W)


@SETTINGS
@given(cfg=configs, mode=st.sampled_from(MODES), split=st.integers(0, 25))
def test_state_dict_round_trip_continues_identically(cfg, mode, split):
    prompts, gen = make_prompts(cfg["num_prompts"]), SimGenerator(cfg["seed"], cfg["max_len"])
    a = new_pool(cfg, prompts)
    for _ in range(split):
        if a.is_drained():
            break
        drive_step(a, gen, mode)
    state = a.state_dict()
    assert_plain(state)
    frozen = pickle.dumps(state)
    b = new_pool(cfg, prompts[state["counters"]["prompts_taken"]:])  # stream resumed by the caller
    b.load_state_dict(pickle.loads(frozen))
    assert b.state_dict() == state and b.stats() == a.stats()
    steps = 0
    while not a.is_drained():
        assert canonical(drive_step(a, gen, mode)) == canonical(drive_step(b, gen, mode))
        steps += 1
        assert steps < 1000
    assert b.is_drained() and b.state_dict() == a.state_dict()
    assert pickle.loads(frozen) == state  # state_dict was a copy, untouched by later steps


@SETTINGS
@given(cfg=configs, steps=st.integers(0, 6), swap_at=st.integers(1, 12))
def test_budget_step_mid_step_round_trip_continues_identically(cfg, steps, swap_at):
    """A checkpoint taken inside a budget step (engines mid-stream, samples handed out but not
    started, slots holding a second response) restores a pool that ends the run identically."""
    prompts, gen = make_prompts(cfg["num_prompts"]), SimGenerator(cfg["seed"], cfg["max_len"])
    runs = []
    for swap in (-1, swap_at):
        pool, batches = new_pool(cfg, prompts), []
        for _ in range(steps):
            batches.append(canonical(drive_step(pool, gen, "budget")))

        def reload(state):
            p = new_pool(cfg, prompts[state["counters"]["prompts_taken"]:])
            p.load_state_dict(state)
            return p

        rng = random.Random(gen.seed * 7 + pool.step)
        pool = drive_budget_step(pool, gen, pool.step, rng, swap_at=swap, reload=reload)
        batches.append(canonical(finish_step(pool, gen)))
        while not pool.is_drained():
            batches.append(canonical(drive_step(pool, gen, "budget")))
            assert len(batches) < 1000
        runs.append((batches, pool.state_dict()))
    assert runs[0] == runs[1]


def test_budget_step_refills_at_once_and_truncates_at_the_budget():
    """One engine, 2 slots x window 4 = a budget of 8: sample 0 ends after 2 tokens and its slot
    takes sample 2 at once; the step ends at 8 tokens with samples 1 and 2 truncated."""
    gen = SimGenerator(0, 20)
    lengths = {0: 2, 1: 20 + 1, 2: 20 + 1, 3: 20 + 1}
    gen.natural_len = lambda uid: lengths.get(uid, 21)  # 21 > max_len: never EOS
    pool = WindowPool(2, 2, 4, 20, make_prompts(3))
    feed = ContinuousStep(pool, 1, Sampling())
    engine = SimStreamEngine(gen, lambda uid: len(pool.sample(uid).prompt_ids))
    (call,) = feed.first_calls()
    assert [(r.key, r.slot, r.max_tokens) for r in call.requests] == [(0, 0, 20), (1, 1, 20), (2, None, 20), (3, None, 20)]
    upd = engine.stream(*call.args())
    assert upd.closed and upd.tokens == 8 and upd.iterations == 4 and upd.unstarted == [3]
    assert [(type(ev).__name__, ev.key, ev.slot) for ev in upd.events] == [
        ("StreamResult", 0, 0), ("StreamStart", 2, 0), ("StreamResult", 2, 0), ("StreamResult", 1, 1)]
    assert feed.on_update(0, upd) is None and feed.stats()["utilization"] == 1.0
    b = pool.end_step()
    assert [(x.sample_uid, x.start, x.end, x.finished) for x in b.segments] == [
        (0, 0, 2, True), (2, 0, 2, False), (1, 0, 4, False)]  # finished first, then by slot
    assert [s.uid for s in pool.pending()] == [3] and pool.stats()["samples_started"] == 3
    # next step: the truncated samples resume from their token ids, sample 3 waits its turn
    feed = ContinuousStep(pool, 1, Sampling())
    (call,) = feed.first_calls()
    assert [(r.key, r.slot, r.token_ids) for r in call.requests[:2]] == [
        (2, 0, pool.sample(2).prompt_ids + pool.sample(2).response_ids), (1, 1, pool.sample(1).prompt_ids + pool.sample(1).response_ids)]


# ------------------------------------------------------------------ a worked example
def test_walkthrough_groups_straddle_refills():
    pool = WindowPool(num_slots=3, samples_per_prompt=2, window_tokens=2, max_response_tokens=5,
                      prompts=make_prompts(3))
    assert pool.refill() == [0, 1, 2]
    assert [(s.uid, s.prompt_uid, s.index) for s in pool.in_flight().values()] == [(0, 0, 0), (1, 0, 1), (2, 1, 0)]
    assert [s.uid for s in pool.pending()] == [3] and pool.prompts_taken == 2
    assert [(r.slot, r.token_ids, r.max_new_tokens) for r in pool.requests()] == [
        (0, [100], 2), (1, [100], 2), (2, [101, 101], 2)]
    pool.append(0, [7], [-0.1], policy_version=0, eos=True)
    pool.append(1, [8, 9], [-0.2, -0.3], policy_version=0)
    pool.append(2, [5], [-0.4], policy_version=0)  # streamed in two calls
    pool.append(2, [6], [-0.5], policy_version=0)
    b0 = pool.end_step()
    assert [(x.sample_uid, x.start, x.end, x.finished) for x in b0.segments] == [
        (0, 0, 1, True), (1, 0, 2, False), (2, 0, 2, False)]
    assert b0.segments[2].token_ids == [101, 101, 5, 6] and b0.segments[2].logprobs == [-0.4, -0.5]
    assert [s.uid for s in b0.finished] == [0] and b0.completed_groups == {}

    assert pool.refill() == [0] and pool.prompts_taken == 2  # took the pending sample, no new prompt
    assert pool.requests([1])[0].token_ids == [100, 8, 9]
    pool.append(1, [1, 2], [-1.0, -1.0], policy_version=1, eos=True)
    pool.append(2, [3, 4], [-1.0, -1.0], policy_version=1)
    assert pool.requests([2]) == []  # window full: nothing to ask for
    pool.append(0, [9], [-1.0], policy_version=1, eos=True)
    b1 = pool.end_step()
    assert [s.uid for s in b1.finished] == [1, 3]
    assert list(b1.completed_groups) == [0] and [s.uid for s in b1.completed_groups[0]] == [0, 1]
    pool.set_reward(0, 1.0)

    assert pool.refill() == [0, 1] and pool.prompts_taken == 3
    assert pool.max_new_tokens(2) == 1  # the cap, not the window, limits slot 2
    pool.append(2, [0], [-2.0], policy_version=2)
    b2 = pool.end_step()
    (seg,) = b2.segments  # the freshly filled slots generated nothing: no segments
    assert (seg.sample_uid, seg.start, seg.end, seg.window, seg.finished) == (2, 4, 5, 2, True)
    assert b2.finished[0].finish_reason == "length_cap" and b2.finished[0].windows == 3
    assert b2.finished[0].versions == [0, 0, 1, 1, 2]
    assert list(b2.completed_groups) == [1]
    with pytest.raises(ValueError, match="no longer"):
        pool.sample(0)  # group 0 was returned at step 1 and dropped at step 2
    assert pool.stats() == dict(step=3, prompts_taken=3, samples_started=6, samples_finished=4,
                                groups_completed=2, tokens_generated=11, in_flight=2, pending=0,
                                open_groups=1, exhausted=0)


def test_ppo_special_case_finishes_in_one_window():
    pool = WindowPool(2, 1, window_tokens=8, max_response_tokens=8, prompts=make_prompts(2))
    pool.refill()
    assert [r.max_new_tokens for r in pool.requests()] == [8, 8]
    pool.append(0, list(range(8)), [0.0] * 8, 0)
    pool.append(1, [1, 2], [0.0] * 2, 0, eos=True)
    b = pool.end_step()
    assert [s.windows for s in b.finished] == [1, 1] and all(x.finished for x in b.segments)


def test_mid_step_state_round_trip():
    """A checkpoint taken inside a step keeps open segments and samples finished this step."""
    pools = [WindowPool(2, 2, 4, 6, make_prompts(3))]
    pools[0].refill()
    pools[0].append(0, [1, 2, 3], [-1.0] * 3, 0, eos=True)
    pools[0].refill()  # continuous: slot 0 takes sample 2 at once
    pools[0].append(1, [4, 5], [-1.0] * 2, 0)
    state = pools[0].state_dict()
    pools.append(WindowPool(2, 2, 4, 6, make_prompts(3)[state["counters"]["prompts_taken"]:]))
    pools[1].load_state_dict(state)
    for p in pools:
        p.append(1, [6], [-1.0], 0)
        p.append(0, [7], [-1.0], 0)
    b0, b1 = (canonical(p.end_step()) for p in pools)
    assert b0 == b1 and [s["uid"] for s in b0[2]] == [0]
    assert [(x["sample_uid"], x["start"], x["end"]) for x in b0[1]] == [(0, 0, 3), (2, 0, 1), (1, 0, 3)]


# ------------------------------------------------------------------ edge cases and errors
@pytest.mark.parametrize("name", ["num_slots", "samples_per_prompt", "window_tokens", "max_response_tokens"])
@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_constructor_args_name_the_argument(name, bad):
    args = dict(num_slots=2, samples_per_prompt=2, window_tokens=4, max_response_tokens=8)
    args[name] = bad
    with pytest.raises(ValueError, match=name):
        WindowPool(prompts=[], **args)


def test_too_many_tokens_for_window_or_cap():
    pool = WindowPool(1, 1, window_tokens=4, max_response_tokens=10, prompts=make_prompts(1))
    pool.refill()
    with pytest.raises(ValueError, match="5 new tokens exceed the 4 allowed.*window_tokens=4"):
        pool.append(0, [1] * 5, [0.0] * 5, 0)
    pool.append(0, [1] * 3, [0.0] * 3, 0)
    with pytest.raises(ValueError, match="2 new tokens exceed the 1 allowed"):
        pool.append(0, [1] * 2, [0.0] * 2, 0)
    pool.append(0, [1], [0.0], 0)
    with pytest.raises(ValueError, match="exceed the 0 allowed"):
        pool.append(0, [1], [0.0], 0)
    pool.end_step()  # new window: 4 more, then the cap (10) allows only 2 in the third window
    pool.append(0, [1] * 4, [0.0] * 4, 1)
    pool.end_step()
    with pytest.raises(ValueError, match="exceed the 2 allowed.*response 8/10"):
        pool.append(0, [1] * 3, [0.0] * 3, 2)
    assert pool.append(0, [1] * 2, [0.0] * 2, 2).finish_reason == "length_cap"


def test_unknown_or_empty_slot():
    pool = WindowPool(2, 1, 4, 8, make_prompts(1))
    pool.refill()  # only one prompt: slot 1 stays empty
    assert pool.exhausted and pool.num_active == 1
    for slot in (-1, 2, "0", None):
        with pytest.raises(ValueError, match="does not exist"):
            pool.append(slot, [1], [0.0], 0)
    with pytest.raises(ValueError, match="slot 1 is empty"):
        pool.append(1, [1], [0.0], 0)
    with pytest.raises(ValueError, match="slot 1 is empty"):
        pool.requests([1])


def test_bad_append_values():
    pool = WindowPool(1, 1, 4, 8, make_prompts(1))
    pool.refill()
    with pytest.raises(ValueError, match="2 token ids but 1 logprobs"):
        pool.append(0, [1, 2], [0.0], 0)
    with pytest.raises(ValueError, match="eos=True needs"):
        pool.append(0, [], [], 0, eos=True)
    assert pool.append(0, [], [], 0) is None and pool.end_step().segments == []  # empty: no-op


def test_values_and_rewards():
    pool = WindowPool(1, 1, 4, 8, make_prompts(1))
    pool.refill()
    pool.append(0, torch.tensor([1, 2, 3]), torch.tensor([-0.5, -0.25, -1.0]), 0)
    with pytest.raises(ValueError, match="has not finished"):
        pool.set_reward(0, 1.0)
    with pytest.raises(ValueError, match=r"\[2, 4\) outside its response of 3"):
        pool.set_values(0, 2, [0.0, 0.0])
    with pytest.raises(ValueError, match="uid 9 is not"):
        pool.set_values(9, 0, [0.0])
    pool.set_values(0, 1, torch.tensor([0.5, 0.75]))
    s = pool.sample(0)
    assert s.values == [None, 0.5, 0.75] and s.logprobs == [-0.5, -0.25, -1.0]
    assert all(type(t) is int for t in s.response_ids)


def test_empty_and_exhausted_stream():
    pool = WindowPool(3, 2, 4, 8, prompts=iter(()))
    assert not pool.exhausted and not pool.is_drained()  # not known until a refill asks
    assert pool.refill() == [] and pool.exhausted and pool.is_drained()
    b = pool.end_step()
    assert (b.segments, b.finished, b.completed_groups) == ([], [], {})


def test_duplicate_prompt_uid_and_empty_prompt():
    pool = WindowPool(2, 1, 4, 8, [Prompt(5, [1]), Prompt(5, [2])])
    with pytest.raises(ValueError, match="prompt uid 5 is already"):
        pool.refill()
    with pytest.raises(ValueError, match="no tokens"):
        WindowPool(1, 1, 4, 8, [Prompt(0, [])]).refill()


def test_load_state_dict_rejects_other_config():
    state = WindowPool(2, 2, 4, 8, []).state_dict()
    with pytest.raises(ValueError, match="saved with"):
        WindowPool(2, 2, 5, 8, []).load_state_dict(state)
    with pytest.raises(ValueError, match="format"):
        WindowPool(2, 2, 4, 8, []).load_state_dict({**state, "format": 99})


def test_imports_are_pure():
    """The pool is pure algorithm code: no megatron, vLLM, Ray, torch.distributed or CUDA."""
    tree = ast.parse(Path(window_pool.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    banned = ("megatron", "vllm", "ray", "torch.distributed", "torch.cuda", "transformer_engine")
    assert not [m for m in names if any(m == b or m.startswith(b + ".") for b in banned)], names


def test_budget_step_errors_and_upcoming():
    pool = WindowPool(2, 2, 3, 10, make_prompts(3))
    assert pool.budget_left is None and [s.uid for s in pool.upcoming(3)] == [0, 1, 2]
    assert pool.prompts_taken == 2 and pool.num_pending == 4  # upcoming took prompts, started nothing
    assert [s.uid for s in pool.upcoming(2, skip={0, 2})] == [1, 3]
    assert pool.begin_budget_step() == 6 and pool.budget_left == 6
    pool.start(1, 2)  # out of FIFO order: another engine had samples 0 and 1
    with pytest.raises(ValueError, match="slot 1 is busy"):
        pool.start(1, 3)
    with pytest.raises(ValueError, match="sample 2 is not pending"):
        pool.start(0, 2)
    assert pool.max_new_tokens(1) == 10  # a budget step bounds a segment by the response's room only
    pool.append(1, [1] * 5, [0.0] * 5, 0)
    with pytest.raises(ValueError, match="exceed the step's token budget.*5 of 6"):
        pool.append(1, [1] * 2, [0.0] * 2, 0)
    pool.append(1, [1], [0.0], 0)
    with pytest.raises(ValueError, match="begin_budget_step after 6 tokens"):
        pool.begin_budget_step()
    (seg,) = pool.end_step().segments
    assert (seg.sample_uid, seg.start, seg.end) == (2, 0, 6) and pool.budget_left is None
    assert pool.max_new_tokens(1) == 3  # a window step again
    assert [s.uid for s in pool.pending()] == [0, 1, 3]


def test_format_1_state_loads_as_a_window_step():
    pool = WindowPool(2, 2, 4, 8, make_prompts(2))
    pool.refill()
    pool.append(0, [1, 2], [0.0, 0.0], 0)
    state = pool.state_dict()
    old = {k: v for k, v in state.items() if k not in ("step_budget", "step_tokens")}
    old["format"] = 1
    b = WindowPool(2, 2, 4, 8, make_prompts(2)[state["counters"]["prompts_taken"]:])
    b.load_state_dict(old)
    assert b.step_budget is None and b.stats() == pool.stats()
