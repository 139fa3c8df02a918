"""Rows in: JSON Lines, JSON (any layout pandas or a hand writes), CSV/TSV, Parquet, optionally
gzipped, or a Hugging Face dataset; each row a dict, or a BadRow in its place when it cannot
be parsed. Nothing is skipped but blank lines."""
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from prefrank.errors import InputError, bad_input


@dataclass
class BadRow:
    """A row that could not even be parsed (e.g. a malformed JSON line)."""
    message: str


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


def json_kind(value) -> str:
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
    return value if isinstance(value, dict) else BadRow(f"line {line_no}: a JSON {json_kind(value)}, not an object")


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
        if not bad_input(e):
            raise
        raise InputError(f"cannot load dataset {name!r} (split {split!r}): {type(e).__name__}: {e}") from None

    def rows():
        n = 0
        try:
            for row in ds:
                yield row
                n += 1
        except Exception as e:  # a damaged data file in the folder: one clear line
            if not bad_input(e):
                raise
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
