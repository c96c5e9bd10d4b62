"""Prompt datasets: JSONL/Parquet with templates, malformed rows, the resumable stream, eval sets."""
from __future__ import annotations

import itertools
import json

import pytest

from megatron_tppo.algorithms.window_pool import Prompt, WindowPool
from megatron_tppo.config import DataConfig
from megatron_tppo.data.datasets import (DataError, PromptStream, build_eval_prompts, build_prompt_stream,
                                         read_records, render, reward_name)


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def decode(ids) -> str:
    return "".join(chr(i) for i in ids)


GOOD = [{"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "Half of 1?", "answer": "\\frac{1}{2}"},
        {"prompt": "Three", "answer": 3}]


def write_jsonl(path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_render_keeps_other_braces():
    assert render("Solve {x}: {prompt}\n\\boxed{}", "2+2") == "Solve {x}: 2+2\n\\boxed{}"


def test_jsonl_with_template(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD)
    d = DataConfig(task="jsonl", train_path=str(path), template="Q: {prompt}\nA:", shuffle=False)
    stream = build_prompt_stream(d, encode, seed=0)
    got = list(itertools.islice(stream, 4))
    assert [decode(p.prompt_ids) for p in got[:3]] == [f"Q: {r['prompt']}\nA:" for r in GOOD]
    assert [p.meta["answer"] for p in got] == ["2", "\\frac{1}{2}", 3, "2"]  # wraps into epoch 2
    assert [p.uid for p in got] == [0, 1, 2, 3]


def test_parquet_nested_keys_and_chat_prompts(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+3?"}],
             "reward_model": {"ground_truth": "5"}},
            {"prompt": [{"role": "user", "content": "7*6?"}], "reward_model": {"ground_truth": "42"}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    recs = read_records(tmp_path / "d.parquet", "prompt", "reward_model.ground_truth")
    assert recs.items == [("2+3?", {"answer": "5"}), ("7*6?", {"answer": "42"})]
    plain = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD[:2] + [{"prompt": "", "answer": "1"}]), plain)
    d = DataConfig(task="parquet", train_path=str(plain), template="<{prompt}>", shuffle=False)
    s = build_prompt_stream(d, encode, 0)
    assert decode(next(s).prompt_ids) == "<What is 1+1?>" and s.bad_rows == 1


BAD_LINES = ['{"prompt": "ok", "answer": "1"', '{"answer": "1"}', '{"prompt": 5, "answer": "1"}',
             '{"prompt": "  ", "answer": "1"}', '[1, 2]', '{"prompt": "x", "answer": null}',
             '{"prompt": "x"}']


def test_bad_rows_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD, BAD_LINES + [""])
    recs = read_records(path, bad_rows="skip")
    assert len(recs) == 3 and recs.bad_rows == len(BAD_LINES)  # the blank line is not a row
    assert recs.bad_examples[0].startswith(f"{path}:4: bad JSON")
    assert "missing prompt key 'prompt'" in recs.bad_examples[1]


@pytest.mark.parametrize("k", range(len(BAD_LINES)))
def test_bad_rows_error_names_file_and_line(tmp_path, k):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD[:1], [BAD_LINES[k]])
    with pytest.raises(DataError, match=r"d\.jsonl:2: "):
        read_records(path, bad_rows="error")


def test_missing_file_and_no_valid_rows(tmp_path):
    d = DataConfig(task="jsonl", train_path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"data\.train_path .*nope\.jsonl"):
        build_prompt_stream(d, encode, 0)
    with pytest.raises(DataError, match="no valid rows"):
        read_records(write_jsonl(tmp_path / "bad.jsonl", [], BAD_LINES[:2]))


@pytest.mark.parametrize("shuffle", [True, False])
def test_stream_resume_equals_uninterrupted(tmp_path, shuffle):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "answer": i} for i in range(7)])
    d = DataConfig(task="jsonl", train_path=str(path), shuffle=shuffle)
    full = [(p.uid, p.prompt_ids, p.meta) for p in itertools.islice(build_prompt_stream(d, encode, 5), 30)]
    for cut in (0, 3, 7, 12):
        a = build_prompt_stream(d, encode, 5)
        head = [(p.uid, p.prompt_ids, p.meta) for p in itertools.islice(a, cut)]
        state = json.loads(json.dumps(a.state_dict()))  # a checkpoint is plain data
        b = build_prompt_stream(d, encode, 5)
        b.load_state_dict(state)
        assert head + [(p.uid, p.prompt_ids, p.meta) for p in itertools.islice(b, 30 - cut)] == full
    epochs = [sorted(m["answer"] for _, _, m in full[i:i + 7]) for i in (0, 7, 14)]
    assert all(e == list(range(7)) for e in epochs)  # every epoch visits each record once
    if shuffle:
        assert [m["answer"] for _, _, m in full[:7]] != [m["answer"] for _, _, m in full[7:14]]


def test_stream_state_from_another_dataset_is_refused():
    a = PromptStream([("x", {"answer": 1})] * 3, encode, seed=1)
    b = PromptStream([("x", {"answer": 1})] * 4, encode, seed=1)
    with pytest.raises(ValueError, match="saved for"):
        b.load_state_dict(a.state_dict())


def test_arith_stream_feeds_the_window_pool():
    d = DataConfig()
    stream = build_prompt_stream(d, encode, seed=0)
    first = next(stream)
    assert isinstance(first, Prompt) and set(first.meta) == {"answer", "steps"}
    pool = WindowPool(num_slots=4, samples_per_prompt=2, window_tokens=8, max_response_tokens=32, prompts=stream)
    pool.refill()
    assert pool.prompts_taken == 2 and stream.taken == 3
    assert reward_name(d) == "arith" and reward_name(DataConfig(task="jsonl")) == "math"


def test_eval_prompts(tmp_path):
    d = DataConfig(eval_prompts=20)
    ev = build_eval_prompts(d, encode, seed=0)
    assert [p.uid for p in ev] == list(range(20))
    train = {decode(p.prompt_ids) for p in itertools.islice(build_prompt_stream(d, encode, 0), 3000)}
    assert not train & {decode(p.prompt_ids) for p in ev}
    assert ev == build_eval_prompts(d, encode, seed=0)
    path = write_jsonl(tmp_path / "e.jsonl", GOOD)
    fd = DataConfig(task="jsonl", train_path=str(path), eval_path=str(path), eval_prompts=2, template="Q:{prompt}")
    ev = build_eval_prompts(fd, encode, 0)
    assert [(decode(p.prompt_ids), p.meta["answer"]) for p in ev] == [("Q:What is 1+1?", "2"), ("Q:Half of 1?", "\\frac{1}{2}")]
    assert build_eval_prompts(DataConfig(task="jsonl", train_path=str(path)), encode, 0) == []
