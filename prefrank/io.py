"""The score table: Parquet written a row group per chunk, in input order, plus a JSON sidecar.

Columns (one row per input row):
  id                                  the input's `id` field, else the row's 0-based index
  logp_chosen, logp_rejected          Σ log π(completion | prompt), float64 (null on error)
  n_chosen, n_rejected                completion tokens scored
  ref_logp_chosen, ref_logp_rejected  the same under the reference model (with --ref-model)
  alpha                               share of raters preferring chosen (null without votes)
  truncated                           the pair was cut to fit (--truncate keep-end)
  status, error                       "ok" / "error" and the reason
  token_logps_chosen, ...             per-token log-probs, float32 lists (with --per-token)
The file is written under a temporary name and renamed when complete: a crashed run never
leaves a partial table under the final name.
"""
import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

COMPLETION_NAMES = ("chosen", "rejected")  # completion k of a pair


def table_schema(with_ref: bool, per_token: bool) -> pa.Schema:
    fields = [("id", pa.string())]
    prefixes = ["", "ref_"] if with_ref else [""]
    for prefix in prefixes:
        fields += [(f"{prefix}logp_{name}", pa.float64()) for name in COMPLETION_NAMES]
    fields += [(f"n_{name}", pa.int64()) for name in COMPLETION_NAMES]
    fields += [("alpha", pa.float64()), ("truncated", pa.bool_()), ("status", pa.string()), ("error", pa.string())]
    if per_token:
        for prefix in prefixes:
            fields += [(f"{prefix}token_logps_{name}", pa.list_(pa.float32())) for name in COMPLETION_NAMES]
    return pa.schema(fields)


class ScoreTable:
    """Appends chunks of rows (dicts of column → list) to a Parquet file."""

    def __init__(self, path: str, *, with_ref: bool, per_token: bool):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.path.with_name(self.path.name + ".partial")
        self.schema = table_schema(with_ref, per_token)
        self.writer = pq.ParquetWriter(self.tmp_path, self.schema)
        self.rows = 0

    def write(self, columns: dict[str, list]):
        self.writer.write_table(pa.table({f.name: columns[f.name] for f in self.schema}, schema=self.schema))
        self.rows += len(columns["id"])

    def close(self, sidecar: dict):
        self.writer.close()
        os.replace(self.tmp_path, self.path)
        write_sidecar(self.path, sidecar)

    def abort(self):
        self.writer.close()
        self.tmp_path.unlink(missing_ok=True)


def sidecar_path(table_path) -> Path:
    table_path = Path(table_path)
    return table_path.with_name(table_path.name + ".meta.json")


def write_sidecar(table_path, sidecar: dict):
    sidecar_path(table_path).write_text(json.dumps(sidecar, indent=2, sort_keys=True, default=str) + "\n")


def read_sidecar(table_path) -> dict:
    return json.loads(sidecar_path(table_path).read_text())


def input_hash(source: str) -> str | None:
    """sha256 of an input file, or of a local folder's files (names and bytes); None for a hub dataset."""
    path = Path(source)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()
