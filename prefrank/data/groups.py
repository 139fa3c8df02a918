"""Votes grouped into pairs (Columns.group_by): every row normalized and spilled to an on-disk
SQLite table, read back grouped in first-row order, so memory holds one group at a time."""
import hashlib
import itertools
import json
import os
from typing import Iterator

from prefrank.data.columns import Columns
from prefrank.data.readers import BadRow
from prefrank.data.rows import Example, check_texts, fill_example, parse_row, row_field, row_id, to_example
from prefrank.errors import RowError


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _group_key(row: dict, cols: Columns) -> bytes:
    """The pair a row votes on: its group_by values ("a+b": the two as an unordered pair), hashed
    (128 bits: the key of the spill, whatever the size of the values)."""
    parts = []
    for name in cols.group_by:
        values = [row_field(row, c) if c in row or c not in cols.optional else "" for c in name.split("+")]
        parts.append(sorted(values, key=_canonical) if len(values) > 1 else values[0])
    # surrogatepass: a lone surrogate in a key column keys its rows like any other text (the
    # row's texts and id are checked for surrogates apart); plain UTF-8 cannot encode it
    return hashlib.blake2b(_canonical(parts).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _spill_record(pos: int, row, cols: Columns) -> tuple[bytes, int, str]:
    """(group key, input position, the row normalized as JSON). A row that cannot be keyed is a
    group of its own; one that cannot be normalized makes its whole group an error."""
    if isinstance(row, BadRow) or not isinstance(row, dict):
        return b"row:%d" % pos, pos, json.dumps({"error": to_example(pos, row, cols).error})
    record = {"id": row_id(pos, row, cols)}
    try:
        key = _group_key(row, cols)
    except RowError as e:
        return b"row:%d" % pos, pos, json.dumps({**record, "error": str(e)})
    try:
        record["pair"] = pair = parse_row(row, cols)
        check_texts(*pair[:3], cols)
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
    return example if example.error else fill_example(example, cols, *text, shares, None)


def grouped_examples(rows, cols: Columns, limit: int | None) -> Iterator[Example]:
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
