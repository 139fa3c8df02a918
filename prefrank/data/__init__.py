"""Preference data in: read rows from a file or a Hugging Face dataset, and normalize each row
to an `Example` (one prompt, K completions; pairs are K = 2, chosen first) or to a row error.

Nothing is dropped: a row that cannot be used becomes an Example with `error` set, in its place.
Formats (auto-detected per row, after the column mapping in `Columns`):
  explicit        prompt, chosen, rejected: strings
  implicit        chosen, rejected: full transcripts (Anthropic HH); the prompt is their longest
                  common prefix cut back to the end of the last "\n\nAssistant:", else to the
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

The package, by job: readers (files and hub datasets → rows), columns (the column options and
presets), rows (a row → an Example), groups (votes grouped into pairs).
"""
import itertools
from typing import Iterator

from prefrank.data.columns import DETECTION_KEEPS, SCORES_ORDERS, Columns, preset_columns, resolve_columns
from prefrank.data.groups import grouped_examples
from prefrank.data.readers import BadRow, count_rows, read_rows
from prefrank.data.rows import HH_ASSISTANT, Example, check_columns, split_implicit_prompt, to_example

__all__ = ["BadRow", "Columns", "DETECTION_KEEPS", "Example", "HH_ASSISTANT", "SCORES_ORDERS", "check_columns",
           "count_rows", "open_examples", "preset_columns", "read_examples", "read_rows", "resolve_columns",
           "split_implicit_prompt", "to_example"]


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
    return cols, (grouped_examples(rows, cols, limit) if cols.group_by else _examples(rows, cols, limit))


def read_examples(source: str, cols: Columns, *, split: str = "train", subset: str | None = None,
                  limit: int | None = None) -> Iterator[Example]:
    """data → Examples (see open_examples)."""
    return open_examples(source, cols, split=split, subset=subset, limit=limit)[1]


def _examples(rows, cols: Columns, limit: int | None) -> Iterator[Example]:
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            return
        yield to_example(index, row, cols)
