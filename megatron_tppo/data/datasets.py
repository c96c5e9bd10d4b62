"""Prompt datasets: JSONL/Parquet files or the built-in arith task, a resumable prompt stream,
and the held-out evaluation set.

Records
    A dataset is a sequence of ``(prompt_text, meta)`` records; ``meta = {"answer": ...}`` (plus
    ``steps`` for the arith task) is what the reward needs. Files are read once into memory
    (prompt datasets are small next to everything else); the arith train split is a lazy
    sequence, so its size costs nothing.

Rows of a file
    JSONL: one JSON object per line (blank lines are ignored). Parquet: one row per record.
    ``prompt_key`` / ``answer_key`` may be dotted (``reward_model.ground_truth``) to reach into
    nested columns. A prompt is a non-empty string, or a chat list of ``{"role", "content"}``
    messages (DAPO-Math style), of which the last user message is taken. An answer is a string
    or a number. Any other row is malformed: ``bad_rows="skip"`` skips and counts it (the count
    and the first few reasons are on :class:`Records`), ``bad_rows="error"`` raises
    :class:`DataError` naming ``file:line`` (``file:row N`` for Parquet).

Templates
    ``template.replace("{prompt}", text)``, not ``str.format``: math prompts are full of braces.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from megatron_tppo.algorithms.window_pool import Prompt
from megatron_tppo.data.arith import ArithSplit, ArithTask

if TYPE_CHECKING:
    from megatron_tppo.config import DataConfig

Encode = Callable[[str], list[int]]
_STREAM_FORMAT = 1


class DataError(ValueError):
    """A malformed dataset row (raised with ``bad_rows="error"``), naming file and line."""


@dataclass
class Records:
    """The valid records of one file, and what was skipped."""

    items: list[tuple[str, dict]]
    """``(prompt_text, meta)`` in file order."""
    path: str = ""
    """Where they came from."""
    bad_rows: int = 0
    """Malformed rows skipped."""
    bad_examples: list[str] = field(default_factory=list)
    """``file:line: reason`` of the first few skipped rows (for the log)."""

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, dict]:
        return self.items[i]


def render(template: str, prompt: str) -> str:
    """The template with ``{prompt}`` replaced (other braces are left alone)."""
    return template.replace("{prompt}", prompt)


def _get(row: dict, dotted: str) -> Any:
    """``row["a"]["b"]`` for ``"a.b"``; a key containing the dot itself wins. KeyError if absent."""
    if dotted in row:
        return row[dotted]
    cur: Any = row
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def _row_record(row: Any, prompt_key: str, answer_key: str) -> tuple[str, dict]:
    """Validate one row; raises ValueError with the reason."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    try:
        prompt = _get(row, prompt_key)
    except KeyError:
        raise ValueError(f"missing prompt key {prompt_key!r}") from None
    try:
        answer = _get(row, answer_key)
    except KeyError:
        raise ValueError(f"missing answer key {answer_key!r}") from None
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        users = [m.get("content") for m in prompt if m.get("role", "user") == "user"]
        prompt = users[-1] if users else None
    if not isinstance(prompt, str):
        raise ValueError(f"prompt {prompt_key!r} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError(f"prompt {prompt_key!r} is empty")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"answer {answer_key!r} must be a string or a number, got {type(answer).__name__}")
    if isinstance(answer, str) and not answer.strip():
        raise ValueError(f"answer {answer_key!r} is empty")
    return prompt, {"answer": answer}


def _raw_rows(path: Path, fmt: str):
    """``(location, row_or_exception)`` for every row of the file."""
    if fmt == "jsonl":
        with path.open("r", encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line.rstrip("\r\n"))  # columns of this line
                except json.JSONDecodeError as err:
                    yield f"{path}:{lineno}", ValueError(f"bad JSON ({err.msg} at column {err.colno})")
    else:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for a broken file
            raise DataError(f"{path}: cannot read Parquet file: {err}") from None
        for i, row in enumerate(rows, 1):
            yield f"{path}:row {i}", row


def read_records(path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer",
                 bad_rows: str = "skip", fmt: Optional[str] = None, what: str = "data file") -> Records:
    """Read and validate a JSONL or Parquet file (``fmt`` defaults to the file extension)."""
    if bad_rows not in ("skip", "error"):
        raise ValueError(f"bad_rows must be 'skip' or 'error', got {bad_rows!r}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist")
    fmt = fmt or ("parquet" if p.suffix.lower() in (".parquet", ".pq") else "jsonl")
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"unknown dataset format {fmt!r} (jsonl or parquet)")
    out = Records([], str(p))
    for where, row in _raw_rows(p, fmt):
        try:
            if isinstance(row, Exception):
                raise row
            out.items.append(_row_record(row, prompt_key, answer_key))
        except ValueError as err:
            if bad_rows == "error":
                raise DataError(f"{where}: {err}") from None
            out.bad_rows += 1
            if len(out.bad_examples) < 5:
                out.bad_examples.append(f"{where}: {err}")
    if not out.items:
        raise DataError(f"{what} {str(p)!r} has no valid rows ({out.bad_rows} malformed)")
    return out


class PromptStream:
    """An endless, resumable iterator of :class:`Prompt` over a sequence of records.

    Epoch ``e`` visits every record once, in the order of a permutation seeded by
    ``(seed, e)`` (identity when ``shuffle`` is off), so the order is a pure function of the
    position: :meth:`state_dict` stores ``(epoch, position)`` and a stream restored with
    :meth:`load_state_dict` yields exactly what the original would have yielded next. A prompt's
    uid is its running index in the stream (unique across epochs, as the window pool requires).
    """

    def __init__(self, records: Sequence[tuple[str, dict]], encode: Encode, template: str = "{prompt}",
                 seed: int = 0, shuffle: bool = True):
        if len(records) == 0:
            raise ValueError("a prompt stream needs at least one record")
        self.records, self.encode, self.template = records, encode, template
        self.seed, self.shuffle = seed, shuffle
        self.epoch = self.position = self.taken = 0
        self._order: Optional[list[int]] = None

    @property
    def bad_rows(self) -> int:
        """Malformed rows skipped when the records were read (0 for generated tasks)."""
        return getattr(self.records, "bad_rows", 0)

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            order = list(range(len(self.records)))
            if self.shuffle:
                random.Random(f"stream:{self.seed}:{self.epoch}").shuffle(order)
            self._order = order
        return self._order

    def __iter__(self) -> "PromptStream":
        return self

    def __next__(self) -> Prompt:
        if self.position >= len(self.records):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        text, meta = self.records[self._epoch_order()[self.position]]
        ids = list(self.encode(render(self.template, text)))
        prompt = Prompt(uid=self.taken, prompt_ids=ids, meta=dict(meta))
        self.position += 1
        self.taken += 1
        return prompt

    def state_dict(self) -> dict:
        return {"format": _STREAM_FORMAT, "epoch": self.epoch, "position": self.position,
                "taken": self.taken, "seed": self.seed, "shuffle": self.shuffle, "size": len(self.records)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != _STREAM_FORMAT:
            raise ValueError(f"prompt stream state format {state.get('format')!r} != {_STREAM_FORMAT}")
        mine = {"seed": self.seed, "shuffle": self.shuffle, "size": len(self.records)}
        theirs = {k: state[k] for k in mine}
        if mine != theirs:  # a different dataset or seed would silently change the order
            raise ValueError(f"prompt stream state was saved for {theirs}, this stream is {mine}")
        self.epoch, self.position, self.taken = state["epoch"], state["position"], state["taken"]
        self._order = None


# ---------------------------------------------------------------------------------- from config


def arith_task(d: "DataConfig") -> ArithTask:
    return ArithTask(max_steps=d.arith_max_steps, continue_prob=d.arith_continue_prob)


def train_records(d: "DataConfig", seed: int) -> Sequence[tuple[str, dict]]:
    """The training records named by the data config."""
    if d.task == "arith":
        return ArithSplit(arith_task(d), "train", d.arith_train_size, seed)
    if d.train_path is None:
        raise ValueError(f"data.train_path is required when data.task={d.task!r}")
    return read_records(d.train_path, d.prompt_key, d.answer_key, d.bad_rows, d.task, "data.train_path")


def build_prompt_stream(d: "DataConfig", encode: Encode, seed: int) -> PromptStream:
    """The training prompt stream (template applied, seeded shuffling)."""
    return PromptStream(train_records(d, seed), encode, d.template, seed, d.shuffle)


def build_eval_prompts(d: "DataConfig", encode: Encode, seed: int) -> list[Prompt]:
    """Up to ``d.eval_prompts`` held-out prompts with answers, in a fixed order (uids 0..n-1).

    Arith: distinct problems of the held-out split (never in training). Files: the first rows of
    ``data.eval_path``; none when it is unset.
    """
    if d.task == "arith":
        recs = [(p.prompt, {"answer": p.answer, "steps": p.steps}) for p in arith_task(d).heldout_set(d.eval_prompts, seed)]
    elif d.eval_path is None:
        return []
    else:
        recs = read_records(d.eval_path, d.prompt_key, d.answer_key, d.bad_rows, d.task, "data.eval_path").items
    return [Prompt(i, list(encode(render(d.template, text))), dict(meta)) for i, (text, meta) in enumerate(recs[:d.eval_prompts])]


def reward_name(d: "DataConfig") -> str:
    """The reward registry name for this data config (``auto``: arith task -> arith, else math)."""
    if d.reward != "auto":
        return d.reward
    return "arith" if d.task == "arith" else "math"
