"""Preference data in: read rows from a file or a Hugging Face dataset, and normalize each row
to an `Example` (one prompt, K completions; pairs are K = 2, chosen first) or to a row error.

Nothing is dropped: a row that cannot be used becomes an Example with `error` set, in its place.
Formats (auto-detected per row, after the column mapping in `Columns`):
  explicit        prompt, chosen, rejected: strings
  implicit        chosen, rejected: full transcripts (Anthropic HH); the prompt is their longest
                  common prefix cut back to the end of the last "\\n\\nAssistant:", else to the
                  last whitespace (the completions then start with that whitespace)
  conversational  prompt / chosen / rejected: lists of {role, content} messages (prompt may be
                  absent: the shared leading messages are the prompt)
K completions per prompt (Columns.completions set): a list of completions (texts or message lists)
and a list of human scores, one per completion, higher is better; a dotted column reads a field of
each listed object (UltraFeedback: completions.response and completions.overall_score).
Votes give a pair's `alpha`, the share of raters preferring the chosen completion (ties count half):
  --vote-cols a,b,c  PandaLM coding per column: 0 tie, 1 the chosen column, 2 the rejected column
  `votes` column     a list of per-rater shares for chosen: 1, 0, or 0.5 for a tie
  `alpha` column     the share itself
"""
import gzip
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

HH_ASSISTANT = "\n\nAssistant:"


class InputError(Exception):
    """A bad invocation (missing file, unknown dataset, bad option): reported in one line."""


@dataclass
class Columns:
    """Where each field lives in the input rows."""
    prompt: list[str] | None = None  # None: "prompt" when present, else the implicit format
    chosen: str = "chosen"
    rejected: str = "rejected"
    id: str = "id"
    votes: list[str] | None = None  # PandaLM-style vote columns
    completions: str | None = None  # K-wise rows: the list of completions (None: a chosen/rejected pair)
    scores: str = "scores"  # K-wise rows: human scores, one per completion, higher is better
    completions_include_prompt: bool = False  # chosen/rejected repeat the prompt: strip it
    prompt_separator: str = "\n\n"  # joins several prompt columns (empty ones skipped)


@dataclass
class Example:
    index: int  # position in the input, 0-based
    id: str
    prompt: str | list | None = None  # text, or a list of chat messages
    completions: list = field(default_factory=list)  # [chosen, rejected], or K: texts or message lists
    alpha: float | None = None  # pairs: share of raters preferring chosen
    scores: list[float] | None = None  # K-wise: human score per completion (higher is better)
    implicit: bool = False  # the prompt was split off full transcripts (no prompt in the row)
    error: str | None = None


@dataclass
class BadRow:
    """A row that could not even be parsed (e.g. a malformed JSON line)."""
    message: str


# ---------------------------------------------------------------- reading rows

def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _json_lines(path: Path) -> Iterator[dict | BadRow]:
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRow(f"line {line_no}: invalid JSON ({e.msg} at column {e.colno})")


def _first_char(path: Path) -> str:
    with _open_text(path) as f:
        while True:
            c = f.read(1)
            if not c or not c.isspace():
                return c


def _json_file(path: Path) -> Iterator[dict | BadRow]:
    if _first_char(path) != "[":  # JSON lines saved as .json
        yield from _json_lines(path)
        return
    with _open_text(path) as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    yield from rows


def _parquet_file(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _hf_dataset(name: str, subset: str | None, split: str):
    import datasets
    try:
        if os.path.isdir(name) and (Path(name) / "dataset_info.json").exists() and (Path(name) / "state.json").exists():
            ds = datasets.load_from_disk(name)  # a dataset saved with save_to_disk
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, subset, split=split, streaming=True)
    except Exception as e:  # hub unreachable, unknown name, missing split: one clear line
        raise InputError(f"cannot load dataset {name!r} (split {split!r}): {type(e).__name__}: {e}") from None
    return iter(ds)


def read_rows(source: str, *, split: str = "train", subset: str | None = None) -> Iterator[dict | BadRow]:
    """Rows of a JSON / JSONL / JSONL.gz / Parquet file, or of a Hugging Face dataset (hub name
    or local folder), streamed in input order. A missing or unreadable source raises InputError
    here, before any row is read."""
    path = Path(source)
    name = path.name.lower()
    if path.is_file():
        if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            return _json_lines(path)
        if name.endswith((".json", ".json.gz")):
            return _json_file(path)
        if name.endswith(".parquet"):
            return _parquet_file(path)
        raise InputError(f"{source}: unknown file type (expected .json, .jsonl, .jsonl.gz or .parquet)")
    if path.is_dir() or (source.count("/") <= 1 and not source.startswith((".", "/", "~")) and not path.suffix):
        return _hf_dataset(source, subset, split)
    raise InputError(f"data file not found: {source}")


def count_rows(source: str) -> int | None:
    """The number of rows when it is cheap to know (Parquet metadata), else None."""
    if source.lower().endswith(".parquet") and Path(source).is_file():
        import pyarrow.parquet as pq
        return pq.ParquetFile(source).metadata.num_rows
    return None


# ---------------------------------------------------------------- normalizing rows

class RowError(ValueError):
    """Why one row cannot be scored; becomes that row's `error`."""


def _is_messages(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def _check_messages(value, what: str) -> list:
    for m in value:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError(f"{what}: every message needs string 'role' and 'content'")
    return value


def _field(row: dict, column: str):
    """row[column]; a dotted column "a.b" reads field b of each dict in the list row["a"]
    (UltraFeedback's completions.response)."""
    head, _, rest = column.partition(".")
    if head not in row:
        raise RowError(f"missing field {head!r}")
    value = row[head]
    if not rest:
        return value
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise RowError(f"field {head!r} must be a list of objects to read {column!r}")
    if any(rest not in v for v in value):
        raise RowError(f"missing field {rest!r} in an element of {head!r}")
    return [v[rest] for v in value]


def split_implicit_prompt(*texts: str) -> tuple[str, list[str]]:
    """(prompt, completions) from full transcripts that share their prompt."""
    common = os.path.commonprefix(list(texts))
    cut = common.rfind(HH_ASSISTANT)
    if cut >= 0:
        cut += len(HH_ASSISTANT)
    else:
        cut = max((i for i, c in enumerate(common) if c.isspace()), default=0)
    return texts[0][:cut], [t[cut:] for t in texts]


def _completions(row: dict, cols: Columns) -> tuple[list, list[str]]:
    """The row's raw completions and their names for messages."""
    if cols.completions is None:
        return [_field(row, cols.chosen), _field(row, cols.rejected)], [cols.chosen, cols.rejected]
    values = _field(row, cols.completions)
    if not isinstance(values, list) or len(values) < 2:
        raise RowError(f"field {cols.completions!r} must be a list of at least 2 completions")
    return values, [f"{cols.completions}[{k}]" for k in range(len(values))]


def _prompt(row: dict, cols: Columns):
    """The prompt's text or messages; None when it is implicit (shared by the completions)."""
    if cols.prompt is None:
        return row.get("prompt")  # absent: implicit
    parts = [_field(row, c) for c in cols.prompt]
    if len(parts) == 1:
        return parts[0]
    for c, p in zip(cols.prompt, parts):
        if not isinstance(p, str):
            raise RowError(f"field {c!r} must be a string, got {type(p).__name__}")
    return cols.prompt_separator.join(p for p in parts if p)


def _prompt_and_completions(row: dict, cols: Columns) -> tuple:
    """(prompt, completions, whether the prompt was implicit)."""
    completions, names = _completions(row, cols)
    prompt = _prompt(row, cols)
    prompt_name = (cols.prompt or ["prompt"])[0]
    if any(_is_messages(c) for c in completions):  # conversational
        for c, name in zip(completions, names):
            if not _is_messages(c):
                raise RowError(f"{name!r} must be a message list like the other completions")
            _check_messages(c, name)
        if prompt is None:
            shared = 0
            while all(len(c) > shared and c[shared] == completions[0][shared] for c in completions):
                shared += 1
            return completions[0][:shared], [c[shared:] for c in completions], True
        if not _is_messages(prompt):
            raise RowError(f"{prompt_name!r} must be a message list when the completions are")
        return _check_messages(prompt, prompt_name), completions, False
    for c, name in zip(completions, names):
        if not isinstance(c, str):
            raise RowError(f"field {name!r} must be a string, got {type(c).__name__}")
    if prompt is None:
        return *split_implicit_prompt(*completions), True
    if not isinstance(prompt, str):
        raise RowError(f"field {prompt_name!r} must be a string, got {type(prompt).__name__}")
    if cols.completions_include_prompt:
        for c, name in zip(completions, names):
            if not c.startswith(prompt):
                raise RowError(f"the prompt is not a prefix of {name!r}")
        completions = [c[len(prompt):] for c in completions]
    return prompt, completions, False


def _human_scores(row: dict, cols: Columns, k: int) -> list[float]:
    scores = _field(row, cols.scores)
    if (not isinstance(scores, list) or len(scores) != k
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in scores)):
        raise RowError(f"{cols.scores!r} must be a list of {k} finite numbers (one per completion); got {scores!r}")
    return [float(v) for v in scores]


def _alpha(row: dict, cols: Columns) -> float | None:
    if cols.votes:
        votes = [_field(row, c) for c in cols.votes]
        if any(v not in (0, 1, 2) or isinstance(v, bool) for v in votes):
            raise RowError(f"votes in {cols.votes} must be 0 (tie), 1 (chosen) or 2 (rejected); got {votes}")
        return (votes.count(1) + 0.5 * votes.count(0)) / len(votes)
    if "alpha" in row and row["alpha"] is not None:
        a = row["alpha"]
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise RowError(f"'alpha' must be a number in [0, 1]; got {a!r}")
        return float(a)
    if "votes" in row and row["votes"] is not None:
        votes = row["votes"]
        if (not isinstance(votes, list) or not votes
                or any(isinstance(v, bool) or v not in (0, 0.5, 1) for v in votes)):
            raise RowError(f"'votes' must be a non-empty list of 1 (chosen), 0 (rejected) or 0.5 (tie); got {votes!r}")
        return sum(votes) / len(votes)
    return None


def to_example(index: int, row, cols: Columns) -> Example:
    """Normalize one input row; every problem becomes `error`, never an exception."""
    if isinstance(row, BadRow):
        return Example(index, str(index), error=row.message)
    if not isinstance(row, dict):
        return Example(index, str(index), error=f"row is a JSON {type(row).__name__}, not an object")
    row_id = row.get(cols.id)
    example = Example(index, str(index) if row_id is None else str(row_id))
    try:
        example.prompt, example.completions, example.implicit = _prompt_and_completions(row, cols)
        if any(not c for c in example.completions):
            raise RowError("empty completion")
        for i, j in itertools.combinations(range(len(example.completions)), 2):
            if example.completions[i] == example.completions[j]:
                raise RowError("chosen and rejected are identical" if cols.completions is None
                               else f"completions {i} and {j} are identical")
        if cols.completions is None:
            example.alpha = _alpha(row, cols)
        else:
            example.scores = _human_scores(row, cols, len(example.completions))
    except RowError as e:
        example.error = str(e)
    return example


def check_columns(row: dict, cols: Columns):
    """Columns named for the whole input must exist in its first row: a typo is an invocation
    error, not a million row errors."""
    if cols.completions is None:
        named = (cols.prompt or []) + [cols.chosen, cols.rejected] + (cols.votes or [])
    else:
        named = (cols.prompt or []) + [cols.completions, cols.scores]
    missing = [c for c in named if c.partition(".")[0] not in row]
    if missing:
        hint = " (K completions per prompt? pass --completions-col)" if cols.completions is None and "completions" in row else ""
        raise InputError(f"unknown column(s) {', '.join(map(repr, missing))}: the first row has "
                         f"{', '.join(map(repr, row)) or 'no fields'}{hint}")


def read_examples(source: str, cols: Columns, *, split: str = "train", subset: str | None = None,
                  limit: int | None = None) -> Iterator[Example]:
    """data → Examples, in input order, one per row. The source is opened now (InputError if it
    cannot be); rows are read as the iterator is consumed."""
    return _examples(read_rows(source, split=split, subset=subset), cols, limit)


def _examples(rows, cols: Columns, limit: int | None) -> Iterator[Example]:
    checked = False
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            return
        if not checked and isinstance(row, dict):
            check_columns(row, cols)
            checked = True
        yield to_example(index, row, cols)
