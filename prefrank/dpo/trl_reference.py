"""TRL's preference batches as prefrank items, and the reference log-probs of a TRL dataset as a
prefrank score table: precomputed with the scorer in streaming parts, or read from a table that
`prefrank score` wrote (used by prefrank.dpo.trl_trainer; requires `trl`, written against 1.16).

What TRL sums. Its collator joins prompt + chosen and prompt + rejected, truncates each to
`max_length` (keep_start: the first tokens; keep_end: the last), right-pads them ([2B, T]: the
chosen rows, then the rejected rows) and marks the completion tokens in `completion_mask`; the
loss and the reference sum the log-probs of the tokens at positions t >= 1 that the mask marks.
pair_items rebuilds exactly those tokens from a collated batch: per row, the context is the row
up to its first marked token (its first token if the mask marks it: that one has no context and
is not scored) and the completion the rest, and a pair whose two rows keep the same context
becomes one item with two completions (one prompt, computed once), else two items of one.

The precomputed reference is a score table (prefrank.table's pair layout without reference
columns: `logp_*` are the reference's), written chunk by chunk as prefrank parts (io.Parts): a killed precompute
continues from its complete parts, and a finished one is reused while its key (data, model,
options) stays the same. Row ids are digests of the row's token ids, so a part is reused only for
the same rows.
"""
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prefrank.io import Parts
from prefrank.scoring import score
from prefrank.table import RunStats, Sidecar, TableLayout
from prefrank.tokenization import Tokenized

CHUNK_ROWS = 2048  # rows per part
COLLATE_ROWS = 64  # rows per collator call (bounds its padded tensors)
BUDGET = 8192  # padded tokens per scorer forward call
TABLE = TableLayout()  # logp_*, n_* of pairs: the reference's


@dataclass
class PairItems:
    """The pairs of a collated batch as items. Sequence 2i is pair i's chosen, 2i + 1 its rejected."""
    items: list[Tokenized]
    sequence: list[int]  # per completion of `items` (flattened in item order): its sequence
    tokens: list[int]  # per sequence: the tokens TRL scores
    context_free_start: bool  # some row's first token is marked as completion (TRL counts it for ipo, scores it not)


def pair_items(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> PairItems | None:
    """The pairs of a TRL preference batch (see the module's docstring), or None when the batch is
    not one this reproduces: rows not right-padded, or marked tokens that are not a suffix of the
    real ones."""
    n_pairs = input_ids.shape[0] // 2
    ids, real, marked = input_ids.tolist(), attention_mask.sum(1).tolist(), completion_mask.tolist()
    if input_ids.shape[0] % 2 or not torch.equal(attention_mask.cumprod(1).sum(1), attention_mask.sum(1)):
        return None
    contexts, completions, tokens, context_free_start = [], [], [], False
    for row, n, mask in zip(ids, real, marked):
        first = mask.index(1) if 1 in mask[:n] else n
        if sum(mask) != n - first:
            return None
        if first == 0 and n > 0:
            first, context_free_start = 1, True
        contexts.append(row[:first])
        completions.append(row[first:n])
        tokens.append(max(n - first, 0))
    items, sequence = [], []
    for i in range(n_pairs):
        seqs = [s for s in (2 * i, 2 * i + 1) if tokens[s // 2 + (s % 2) * n_pairs] > 0]
        rows = [s // 2 + (s % 2) * n_pairs for s in seqs]
        if len(rows) == 2 and contexts[rows[0]] == contexts[rows[1]]:
            items.append(Tokenized(contexts[rows[0]], [completions[r] for r in rows]))
            sequence += seqs
        else:
            for s, r in zip(seqs, rows):
                items.append(Tokenized(contexts[r], [completions[r]]))
                sequence.append(s)
    per_sequence = [tokens[s // 2 + (s % 2) * n_pairs] for s in range(2 * n_pairs)]
    return PairItems(items, sequence, per_sequence, context_free_start)


def collate_pairs(collate, rows: list[dict]) -> PairItems:
    """PairItems of dataset rows (prompt_ids, chosen_ids, rejected_ids) through TRL's collator."""
    out = PairItems([], [], [], False)
    for start in range(0, len(rows), COLLATE_ROWS):
        batch = collate(rows[start:start + COLLATE_ROWS])
        pairs = pair_items(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        if pairs is None:
            raise ValueError("the data collator's batches are not right-padded rows whose completion_mask marks "
                             "a suffix of the real tokens: prefrank cannot rebuild the pairs TRL scores")
        out.items += pairs.items
        out.sequence += [2 * start + s for s in pairs.sequence]
        out.tokens += pairs.tokens
        out.context_free_start |= pairs.context_free_start
    return out


def row_digest(row: dict) -> str:
    """A row's id in the tables: a digest of its token ids."""
    ids = [row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]]
    return hashlib.blake2b(json.dumps(ids).encode(), digest_size=16).hexdigest()


def chunks(dataset):
    """The dataset's token-id rows, CHUNK_ROWS at a time (a Dataset or an IterableDataset, streamed)."""
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    for batch in dataset.select_columns(columns).iter(batch_size=CHUNK_ROWS):
        yield [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]


def data_digest(dataset) -> str:
    """A digest of every row's token ids, in order (the identity of a dataset that is streamed)."""
    digest = hashlib.sha256()
    for rows in chunks(dataset):
        for row in rows:
            digest.update(row_digest(row).encode())
    return digest.hexdigest()


def score_rows(lm, collate, rows: list[dict], max_length: int | None, deterministic: bool = False):
    """One part's columns and statistics: the reference log-probs of the tokens TRL scores (0 for
    a sequence with none), their counts, whether the collator truncated the row (the columns the
    token ids do not tell, such as alpha, are null)."""
    start = time.perf_counter()
    pairs = collate_pairs(collate, rows)
    logps = torch.zeros(2 * len(rows), dtype=torch.float64)
    sums = score(lm, pairs.items, budget=BUDGET, deterministic=deterministic) if pairs.items else None
    if sums is not None:
        logps[torch.tensor(pairs.sequence)] = sums.logps
    logps, tokens = logps.view(-1, 2).tolist(), torch.tensor(pairs.tokens).view(-1, 2).tolist()
    truncated = [max_length is not None and len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
                 > max_length for r in rows]
    columns = {f.name: [None] * len(rows) for f in TABLE.schema()}
    columns.update({"id": [row_digest(r) for r in rows], "logp_chosen": [v[0] for v in logps],
                    "logp_rejected": [v[1] for v in logps], "n_chosen": [n[0] for n in tokens],
                    "n_rejected": [n[1] for n in tokens], "truncated": truncated, "status": ["ok"] * len(rows)})
    stats = RunStats(rows=len(rows), ok=len(rows), truncated=sum(truncated),
                     real_tokens=sums.counts.real if sums else 0, padded_tokens=sums.counts.padded if sums else 0,
                     methods={sums.method: 1} if sums else {}, seconds=time.perf_counter() - start)
    return columns, stats


def write_table(out: Path, sidecar: Sidecar, dataset, score_chunk, rank: int, world: int, barrier,
                total: int | None):
    """Score `dataset` (`total` rows, None if unknown) into the table `out` through parts: chunk c
    by rank c mod world, complete parts of an earlier run kept; rank 0 assembles the table and
    shows the progress. `score_chunk(rows)` returns a part's columns and statistics; `barrier()`
    waits for every rank."""
    from tqdm import tqdm
    parts = Parts(str(out))
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        parts.prepare({"key": sidecar.key}, sidecar, resume=True)
    barrier()
    bar = tqdm(total=total, unit="pair", desc="prefrank: reference log-probs", disable=None if rank == 0 else True)
    n_chunks = 0
    for c, rows in enumerate(chunks(dataset)):
        n_chunks = c + 1
        if c % world == rank and not parts.is_complete(c, [row_digest(r) for r in rows]):
            columns, stats = score_chunk(rows)
            parts.write(c, columns, TABLE, stats)
        bar.update(len(rows))
    bar.close()
    parts.mark_done(rank, n_chunks)
    barrier()
    if rank == 0:
        parts.merge()
    barrier()


def read_table(path, names=("logp_chosen", "logp_rejected")) -> dict[str, list]:
    import pyarrow.parquet as pq
    return pq.read_table(path, columns=["id", "status", "error", "n_chosen", "n_rejected", *names]).to_pydict()


def reference_from_table(path, row_ids: list[str], rows: list[int], tokens: list[list[int]]) -> torch.Tensor:
    """[len(rows), 2] float64 reference log-probs of dataset rows `rows` (0-based indices into the
    data the table was scored on, whose ids are `row_ids`), read from a prefrank score table: its
    `ref_logp_*` columns (a table scored with --ref-model), else its `logp_*` (the table's model is
    the reference). Refuses a table of other rows, or one whose token counts are not the
    `tokens` [len(rows), 2] TRL scores (other tokenization, or TRL's max_length truncated them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        names = set(pq.read_schema(path).names)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"ref_scores {path}: cannot read it as a Parquet score table: {e}") from None
    layout = TableLayout.of_names(names)
    if layout.kwise:
        raise ValueError(f"ref_scores {path}: a K-wise table; the reference of pairs needs a pair table")
    prefix = "ref_" if layout.with_ref else ""
    needed = {"id", "status", "error", "n_chosen", "n_rejected", f"{prefix}logp_chosen", f"{prefix}logp_rejected"}
    if not needed <= names:
        raise ValueError(f"ref_scores {path}: not a prefrank score table (missing {', '.join(sorted(needed - names))})")
    # a table of votes may have swapped a pair to the raters' choice; TRL trains the columns as given
    table = read_table(path, (f"{prefix}logp_chosen", f"{prefix}logp_rejected") + (
        ("reoriented",) if "reoriented" in names else ()))
    if len(table["id"]) != len(row_ids):
        raise ValueError(f"ref_scores {path}: {len(table['id'])} rows for a dataset of {len(row_ids)}: "
                         f"the table must hold the dataset's rows, in order")
    bad = next((i for i, (a, b) in enumerate(zip(table["id"], row_ids)) if a != b), None)
    if bad is not None:
        raise ValueError(f"ref_scores {path}: row {bad} has id {table['id'][bad]!r} where the dataset's is "
                         f"{row_ids[bad]!r}: the table must hold the dataset's rows, in order")
    values = []
    for r, (n_c, n_r) in zip(rows, tokens):
        if table["status"][r] != "ok":
            raise ValueError(f"ref_scores {path}: row {r} (id {row_ids[r]!r}) is an error row in the table "
                             f"({table['error'][r]}), and TRL trains on it")
        if table.get("reoriented", [None] * len(row_ids))[r]:
            raise ValueError(f"ref_scores {path}: row {r} (id {row_ids[r]!r}) was reoriented to its raters' choice "
                             f"(its chosen is the data's rejected), and TRL trains on chosen as given: score the "
                             f"table with --keep-column-order")
        if (table["n_chosen"][r], table["n_rejected"][r]) != (n_c, n_r):
            raise ValueError(f"ref_scores {path}: row {r} (id {row_ids[r]!r}) scored {table['n_chosen'][r]} chosen / "
                             f"{table['n_rejected'][r]} rejected tokens where TRL scores {n_c} / {n_r}: score the "
                             f"table with `prefrank score --tokenization trl` on the same rows, and no row longer "
                             f"than the trainer's max_length")
        values.append([table[f"{prefix}logp_chosen"][r], table[f"{prefix}logp_rejected"][r]])
    return torch.tensor(values, dtype=torch.float64).view(-1, 2)
