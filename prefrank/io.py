"""The score table: Parquet written a row group per chunk, in input order, plus a JSON sidecar.

Columns (one row per input row):
  id                                  the input's `id` field, else the row's 0-based index
  logp_chosen, logp_rejected          Σ log π(completion | prompt), float64 (null on error)
  n_chosen, n_rejected                completion tokens scored
  ref_logp_chosen, ref_logp_rejected  the same under the reference model (with --ref-model)
  alpha                               share of raters preferring chosen (null without votes)
  n_votes                             the votes alpha comes from (null without vote columns or a votes list)
  tie                                 the raters tied: alpha = 0.5 (null without alpha)
  reoriented                          the raters preferred the input's rejected column: the two were swapped
  multi_turn                          a completion holds more than one message (a later turn, with its
                                      model's own earlier answers)
  truncated                           the pair was cut to fit (--truncate keep-end)
  status, error                       "ok" / "error" and the reason
  token_logps_chosen, ...             per-token log-probs, float32 lists (with --per-token)
K-wise tables (K completions per prompt) hold lists instead, one element per completion:
  logps, ref_logps, n_tokens, token_logps, ref_token_logps, and human_scores in place of alpha,
  n_votes, tie and reoriented (higher is better: ranks are stored negated).
Tables written before n_votes, tie, reoriented and multi_turn existed still load (PAIR_EXTRAS).
Rows are written as parts (one per chunk of input rows) that a killed run keeps and --resume
reuses; the final table is assembled from them under a temporary name and renamed when complete,
so a crashed run never leaves a partial table under the final name.
"""
import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prefrank.data import InputError

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


# The raters' verdict beside alpha, in pair tables; tables of older prefrank versions lack them.
PAIR_EXTRAS = {"n_votes": pa.int64(), "tie": pa.bool_(), "reoriented": pa.bool_()}


def table_schema(with_ref: bool, per_token: bool, kwise: bool = False) -> pa.Schema:
    kinds = ["logp"] + (["ref_logp"] if with_ref else []) + ["n"]
    if per_token:
        kinds += ["token_logps"] + (["ref_token_logps"] if with_ref else [])
    fields = [("id", pa.string())] + [f for kind in kinds for f in _typed_fields(kind, kwise)]
    if kwise:
        fields += [("human_scores", pa.list_(pa.float64()))]
    else:
        fields += [("alpha", pa.float64())] + list(PAIR_EXTRAS.items())
    fields += [("multi_turn", pa.bool_()), ("truncated", pa.bool_()), ("status", pa.string()), ("error", pa.string())]
    return pa.schema(fields)



class Parts:
    """A score table under construction: OUT.parts/ holds one Parquet part per chunk of input rows
    (part-000012.parquet: rows 12·chunk_rows ...), each written under a temporary name and renamed,
    so a part is either complete or absent; a manifest of the run, so that --resume continues
    only the same run; the sidecar's static part; and one done-RANK.json per process that read the
    whole input. merge() writes OUT in input order, then the sidecar, then removes the folder."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.dir = self.out.with_name(self.out.name + ".parts")

    def part(self, chunk: int) -> Path:
        return self.dir / f"part-{chunk:06d}.parquet"

    def _write_json(self, name: str, obj):
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, self.dir / name)

    def read_json(self, name: str):
        return json.loads((self.dir / name).read_text())

    def prepare(self, manifest: dict, sidecar: dict, resume: bool) -> bool:
        """Start a run, or check that the parts on disk come from this same run (--resume).
        Returns whether the folder is new."""
        if self.dir.exists():
            if not resume:
                raise InputError(f"{self.dir} holds parts of an earlier run: pass --resume to continue it, "
                                 f"or remove the folder")
            try:
                old = self.read_json("manifest.json")
            except (OSError, ValueError):
                raise InputError(f"{self.dir} has no readable manifest.json: not prefrank's parts") from None
            differs = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            if differs:
                raise InputError(f"--resume: the parts in {self.dir} come from a run with other "
                                 f"{', '.join(differs)}; remove the folder or choose another --out")
            for stale in self.dir.glob("done-*.json"):
                stale.unlink()
            created = False
        else:
            self.dir.mkdir(parents=True)
            self._write_json("manifest.json", manifest)
            created = True
        self._write_json("sidecar.json", sidecar)
        return created

    def discard(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def is_complete(self, chunk: int, ids: list[str]) -> bool:
        """Does a readable part for `chunk` hold exactly these rows? (A truncated or corrupt part,
        or one from other input, is not.)"""
        try:
            part = pq.ParquetFile(self.part(chunk))
            complete = (part.metadata.num_rows == len(ids) and b"prefrank" in (part.schema_arrow.metadata or {})
                        and part.read(columns=["id"]).column("id").to_pylist() == ids)
        except (OSError, ValueError, pa.ArrowException):
            complete = False
        return complete

    def write(self, chunk: int, columns: dict[str, list], schema: pa.Schema, stats: dict):
        table = pa.table({f.name: columns[f.name] for f in schema}, schema=schema)
        table = table.replace_schema_metadata({"prefrank": json.dumps(stats)})
        tmp = self.dir / f".{self.part(chunk).name}.tmp-{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, self.part(chunk))

    def mark_done(self, rank: int, n_chunks: int):
        self._write_json(f"done-{rank}.json", {"chunks": n_chunks})

    def merge(self, schema: pa.Schema, seconds: float) -> dict:
        """Write the final table from the parts, in input order, and its sidecar; returns the
        run's totals (from the parts' statistics)."""
        done = [json.loads(p.read_text())["chunks"] for p in self.dir.glob("done-*.json")]
        if not done:
            raise InputError(f"{self.dir}: no process finished reading the input; rerun with --resume")
        n_chunks = done[0]
        missing = [c for c in range(n_chunks) if not self.part(c).exists()]
        if missing:
            raise InputError(f"{self.dir}: parts {missing[:10]} are missing; rerun with --resume")
        totals = {"rows": 0, "ok": 0, "errors": 0, "truncated": 0, "boundary_moved": 0, "reoriented": 0, "ties": 0,
                  "multi_turn": 0, "real_tokens": 0, "padded_tokens": 0, "methods": Counter(), "first_error": None}
        tmp = self.out.with_name(self.out.name + ".partial")
        with pq.ParquetWriter(tmp, schema) as writer:
            for c in range(n_chunks):
                part = pq.read_table(self.part(c))
                stats = json.loads(part.schema.metadata[b"prefrank"])
                for key in totals:
                    if key == "first_error":
                        totals[key] = totals[key] or stats[key]
                    elif key == "methods":
                        totals[key].update(stats[key])
                    else:
                        totals[key] += stats[key]
                writer.write_table(part.replace_schema_metadata(None).cast(schema))
        os.replace(tmp, self.out)
        totals["seconds"] = seconds
        write_sidecar(self.out, {**self.read_json("sidecar.json"), "summary": totals})
        shutil.rmtree(self.dir)
        return totals


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
