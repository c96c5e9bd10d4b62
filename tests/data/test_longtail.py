"""The long-tailed task (data/longtail.py): disjoint splits, verifiable reward, and the SFT data's
response lengths meet the long-tailed task's targets (median <= 0.2 cap, p99 >= 0.7 cap, cap >= 1024)."""
from megatron_tppo.data.arith import parse_answer
from megatron_tppo.data.longtail import LongTailTask, percentiles, response_length, steps_for_length
from megatron_tppo.rewards.arith import arith_reward

CAP = 1024
TASK = LongTailTask(max_steps=steps_for_length(CAP))


def test_cap_and_length_formula():
    assert response_length(TASK.max_steps) <= CAP < response_length(TASK.max_steps + 1)
    p = TASK.problem("train", 3)
    assert len(p.solution) + 1 == response_length(p.steps)  # + EOS, one token per character


def test_sft_data_lengths_meet_targets():
    lengths = [response_length(TASK.problem("train", i).steps) for i in range(3000)]
    pc = percentiles(lengths)
    assert pc["p50"] <= 0.2 * CAP and pc["p99"] >= 0.7 * CAP and pc["max"] <= CAP


def test_splits_disjoint_and_deterministic():
    train = {TASK.problem("train", i).prompt for i in range(2000)}
    held = {p.prompt for p in TASK.heldout_set(200)}
    assert not train & held
    assert TASK.problem("heldout", 5, seed=1) == TASK.problem("heldout", 5, seed=1)
    assert all(TASK.split_of(TASK.problem("heldout", i)) == "heldout" for i in range(20))


def test_reward_verifiable():
    for i in range(50):
        p = TASK.problem("train", i)
        assert parse_answer(p.solution) == p.answer
        assert arith_reward(p.solution, {"answer": p.answer}) == 1.0
        wrong = p.solution[: p.solution.rindex("#")] + f"#{(p.answer + 1) % 100:02d}"
        assert arith_reward(wrong, {"answer": p.answer}) == 0.0
