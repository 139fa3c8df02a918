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
import re
import zlib
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
    id: str | None = None  # None: "id" when present, else the row's index; a named column must exist
    votes: list[str] | None = None  # PandaLM-style vote columns
    completions: str | None = None  # K-wise rows: the list of completions (None: a chosen/rejected pair)
    scores: str = "scores"  # K-wise rows: human scores, one per completion, higher is better
    completions_include_prompt: bool = False  # chosen/rejected repeat the prompt: strip it
    prompt_separator: str = "\n\n"  # joins several prompt columns (empty ones skipped)


# The command-line option of each Columns field (cli.columns_from_args reads them; refusals name them)
COLUMN_FLAGS = {"prompt": "--prompt-cols", "chosen": "--chosen-col", "rejected": "--rejected-col", "id": "--id-col",
                "votes": "--vote-cols", "completions": "--completions-col", "scores": "--scores-col",
                "completions_include_prompt": "--completions-include-prompt"}


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

BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which some editors write first: skipped
_UNREADABLE = (OSError, EOFError, zlib.error)  # a truncated or damaged file (gzip raises all three)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _json_line(raw: bytes, line_no: int) -> dict | BadRow | None:
    """One JSON line (None if blank); a line that cannot be decoded or parsed is a BadRow."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow(f"line {line_no}: invalid UTF-8 (byte {e.start} of the line)")
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return BadRow(f"line {line_no}: invalid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return BadRow(f"line {line_no}: JSON nested too deeply")
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        return BadRow(f"line {line_no}: invalid JSON ({e})")


def _json_lines(path: Path) -> Iterator[dict | BadRow]:
    """Rows of a JSON-lines file, each line decoded on its own: one bad line is one bad row."""
    line_no = 0
    with _open_binary(path) as f:
        try:
            for line_no, raw in enumerate(f, 1):
                row = _json_line(raw.removeprefix(BOM) if line_no == 1 else raw, line_no)
                if row is not None:
                    yield row
        except _UNREADABLE as e:
            raise InputError(f"{path}: unreadable after {line_no} lines: {_one_line(e)}") from None


def _first_byte(path: Path) -> bytes:
    """The first byte that is not whitespace (after a BOM)."""
    try:
        with _open_binary(path) as f:
            head = f.read(4096).removeprefix(BOM)
            while head and not head.lstrip():
                head = f.read(4096)
            return head.lstrip()[:1]
    except _UNREADABLE as e:
        raise InputError(f"{path}: unreadable: {_one_line(e)}") from None


def _json_file(path: Path) -> Iterator[dict | BadRow]:
    if _first_byte(path) != b"[":  # JSON lines saved as .json
        return _json_lines(path)
    try:
        with _open_binary(path) as f:
            rows = json.loads(f.read().removeprefix(BOM).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to read") from None
    except ValueError as e:
        raise InputError(f"{path}: invalid JSON ({e})") from None
    except _UNREADABLE as e:
        raise InputError(f"{path}: unreadable: {_one_line(e)}") from None
    return iter(rows)


def _parquet_file(path: Path) -> Iterator[dict]:
    """Rows of a Parquet file, opened now (a damaged footer fails here), read a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        file = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: not a readable Parquet file: {_one_line(e)}") from None

    def rows():
        start = 0
        for group in range(file.num_row_groups):
            batches = file.iter_batches(batch_size=1024, row_groups=[group])
            while True:
                try:
                    batch = next(batches, None)
                    batch = None if batch is None else batch.to_pylist()
                except (OSError, ValueError, pa.ArrowException) as e:
                    raise InputError(f"{path}: row group {group} is unreadable after row {start}: "
                                     f"{_one_line(e)}") from None
                if batch is None:
                    break
                yield from batch
                start += len(batch)
    return rows()


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

    def rows():
        n = 0
        try:
            for row in ds:
                yield row
                n += 1
        except Exception as e:  # a damaged data file in the folder: one clear line
            raise InputError(f"dataset {name!r}: unreadable after {n} rows: {type(e).__name__}: "
                             f"{_one_line(e)}") from None
    return rows()


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
    if value is None:  # present but null: never read as empty, absent or implicit
        raise RowError(f"field {head!r} is null")
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
        return _field(row, "prompt") if "prompt" in row else None  # absent: implicit; null: an error
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


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_unicode(value, what: str):
    """JSON can escape a lone surrogate (\\ud800), which is no Unicode text: no tokenizer or Parquet
    file takes it. Looks through nested messages without recursion (any depth)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if match := _SURROGATE.search(v):
                raise RowError(f"{what} holds a lone surrogate (\\u{ord(match.group()):04x}): not valid Unicode")
        elif isinstance(v, dict):
            stack += [*v.keys(), *v.values()]
        elif isinstance(v, list):
            stack += v


def to_example(index: int, row, cols: Columns) -> Example:
    """Normalize one input row; every problem becomes `error`, never an exception."""
    if isinstance(row, BadRow):
        return Example(index, str(index), error=row.message)
    if not isinstance(row, dict):
        return Example(index, str(index), error=f"row is a JSON {type(row).__name__}, not an object")
    row_id = row.get(cols.id or "id")
    example = Example(index, str(index) if row_id is None else str(row_id))
    try:
        if cols.id is not None:
            _field(row, cols.id)  # a named id column must be there, and not null
        if _SURROGATE.search(example.id):
            example.id = str(index)
            raise RowError("the id holds a lone surrogate: not valid Unicode")
        example.prompt, example.completions, example.implicit = _prompt_and_completions(row, cols)
        _check_unicode(example.prompt, "the prompt")
        _check_unicode(example.completions, "a completion")
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
    named += [cols.id] if cols.id is not None else []
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
