"""The synthetic arith task: splits, determinism, lengths, and the arith reward on solutions."""
from __future__ import annotations

import statistics

import pytest

from megatron_tppo.data.arith import ArithProblem, ArithSplit, ArithTask, parse_answer, response_length
from megatron_tppo.rewards import arith_reward

TASK = ArithTask()


def test_problem_is_a_pure_function_of_seed_split_index():
    a = [TASK.problem("train", i, seed=7) for i in range(50)]
    b = [TASK.problem("train", i, seed=7) for i in range(50)]
    c = [TASK.problem("train", i, seed=8) for i in range(50)]
    assert a == b
    assert a != c
    assert ArithSplit(TASK, "train", 50, seed=7)[13][0] == a[13].prompt


def test_train_and_heldout_never_share_a_problem():
    train = {TASK.problem("train", i, s).prompt for s in (0, 1) for i in range(2000)}
    held = {TASK.problem("heldout", i, s).prompt for s in (0, 1) for i in range(400)}
    assert not train & held
    assert all(TASK.split_of(TASK.problem("heldout", i)) == "heldout" for i in range(100))
    hs = TASK.heldout_set(100, seed=3)
    assert len({p.prompt for p in hs}) == 100  # distinct


def test_worked_solution_is_correct_and_scored_one():
    for i in range(300):
        p = TASK.problem("train", i)
        assert arith_reward(p.solution, {"answer": p.answer}) == 1.0
        assert parse_answer(p.solution) == p.answer
        wrong = p.solution.rsplit("#", 1)[0] + f"#{(p.answer + 1) % 100:02d}"
        assert arith_reward(wrong, {"answer": p.answer}) == 0.0
        # the text the tokenizer makes: solution + EOS (+1 token); each step is 10 characters
        assert len(p.solution) + 1 == response_length(p.steps)


def test_values_follow_the_chain_mod_100():
    p = ArithProblem(95, (("+", 7), ("-", 3), ("-", 9)))
    assert p.values() == [2, 99, 90]
    assert p.prompt == "95 a+7 b-3 c-9 ?"
    assert p.solution == "a+7:95=02 b-3:02=99 c-9:99=90 #90"


def test_length_distribution_has_a_long_tail():
    steps = [TASK.problem("train", i).steps for i in range(4000)]
    lengths = [response_length(s) for s in steps]
    assert statistics.median(steps) <= 3
    assert max(steps) == TASK.max_steps >= 5 * statistics.median(steps)
    assert min(lengths) >= 10 and max(lengths) <= 192  # fits max_response_tokens of tiny_cpu.yaml


@pytest.mark.parametrize("text,expected", [("a+2:01=03 #03", 3), ("#5 then #07", 7), ("no answer", None),
                                           ("# 42", 42)])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_reward_without_answer_or_wrong_is_zero():
    assert arith_reward("a+2:01=03", {"answer": 3}) == 0.0
    assert arith_reward("#03<eos>", {"answer": 3}) == 1.0
    assert arith_reward("#4", {"answer": "4"}) == 1.0


def test_bad_task_parameters():
    with pytest.raises(ValueError):
        ArithTask(max_steps=0)
    with pytest.raises(ValueError):
        ArithTask(continue_prob=1.0)
    with pytest.raises(ValueError):
        TASK.problem("test", 0)
