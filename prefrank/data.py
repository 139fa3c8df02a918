"""Preference data in: read rows from a file or a Hugging Face dataset, and normalize each row
to an `Example` (one prompt, K completions; pairs are K = 2, chosen first) or to a row error.

Nothing is dropped: a row that cannot be used becomes an Example with `error` set, in its place.
Formats (auto-detected per row, after the column mapping in `Columns`):
  explicit        prompt, chosen, rejected: strings
  implicit        chosen, rejected: full transcripts (Anthropic HH); the prompt is their longest
                  common prefix cut back to the end of the last "\\n\\nAssistant:", else to the
                  last whitespace (the completions then start with that whitespace)
  conversational  prompt / chosen / rejected: lists of {role, content} messages (prompt may be
                  absent: the shared leading messages are the prompt); with `turn`, each
                  conversation is first cut after its turn-th user message's answer
K completions per prompt (Columns.completions set): a list of completions (texts or message lists)
and a list of human scores, one per completion (higher is better, or lower with scores_order
"lower-better": then they are stored negated); a dotted column reads a field of each listed
object (UltraFeedback: completions.response and completions.overall_score).
The raters' verdict on a pair gives its `alpha`, the share of votes for the chosen completion
(ties count half):
  vote columns   Columns.votes, one vote each, in a coding of prefrank.votes (a label column is
                 one vote column); with Columns.group_by, the votes of all rows of a pair; a
                 probability coding reads a model's P(first better) as the share (n_votes null)
  `votes` column a list of per-rater shares for the first completion: 1, 0, or 0.5 for a tie
  `alpha` column the share itself
The chosen completion is the raters' choice: a pair with alpha < 0.5 is reoriented (chosen and
rejected swapped, alpha -> 1 - alpha, `reoriented` set) unless Columns.keep_column_order. A pair
whose votes tie exactly (or whose probability is 0.5) keeps alpha = 0.5 (the analysis leaves it
out of rankings). Columns.optional names prompt parts a row may lack (AlpacaFarm's `input`).
Named mappings for published datasets (presets) live in prefrank.formats.
"""
import ast
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from prefrank import formats
from prefrank import votes as vote_codings  # the name `votes` is a Columns field
from prefrank.errors import InputError, RowError
from prefrank.options import escaped_text, name_list, option, options

HH_ASSISTANT = "\n\nAssistant:"


SCORES_ORDERS = ("higher-better", "lower-better")


@options
class Columns:
    """Where each field lives in the input rows, and how the raters' verdict reads (the column
    options of every command that reads data)."""
    format: str | None = option(
        None, "a published dataset's column mapping (listed in `prefrank score --help`; README.md gives the "
        "columns each reads); auto: the one the first row's columns match, else the default mapping; column "
        "options given with it override its fields", choices=["auto", *formats.PRESETS], metavar="NAME",
        group="columns", default_text="auto on the command line when no column option is given")
    prompt: list[str] | None = option(
        None, "prompt column(s), joined by blank lines when several (empty ones skipped)", flag="--prompt-cols",
        type=name_list, group="columns", default_text="'prompt' if present, else the implicit HH format")
    join: str | None = option(
        None, "how a text prompt meets each answer: 'chat' renders the prompt as the user's message and the answer "
        "as the assistant's with the tokenizer's chat template (a blank line between them when it has none); any "
        "other text is put between them (escapes \\n, \\t read: --join '\\n\\n', --join ' '). Message rows are "
        "joined by the chat template, implicit transcripts as they are", type=escaped_text, metavar="TEXT",
        group="columns", default_text="the format's rule (instruction/response formats: chat), else the prompt "
        "and answer concatenated as given, as TRL does")
    chosen: str = option("chosen", "the chosen completion, or with votes the first candidate (the raters decide "
                         "which is chosen)", flag="--chosen-col", group="columns")
    rejected: str = option("rejected", "the rejected completion, or with votes the second candidate",
                           flag="--rejected-col", group="columns")
    id: str | None = option(None, "row id column, which must exist", flag="--id-col", group="columns",
                            default_text="'id' when present, else the row's index")
    votes: list[str] | None = option(
        None, "vote columns, one vote each in --vote-coding (a label column naming the better candidate is one "
        "vote column; PandaLM: annotator1,annotator2,annotator3); alpha = the share of votes for the chosen "
        "column, ties half, or with a probability coding (prob, alpaca-eval) the model's probability that the "
        "chosen column is better (n_votes then null). Without it, an 'alpha' column, or a 'votes' list of "
        "1/0/0.5, is used when present",
        flag="--vote-cols", type=name_list, group="columns")
    vote_coding: str = option("1/2", "what a vote says: " + "; ".join(
        f"{name}: {text}" for name, text in vote_codings.HELP.items()), metavar="CODING",
        group="columns")
    group_by: list[str] | None = option(
        None, "rows that agree on these columns are votes on one pair (one output row per pair, in the order "
        "of each pair's first row; 'a+b' is the unordered pair of columns a and b, so a pair shown in either "
        "order is one pair); their prompt and candidates must agree (swapped candidates flip a row's votes), "
        "else the pair is an error", type=name_list, group="columns")
    turn: str | None = option(None, "conversational rows: each conversation is cut after the answer to the user "
                              "message this column numbers (MT-Bench, Chatbot Arena: turn)", flag="--turn-col",
                              group="columns")
    keep_column_order: bool = option(
        False, "keep --chosen-col as chosen even where the votes prefer --rejected-col (the analysis then warns "
        "with the count); by default such pairs are swapped and marked reoriented", group="columns")
    completions: str | None = option(
        None, "K completions per prompt: the column with the list of completions (a dotted name reads a field "
        "of each listed object, e.g. completions.response for UltraFeedback); the table then holds lists "
        "(logps, n_tokens, human_scores)", flag="--completions-col", group="columns")
    human_scores: str = option("scores", "with --completions-col: human scores, one per completion "
                               "(UltraFeedback: completions.overall_score)", flag="--scores-col", group="columns")
    scores_order: str = option("higher-better", "higher-better, or lower-better for ranks (Nectar: answers.rank; "
                               "stored negated in human_scores)", choices=SCORES_ORDERS, group="columns")
    completions_include_prompt: bool = option(
        False, "chosen/rejected start with the prompt: strip it (rows where they don't are errors)",
        group="columns")
    prompt_separator: str = option("\n\n", "joins several prompt columns (empty ones skipped)", cli=False)
    messages: list[str] = option(
        help="columns that hold message lists: a string there (a CSV cell, a pandas export) is parsed as JSON or "
        "as a Python literal (never run) and must give one, else the row is an error; the presets name them",
        cli=False, default_factory=list)
    optional: list[str] = option(
        help="prompt columns a row may lack, read as empty (in the prompt and in group_by keys): AlpacaFarm's and "
        "PandaLM's input; the presets name them", cli=False, default_factory=list)

    def __post_init__(self):
        if self.vote_coding not in vote_codings.PROBABILITY:
            try:
                vote_codings.coding_map(self.vote_coding)
            except ValueError as e:
                raise InputError(f"<vote_coding>: {e}") from None
        if self.scores_order not in SCORES_ORDERS:
            raise InputError(f"<scores_order> {self.scores_order!r}: expected one of {', '.join(SCORES_ORDERS)}")
        if self.join is not None and self.completions_include_prompt:
            raise InputError("<join> joins a prompt to its answers, but with <completions_include_prompt> the answers "
                             "already hold their prompt")
        if self.group_by and (self.completions is not None or not self.votes):
            raise InputError("<group_by> pools the votes of a pair's rows: it needs vote columns (<votes>) and "
                             "pairs (not <completions>)")


@dataclass
class Example:
    index: int  # position in the output: the input row, or with group_by the pair (groups in first-row order)
    id: str
    prompt: str | list | None = None  # text, or a list of chat messages
    completions: list = field(default_factory=list)  # [chosen, rejected], or K: texts or message lists
    alpha: float | None = None  # pairs: share of raters preferring chosen, or a model's P(chosen better)
    n_votes: int | None = None  # pairs: the votes alpha comes from (None: an alpha column, a probability, no votes)
    reoriented: bool = False  # the raters preferred the `rejected` column: the two were swapped
    multi_turn: bool = False  # a completion holds more than one message (later turns, earlier answers)
    human_scores: list[float] | None = None  # K-wise: human score per completion (higher is better)
    implicit: bool = False  # the prompt was split off full transcripts (no prompt in the row)
    join: str | None = None  # text rows: how the prompt meets each completion (Columns.join; None: as given)
    error: str | None = None

    @property
    def tie(self) -> bool | None:
        """The raters tied (alpha = 0.5: exact, a share of votes or a probability as given); None without alpha."""
        return None if self.alpha is None else self.alpha == 0.5

    @property
    def glued(self) -> bool:
        """A text prompt given with no join rule ends in a non-space character and a completion starts
        with one: as given, they are scored as one word ("weatherman.He")."""
        return (self.join is None and not self.implicit and isinstance(self.prompt, str) and self.prompt != ""
                and not self.prompt[-1].isspace()
                and any(isinstance(c, str) and c != "" and not c[0].isspace() for c in self.completions))


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


def _open_text(path: Path, encoding: str, newline: str | None = None):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding=encoding, newline=newline)
    return open(path, encoding=encoding, newline=newline)


def _json_kind(value) -> str:
    """The JSON name of a parsed value's type (for messages: null, not NoneType)."""
    for kind, types in (("null", type(None)), ("boolean", bool), ("number", (int, float)), ("string", str),
                        ("array", list), ("object", dict)):
        if isinstance(value, types):
            return kind
    return type(value).__name__


def _json_object(pairs: list[tuple]) -> dict:
    """A parsed JSON object whose keys are all different: json keeps the last of a key given twice,
    silently losing the other value."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"key {twice!r} appears twice in one object")
    return obj


def _json_line(raw: bytes, line_no: int) -> dict | BadRow | None:
    """One JSON line (None if blank); a line that cannot be decoded or parsed, or that holds a value
    other than an object (null, a number, an array ...), is a BadRow: every non-blank line is a row."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow(f"line {line_no}: invalid UTF-8 (byte {e.start} of the line)")
    if not text.strip():
        return None
    try:
        value = json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError as e:
        return BadRow(f"line {line_no}: invalid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return BadRow(f"line {line_no}: JSON nested too deeply")
    except ValueError as e:  # a key given twice, an integer of more digits than Python converts
        return BadRow(f"line {line_no}: invalid JSON ({e})")
    return value if isinstance(value, dict) else BadRow(f"line {line_no}: a JSON {_json_kind(value)}, not an object")


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


def _one_document(path: Path) -> bool:
    """Whether a .json file starting with "{" is one JSON document (an object over several lines, or
    alone on its line) rather than JSON lines: its first non-blank line is not a whole object, or
    it is the only one."""
    try:
        with _open_binary(path) as f:
            lines = (line for line in f if line.strip())
            first = next(lines).removeprefix(BOM)
            try:
                json.loads(first)
            except (ValueError, RecursionError):
                return True
            return next(lines, None) is None
    except _UNREADABLE as e:
        raise InputError(f"{path}: unreadable: {_one_line(e)}") from None


def _document_rows(document) -> list:
    """The rows of one JSON document: an array's elements; pandas' to_json layouts of a table,
    "columns" (its default: {column: {index: value}}) and "index" ({index: {column: value}}); else
    the object itself, one row."""
    if not isinstance(document, dict) or not document or not all(isinstance(v, dict) for v in document.values()):
        return document if isinstance(document, list) else [document]
    inner = [list(v) for v in document.values()]
    if all(keys == inner[0] for keys in inner) and inner[0] and all(k.isdigit() for k in inner[0]):
        return [{column: values[i] for column, values in document.items()} for i in inner[0]]  # "columns"
    if all(k.isdigit() for k in document):
        return list(document.values())  # "index"
    return [document]


def _json_file(path: Path) -> Iterator[dict | BadRow]:
    first = _first_byte(path)
    if first != b"[" and not (first == b"{" and _one_document(path)):  # JSON lines saved as .json
        return _json_lines(path)
    try:
        with _open_binary(path) as f:
            text = f.read().removeprefix(BOM).decode("utf-8")
        rows = _document_rows(json.loads(text, object_pairs_hook=_json_object))
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


def _csv_file(path: Path, delimiter: str) -> Iterator[dict | BadRow]:
    """Rows of a CSV / TSV file with a header line; every cell is a string. A record with the
    wrong number of fields, or one the csv module cannot parse, is a BadRow in its place."""
    import csv
    csv.field_size_limit(2**31 - 1)  # completions can be far longer than the default 128 KiB
    with _open_text(path, encoding="utf-8-sig", newline="") as f:  # -sig: a spreadsheet's BOM
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        header = None
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # strict: the reader resumes on the next line
                yield BadRow(f"line {reader.line_num}: invalid CSV ({e})")
                continue
            except UnicodeDecodeError:  # the text stream decodes ahead of the reader: locate the byte
                line, byte = _first_invalid_utf8(path)
                raise InputError(f"{path}: invalid UTF-8 on line {line} (byte {byte} of the line): the file cannot "
                                 f"be read past it") from None
            except _UNREADABLE as e:  # the text stream cannot go on past it
                raise InputError(f"{path}: unreadable after line {reader.line_num}: {_one_line(e)}") from None
            if header is None:
                header = values
                if len(set(header)) != len(header):
                    raise InputError(f"{path}: the header names a column twice: {header}")
                continue
            if not values:  # a blank line
                continue
            if len(values) != len(header):
                yield BadRow(f"line {reader.line_num}: {len(values)} fields where the header has {len(header)}")
                continue
            yield dict(zip(header, values))


def _first_invalid_utf8(path: Path) -> tuple[int, int]:
    """(line, byte of the line) of the first bytes of a file that are not UTF-8 (line 1 after a BOM).
    Lines end at "\n", which never occurs inside a UTF-8 sequence."""
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, 1):
            try:
                (raw.removeprefix(BOM) if line_no == 1 else raw).decode("utf-8")
            except UnicodeDecodeError as e:
                return line_no, e.start + (len(BOM) if line_no == 1 and raw.startswith(BOM) else 0)
    raise AssertionError(f"{path} decodes as UTF-8")


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
    """Rows of a JSON / JSONL / CSV / TSV (each optionally .gz) or Parquet file, or of a Hugging
    Face dataset (hub name or local folder), streamed in input order. A missing or unreadable
    source raises InputError here, before any row is read."""
    path = Path(source)
    name = path.name.lower()
    if path.is_file():
        chosen = [f"<{option}> {value}" for option, value in (("split", split), ("subset", subset))
                  if value not in ("train", None)]
        if chosen:  # it would be ignored: the file's rows are scored whatever split was asked for
            raise InputError(f"{' and '.join(chosen)}: {source} is a file, with no splits or configurations "
                             f"(those of a Hugging Face dataset)")
        if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            return _json_lines(path)
        if name.endswith((".json", ".json.gz")):
            return _json_file(path)
        if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
            return _csv_file(path, "\t" if ".tsv" in name else ",")
        if name.endswith(".parquet"):
            return _parquet_file(path)
        raise InputError(f"{source}: unknown file type (expected .json, .jsonl, .csv, .tsv, each optionally .gz, "
                         f"or .parquet)")
    if os.path.lexists(source) and not path.is_dir():  # there, but neither a file nor a folder
        try:
            os.stat(source)
        except OSError as e:  # a symlink loop, a link to a missing file, a folder it cannot enter
            raise InputError(f"{source}: cannot open: {e.strerror}") from None
        raise InputError(f"{source}: not a regular file (a device, pipe or socket): give a data file")
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

def _is_messages(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) for m in value)


_PARSE_ERRORS = (ValueError, TypeError, SyntaxError, MemoryError, RecursionError)


def _messages_from_text(value, column: str):
    """A message column's value: a list as it is; a string parsed as JSON, else as a Python literal
    (ast.literal_eval: pandas and `datasets` write list columns to CSV as their repr), which must be a
    list of messages."""
    if not isinstance(value, str):
        return value
    for parse in (json.loads, ast.literal_eval):
        try:
            parsed = parse(value.strip())
        except _PARSE_ERRORS:
            continue
        if _is_messages(parsed):
            return parsed
    raise RowError(f"field {column!r} holds text where a message list belongs, and the text is no list of messages "
                   f"(JSON, or a Python literal such as [{{'role': 'user', 'content': '...'}}, ...])")


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
    if not cols.prompt:
        return None
    names = [c for c in cols.prompt if c in row or c not in cols.optional]  # an absent optional part: empty
    parts = [_field(row, c) for c in names]
    if len(parts) == 1:
        return parts[0]
    for c, p in zip(names, parts):
        if not isinstance(p, str):
            raise RowError(f"field {c!r} must be a string, got {type(p).__name__}")
    return cols.prompt_separator.join(p for p in parts if p)


def _integer(value, what: str) -> int:
    number = vote_codings.whole_number(value)
    if number is None:
        raise RowError(f"{what!r} must be an integer; got {value!r}")
    return number


def _cut_at_turn(conversation: list, turn: int, name: str) -> list:
    """The conversation up to the answer to its turn-th user message (the rest is not judged)."""
    users = [i for i, m in enumerate(conversation) if m["role"] == "user"]
    if turn < 1 or len(users) < turn:
        raise RowError(f"{name!r} has {len(users)} user messages: it has no turn {turn}")
    return conversation[:users[turn]] if len(users) > turn else conversation


def _prompt_and_completions(row: dict, cols: Columns) -> tuple:
    """(prompt, completions, whether the prompt was implicit)."""
    completions, names = _completions(row, cols)
    prompt = _prompt(row, cols)
    prompt_name = (cols.prompt or ["prompt"])[0]
    if cols.messages:
        completions = [_messages_from_text(c, n) if n in cols.messages else c for c, n in zip(completions, names)]
        prompt = _messages_from_text(prompt, prompt_name) if prompt_name in cols.messages else prompt
    if any(_is_messages(c) for c in completions):  # conversational
        for c, name in zip(completions, names):
            if not _is_messages(c):
                raise RowError(f"{name!r} must be a message list like the other completions")
            _check_messages(c, name)
        if cols.turn is not None:
            turn = _integer(_field(row, cols.turn), cols.turn)
            completions = [_cut_at_turn(c, turn, name) for c, name in zip(completions, names)]
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
    if cols.turn is not None:
        raise RowError(f"the turn column {cols.turn!r} cuts conversations, but this row's completions are text")
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


def _check_completions(completions: list, pair: bool):
    for c in completions:
        if not (c.strip() if isinstance(c, str) else any(m["content"].strip() for m in c)):
            raise RowError("empty or whitespace-only completion")
    for i, j in itertools.combinations(range(len(completions)), 2):
        if completions[i] == completions[j]:
            raise RowError("chosen and rejected are identical" if pair else f"completions {i} and {j} are identical")


def _human_scores(row: dict, cols: Columns, k: int) -> list[float]:
    scores = _field(row, cols.human_scores)
    if (not isinstance(scores, list) or len(scores) != k
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in scores)):
        raise RowError(f"{cols.human_scores!r} must be a list of {k} finite numbers (one per completion); got {scores!r}")
    sign = -1.0 if cols.scores_order == "lower-better" else 1.0  # stored so that higher is better
    return [sign * float(v) for v in scores]




def _verdict(row: dict, cols: Columns) -> tuple[list[float] | None, float | None]:
    """The raters' verdict on a pair: (vote shares for the first candidate, or None; a given alpha, or None)."""
    if cols.votes:
        return [vote_codings.share(_field(row, c), cols.vote_coding, c) for c in cols.votes], None
    a = row.get("alpha")
    if a is not None and a != "":  # an empty CSV cell is no alpha
        try:
            value = float(a) if isinstance(a, str) else a
        except ValueError:
            value = None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise RowError(f"'alpha' must be a number in [0, 1]; got {a!r}")
        return None, float(value)
    if row.get("votes") is not None:
        listed = row["votes"]
        if (not isinstance(listed, list) or not listed
                or any(isinstance(v, bool) or v not in (0, 0.5, 1) for v in listed)):
            raise RowError(f"'votes' must be a non-empty list of 1 (chosen), 0 (rejected) or 0.5 (tie); got {listed!r}")
        return [float(v) for v in listed], None
    return None, None


def _orient(example: Example, cols: Columns, shares: list[float] | None, alpha: float | None):
    """Set the pair's alpha from its votes (or a given alpha) and make the raters' choice the chosen
    completion: alpha < 0.5 swaps the two (unless keep_column_order). Swapping flips each vote
    (exact for 1, 0, 0.5, and for AlpacaEval's 2 - p), so the new alpha is computed from the flipped
    shares, not 1 - alpha rounded."""
    if shares is not None:
        alpha = sum(shares) / len(shares)
        # a probability is no count of votes (a `votes` list always is one)
        example.n_votes = None if cols.votes and cols.vote_coding in vote_codings.PROBABILITY else len(shares)
    if alpha is not None and alpha < 0.5 and not cols.keep_column_order:
        example.completions.reverse()
        example.reoriented = True
        alpha = 1.0 - alpha if shares is None else sum(1.0 - s for s in shares) / len(shares)
    example.alpha = alpha


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


def _parse(row: dict, cols: Columns) -> tuple:
    """(prompt, completions, whether the prompt was implicit, vote shares, given alpha) of one row,
    K-wise rows with their human scores in place of the shares; a RowError says why the row
    cannot be read. What the texts hold is checked apart (_check_texts)."""
    if cols.id is not None:
        _field(row, cols.id)  # a named id column must be there, and not null
    _check_unicode(row.get(cols.id or "id"), "the id")
    prompt, completions, implicit = _prompt_and_completions(row, cols)
    if cols.completions is not None:
        return prompt, completions, implicit, _human_scores(row, cols, len(completions)), None
    return (prompt, completions, implicit) + _verdict(row, cols)


def _check_texts(prompt, completions, implicit, cols: Columns):
    """A RowError for texts that cannot be scored as read: a text join on message lists, lone
    surrogates, empty or identical completions."""
    if isinstance(prompt, list) and not implicit and cols.join not in (None, "chat"):
        raise RowError(f"the join {cols.join!r} puts text between a text prompt and its answers; this row's are "
                       f"message lists, which the chat template joins")
    _check_unicode(prompt, "the prompt")
    _check_unicode(completions, "a completion")
    _check_completions(completions, cols.completions is None)


def _finish(example: Example, cols: Columns, prompt, completions, implicit, shares, alpha) -> Example:
    # the join applies to a text prompt from the row (message rows: the chat template; implicit: as given)
    example.join = cols.join if isinstance(prompt, str) and not implicit else None
    example.prompt, example.completions, example.implicit = prompt, list(completions), implicit
    example.multi_turn = any(isinstance(c, list) and len(c) > 1 for c in completions)
    if cols.completions is None:
        _orient(example, cols, shares, alpha)
    else:
        example.human_scores = shares
    return example


def _row_id(index: int, row, cols: Columns) -> str:
    """The row's id, else its index (also for an id that is no valid Unicode: _parse refuses it)."""
    row_id = row.get(cols.id or "id") if isinstance(row, dict) else None
    return str(index) if row_id is None or _SURROGATE.search(str(row_id)) else str(row_id)


def to_example(index: int, row, cols: Columns) -> Example:
    """Normalize one input row; every problem becomes `error`, never an exception."""
    if isinstance(row, BadRow):
        return Example(index, str(index), error=row.message)
    if not isinstance(row, dict):
        return Example(index, str(index), error=f"row is a JSON {_json_kind(row)}, not an object")
    example = Example(index, _row_id(index, row, cols))
    try:
        prompt, completions, implicit, shares, alpha = _parse(row, cols)
        # filled before the texts are checked: a pair refused for its texts keeps its alpha, votes and tie
        _finish(example, cols, prompt, completions, implicit, shares, alpha)
        _check_texts(prompt, completions, implicit, cols)
    except RowError as e:
        example.error = str(e)
    return example


# ---------------------------------------------------------------- votes grouped into pairs

def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _group_key(row: dict, cols: Columns) -> bytes:
    """The pair a row votes on: its group_by values ("a+b": the two as an unordered pair), hashed
    (128 bits: the key of the spill, whatever the size of the values)."""
    parts = []
    for name in cols.group_by:
        values = [_field(row, c) if c in row or c not in cols.optional else "" for c in name.split("+")]
        parts.append(sorted(values, key=_canonical) if len(values) > 1 else values[0])
    # surrogatepass: a lone surrogate in a key column keys its rows like any other text (the
    # row's texts and id are checked for surrogates apart); plain UTF-8 cannot encode it
    return hashlib.blake2b(_canonical(parts).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _spill_record(pos: int, row, cols: Columns) -> tuple[bytes, int, str]:
    """(group key, input position, the row normalized as JSON). A row that cannot be keyed is a
    group of its own; one that cannot be normalized makes its whole group an error."""
    if isinstance(row, BadRow) or not isinstance(row, dict):
        return b"row:%d" % pos, pos, json.dumps({"error": to_example(pos, row, cols).error})
    record = {"id": _row_id(pos, row, cols)}
    try:
        key = _group_key(row, cols)
    except RowError as e:
        return b"row:%d" % pos, pos, json.dumps({**record, "error": str(e)})
    try:
        record["pair"] = pair = _parse(row, cols)
        _check_texts(*pair[:3], cols)
    except RowError as e:
        record["error"] = str(e)
    return key, pos, json.dumps(record)


def _merge_group(index: int, members, cols: Columns) -> Example:
    """One pair from the rows of a group, in input order: the same prompt and completions in each
    (in either order: a row with the two swapped has its votes flipped), all their votes pooled."""
    example, first, shares, text = None, None, [], None
    for _, pos, record in members:
        record = json.loads(record)
        if example is None:
            example, first = Example(index, record.get("id", str(pos))), pos
        if example.error:
            continue
        if "error" in record:
            example.error = record["error"] if pos == first else f"row {pos} of the pair: {record['error']}"
            continue
        prompt, completions, implicit, row_shares, _ = record["pair"]
        if text is None:
            text = (prompt, completions, implicit)
        elif prompt != text[0] or completions not in (text[1], text[1][::-1]):
            example.error = (f"rows {first} and {pos} are one pair (same {', '.join(cols.group_by)}) but their "
                             f"{'prompts' if prompt != text[0] else 'completions'} differ")
            continue
        elif completions != text[1]:  # the two candidates in the other order: the votes say the opposite
            row_shares = [1.0 - s for s in row_shares]
        shares += row_shares
    return example if example.error else _finish(example, cols, *text, shares, None)


def _grouped(rows, cols: Columns, limit: int | None) -> Iterator[Example]:
    """Pairs from rows that each carry some of a pair's votes, in the order of each pair's first
    row, for inputs of any size: a first pass normalizes every row and spills it, keyed by its
    group, into an on-disk SQLite table; its external sort then returns the rows grouped, groups in
    first-row order, rows in input order (the same order on every run: --resume and the ranks of a
    torchrun job see the same pairs). Memory holds one group's votes at a time."""
    import sqlite3
    import tempfile
    with tempfile.TemporaryDirectory(prefix="prefrank-groups-") as tmp:
        db = sqlite3.connect(os.path.join(tmp, "rows.db"))
        try:
            for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", "cache_size=-4096"):
                db.execute(f"PRAGMA {pragma}")  # a scratch file: no journal; a 4 MiB page cache
            db.execute("CREATE TABLE rows (key BLOB, pos INTEGER, record TEXT)")
            numbered = enumerate(rows)
            while batch := [_spill_record(pos, row, cols) for pos, row in itertools.islice(numbered, 256)]:
                db.executemany("INSERT INTO rows VALUES (?, ?, ?)", batch)
            db.execute("CREATE INDEX rows_key ON rows (key, pos)")
            cursor = db.execute("SELECT g.first, r.pos, r.record FROM rows r JOIN "
                                "(SELECT key, MIN(pos) AS first FROM rows GROUP BY key) g ON r.key = g.key "
                                "ORDER BY g.first, r.pos")
            for index, (_, members) in enumerate(itertools.groupby(cursor, key=lambda member: member[0])):
                if limit is not None and index >= limit:
                    return
                yield _merge_group(index, members, cols)
        finally:
            db.close()


# ---------------------------------------------------------------- the input as Examples

def preset_columns(name: str, **overrides) -> Columns:
    """The named preset's column mapping (prefrank.formats), with `overrides` on top."""
    if name not in formats.PRESETS:
        raise InputError(f"unknown format {name!r}: expected auto or one of {', '.join(formats.PRESETS)}")
    return Columns(**{**formats.PRESETS[name].columns, **overrides, "format": name})


# options that say how the columns are read, not where: given alone they keep the format's
# detection on, and apply on top of the format detected
DETECTION_KEEPS = ("keep_column_order", "join")


def resolve_columns(cols: Columns, row: dict | None) -> Columns:
    """With format "auto": the preset that the first row's columns select (prefrank.formats), or
    the default mapping, with the DETECTION_KEEPS options given (join: when not None); any other
    mapping as it is."""
    if cols.format != "auto":
        return cols
    kept = {"keep_column_order": cols.keep_column_order, **({"join": cols.join} if cols.join is not None else {})}
    name = formats.detect(row) if row is not None else None
    return preset_columns(name, **kept) if name else Columns(**kept)


def check_columns(row: dict, cols: Columns):
    """Columns named for the whole input must exist in its first row: a typo is an invocation
    error, not a million row errors."""
    if cols.completions is None:
        named = (cols.prompt or []) + [cols.chosen, cols.rejected] + (cols.votes or [])
    else:
        named = (cols.prompt or []) + [cols.completions, cols.human_scores]
    named += ([cols.turn] if cols.turn else []) + [c for g in cols.group_by or [] for c in g.split("+")]
    named += [cols.id] if cols.id is not None else []
    if cols.join is not None and (cols.prompt == [] or cols.prompt is None and "prompt" not in row):
        raise InputError(f"<join> {cols.join!r} joins a prompt column to each answer, but the rows have none (the "
                         f"prompt is what the completions share)")
    missing = list(dict.fromkeys(c for c in named if c.partition(".")[0] not in row and c not in cols.optional))
    if not missing and cols.turn is not None and cols.completions is None:
        try:
            first = _messages_from_text(row[cols.chosen], cols.chosen) if cols.chosen in cols.messages else \
                row[cols.chosen]
        except RowError:
            first = None
        if not _is_messages(first):
            raise InputError(f"<turn> {cols.turn!r} cuts conversations, but the first row's {cols.chosen!r} is no "
                             f"message list: nothing would be cut")
    if missing:
        kwise = cols.completions is None and "completions" in row
        preset = formats.detect(row) if cols.format is None else None
        hint = (" (K completions per prompt? pass <completions>)" if kwise else
                f" (the first row looks like {preset}: column options alone turn off the format's detection; add "
                f"<format> {preset} to start from its mapping)" if preset else "")
        raise InputError(f"unknown column(s) {', '.join(map(repr, missing))}: the first row has "
                         f"{', '.join(map(repr, row)) or 'no fields'}{hint}")


def open_examples(source: str, cols: Columns, *, split: str = "train", subset: str | None = None,
                  limit: int | None = None) -> tuple[Columns, Iterator[Example]]:
    """The column mapping the input is read with (format "auto" resolved) and its Examples, in
    input order: one per row, or with group_by one per pair (`limit`: the first so many). The
    source is opened and read up to its first row now (InputError if it cannot be, or if a named
    column is missing there); the rest is read as the iterator is consumed."""
    rows = read_rows(source, split=split, subset=subset)
    head = []
    for row in rows:  # the first row that is an object (malformed lines before it are kept)
        head.append(row)
        if isinstance(row, dict):
            break
    first = head[-1] if head and isinstance(head[-1], dict) else None
    cols = resolve_columns(cols, first)
    if first is not None:
        check_columns(first, cols)
    rows = itertools.chain(head, rows)
    return cols, (_grouped(rows, cols, limit) if cols.group_by else _examples(rows, cols, limit))


def read_examples(source: str, cols: Columns, *, split: str = "train", subset: str | None = None,
                  limit: int | None = None) -> Iterator[Example]:
    """data → Examples (see open_examples)."""
    return open_examples(source, cols, split=split, subset=subset, limit=limit)[1]


def _examples(rows, cols: Columns, limit: int | None) -> Iterator[Example]:
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            return
        yield to_example(index, row, cols)
