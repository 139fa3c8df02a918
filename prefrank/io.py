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
K-wise tables (K completions per prompt) hold lists instead, one element per completion:
  logps, ref_logps, n_tokens, token_logps, ref_token_logps, and human_scores in place of alpha.
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

# Per-completion values: pairs spread them over chosen/rejected columns, K-wise tables keep lists.
_FIELDS = {  # kind: (pair column pattern, K-wise column, element type)
    "logp": ("logp_{}", "logps", pa.float64()),
    "ref_logp": ("ref_logp_{}", "ref_logps", pa.float64()),
    "n": ("n_{}", "n_tokens", pa.int64()),
    "token_logps": ("token_logps_{}", "token_logps", pa.list_(pa.float32())),
    "ref_token_logps": ("ref_token_logps_{}", "ref_token_logps", pa.list_(pa.float32())),
}


def completion_fields(kind: str, values: list | None, kwise: bool) -> dict:
    """Table columns holding one row's per-completion `values` (None on an error row)."""
    pair_pattern, kwise_column, _ = _FIELDS[kind]
    if kwise:
        return {kwise_column: values}
    return {pair_pattern.format(name): None if values is None else values[k] for k, name in enumerate(COMPLETION_NAMES)}


def _typed_fields(kind: str, kwise: bool) -> list[tuple[str, pa.DataType]]:
    pair_pattern, kwise_column, element = _FIELDS[kind]
    if kwise:
        return [(kwise_column, pa.list_(element))]
    return [(pair_pattern.format(name), element) for name in COMPLETION_NAMES]


def table_schema(with_ref: bool, per_token: bool, kwise: bool = False) -> pa.Schema:
    kinds = ["logp"] + (["ref_logp"] if with_ref else []) + ["n"]
    if per_token:
        kinds += ["token_logps"] + (["ref_token_logps"] if with_ref else [])
    fields = [("id", pa.string())] + [f for kind in kinds for f in _typed_fields(kind, kwise)]
    fields += [("human_scores", pa.list_(pa.float64()))] if kwise else [("alpha", pa.float64())]
    fields += [("truncated", pa.bool_()), ("status", pa.string()), ("error", pa.string())]
    return pa.schema(fields)


class ScoreTable:
    """Appends chunks of rows (dicts of column → list) to a Parquet file."""

    def __init__(self, path: str, *, with_ref: bool, per_token: bool, kwise: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.path.with_name(self.path.name + ".partial")
        self.schema = table_schema(with_ref, per_token, kwise)
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
