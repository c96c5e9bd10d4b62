"""The character tokenizer: round trips, fixed ids, and loading through AutoTokenizer."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tppo.data import tokenizer as chartok
from megatron_tppo.data.arith import ArithTask


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    d = chartok.save_tokenizer(tmp_path_factory.mktemp("tok"))
    return chartok.load_tokenizer(d), d


def test_vocabulary_is_fixed():
    assert chartok.VOCAB_SIZE == 99
    assert (chartok.PAD_ID, chartok.EOS_ID, chartok.UNK_ID) == (0, 1, 2)
    assert chartok.VOCAB["\n"] == 3 and chartok.VOCAB[" "] == 4 and chartok.VOCAB["~"] == 98


def test_directory_loads_with_autotokenizer(hf_tok):
    tok, d = hf_tok
    assert {p.name for p in d.iterdir()} >= set(chartok.TOKENIZER_FILES)
    assert json.loads((d / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert len(tok) == chartok.VOCAB_SIZE
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([1]) == ["<eos>"]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=chartok.CHARS, max_size=80))
def test_round_trip_any_ascii(hf_tok, text):
    tok, _ = hf_tok
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character
    assert ids == [chartok.VOCAB[c] for c in text]
    assert tok.decode(ids) == text


def test_task_text_and_eos(hf_tok):
    tok, _ = hf_tok
    p = ArithTask().problem("train", 5)
    ids = chartok.make_encoder(tok)(p.prompt + p.solution) + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == p.prompt + p.solution
    assert tok.decode(ids).endswith("<eos>")
    assert set(tok.encode("é", add_special_tokens=False)) == {chartok.UNK_ID}  # one per UTF-8 byte


def test_saving_twice_gives_identical_files(tmp_path):
    a, b = chartok.save_tokenizer(tmp_path / "a"), chartok.save_tokenizer(tmp_path / "b")
    for name in chartok.TOKENIZER_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_missing_tokenizer_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        chartok.load_tokenizer(tmp_path / "nope")
