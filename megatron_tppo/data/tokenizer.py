"""A character-level tokenizer built offline, saved as a Hugging Face tokenizer directory.

Vocabulary (99 entries, ids fixed forever so saved models stay valid):
    0 ``<pad>``, 1 ``<eos>``, 2 ``<unk>``, then ``\\n`` (3) and printable ASCII 32..126 (4..98).
Every character is one token (a byte-level BPE without merges: see :func:`build_backend`), so
the length of a text in tokens is its length in characters, and decode(encode(text)) == text for
any ASCII text. Other characters become ``<unk>`` or nothing. No BOS: like Qwen2, prompts start
with their first character.

The directory holds tokenizer.json, tokenizer_config.json and special_tokens_map.json; it loads
offline with ``transformers.AutoTokenizer.from_pretrained(dir)`` (a ``PreTrainedTokenizerFast``)
and in vLLM. The model's embedding may have more rows (``model.vocab_size``, e.g. 512) than the
tokenizer has entries: the rest are padding and never appear in data.

transformers/tokenizers are imported inside the functions (data/ must import cheaply).
"""
from __future__ import annotations

import json
from pathlib import Path

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARS))}
VOCAB_SIZE = len(VOCAB)  # 99
PAD_ID, EOS_ID, UNK_ID = VOCAB[PAD], VOCAB[EOS], VOCAB[UNK]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _byte_symbol(c: str) -> str:
    """GPT-2 byte-level symbol of an ASCII character (" " -> "Ġ", "\n" -> "Ċ", "!".."~" unchanged)."""
    return {" ": "\u0120", "\n": "\u010a"}.get(c, c)


def build_backend():
    """The ``tokenizers.Tokenizer`` (deterministic: a fixed vocabulary, nothing is trained).

    Written as a byte-level BPE with no merges, because transformers 5 loads a model directory
    whose config says ``qwen2`` with its own Qwen2Tokenizer pipeline (byte-level pre-tokenizer and
    decoder) whatever tokenizer_config.json says; vLLM does the same. With byte-level symbols in
    the vocabulary and no merges, that pipeline and this one both give one token per character.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {(_byte_symbol(t) if t not in SPECIAL_TOKENS else t): i for t, i in VOCAB.items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_tokenizer(out_dir: str | Path, model_max_length: int = 2048) -> Path:
    """Write the tokenizer directory (idempotent: same files, same bytes); returns its path."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=build_backend(), pad_token=PAD, eos_token=EOS,
                                   unk_token=UNK, model_max_length=model_max_length)
    fast.save_pretrained(str(out))
    # transformers 5 may fold the special tokens into tokenizer_config.json only; older loaders
    # (and vLLM's checks) also look for special_tokens_map.json, so write it explicitly.
    (out / "special_tokens_map.json").write_text(
        json.dumps({"pad_token": PAD, "eos_token": EOS, "unk_token": UNK}, indent=2) + "\n")
    # transformers 5 writes its own class name ("TokenizersBackend"); the portable name loads in
    # transformers 4.x and 5.x alike (and in whatever version vLLM pins).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("backend", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def load_tokenizer(path: str | Path):
    """``AutoTokenizer.from_pretrained(path)`` offline, with a clear error for a missing dir."""
    p = Path(path)
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {str(p)!r} (expected tokenizer.json / tokenizer_config.json)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def make_encoder(tokenizer):
    """``text -> list[int]`` without special tokens (templates carry any markup themselves)."""
    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))
    return encode
