"""The score table's contract, each part defined once: which columns a table has (its TableLayout: pairs
or K-wise, with or without a reference, per-token values, CHES, hidden sums), the statistics each
part records and the run's summary adds up (RunStats), and the sidecar beside the table (Sidecar).
The pipeline and the TRL reference write through it, io stores it, the analysis reads through it;
whether a table is K-wise is decided here, from its columns.

Columns (one row per input row):
  id                                  the input's `id` field, else the row's 0-based index
  logp_chosen, logp_rejected          Σ log π(completion | prompt), float64 (null on error)
  n_chosen, n_rejected                completion tokens scored
  ref_logp_chosen, ref_logp_rejected  the same under the reference model (with --ref-model)
  alpha                               share of raters preferring chosen, or a model's P(chosen is better)
                                      with a probability vote coding (null without votes)
  n_votes                             the votes alpha comes from (null without vote columns or a votes
                                      list, and for a probability: no votes were counted)
  tie                                 the raters tied: alpha = 0.5 (null without alpha)
  reoriented                          the raters preferred the input's rejected column: the two were swapped
  multi_turn                          a completion holds more than one message (a later turn, with its
                                      model's own earlier answers)
  truncated                           the pair was cut to fit (--truncate keep-end)
  status, error                       "ok" / "error" and the reason; an error row keeps every column read
                                      before the failure
  token_logps_chosen, ...             per-token log-probs, float32 lists (with --per-token)
  ches, ches_normalized               CHES of the pair (and ref_ches, ...: under the reference; with --ches)
  hidden_sum_chosen, ...              Σ of the hidden states predicting the completion's tokens, float32
                                      lists (with --hidden-sums; ref_ ones too with a reference)
K-wise tables (K completions per prompt) hold lists instead, one element per completion:
  logps, ref_logps, n_tokens, token_logps, ref_token_logps, hidden_sums, and human_scores in place
  of alpha, n_votes, tie and reoriented (higher is better: ranks are stored negated); with --ches,
  hidden_gram (and ref_hidden_gram): the K×K inner products of the completions' hidden sums,
  row-major, from which the CHES of any pair i, j is G_ij − G_ii.
Tables written before n_votes, tie, reoriented and multi_turn existed still load (PAIR_EXTRAS).
"""
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prefrank.errors import InputError

COMPLETION_NAMES = ("chosen", "rejected")  # completion k of a pair

# Per-completion values: pairs spread them over chosen/rejected columns, K-wise tables keep lists.
_FIELDS = {  # kind: (pair column pattern, K-wise column, element type)
    "logp": ("logp_{}", "logps", pa.float64()),
    "ref_logp": ("ref_logp_{}", "ref_logps", pa.float64()),
    "n": ("n_{}", "n_tokens", pa.int64()),
    "token_logps": ("token_logps_{}", "token_logps", pa.list_(pa.float32())),
    "ref_token_logps": ("ref_token_logps_{}", "ref_token_logps", pa.list_(pa.float32())),
    "hidden_sum": ("hidden_sum_{}", "hidden_sums", pa.list_(pa.float32())),
    "ref_hidden_sum": ("ref_hidden_sum_{}", "ref_hidden_sums", pa.list_(pa.float32())),
}

# The raters' verdict beside alpha, in pair tables; tables of older prefrank versions lack them.
PAIR_EXTRAS = {"n_votes": pa.int64(), "tie": pa.bool_(), "reoriented": pa.bool_()}
PAIR_VERDICT = ("alpha", *PAIR_EXTRAS)  # what a pair row says of its raters


@dataclass(frozen=True)
class TableLayout:
    """Which columns a score table has."""
    with_ref: bool = False  # ref_ columns: the reference model's values
    per_token: bool = False
    kwise: bool = False  # K completions per prompt: list columns (logps, n_tokens, human_scores, ...)
    ches: bool = False
    hidden_sums: bool = False

    @classmethod
    def of_names(cls, names) -> "TableLayout":
        """The layout of a table with these column names."""
        names = set(names)
        kwise = "logps" in names
        return cls(with_ref=("ref_logps" if kwise else "ref_logp_chosen") in names,
                   per_token=("token_logps" if kwise else "token_logps_chosen") in names, kwise=kwise,
                   ches=("hidden_gram" if kwise else "ches") in names,
                   hidden_sums=("hidden_sums" if kwise else "hidden_sum_chosen") in names)

    @classmethod
    def of_table(cls, path) -> "TableLayout":
        """The layout of the Parquet score table at `path` (InputError when it cannot be read)."""
        try:
            return cls.of_names(pq.read_schema(path).names)
        except (OSError, pa.ArrowException) as e:
            reason = "no such file" if isinstance(e, FileNotFoundError) else e
            raise InputError(f"cannot read score table {path}: {reason}") from None

    def _kinds(self) -> list[str]:
        kinds = ["logp"] + (["ref_logp"] if self.with_ref else []) + ["n"]
        if self.per_token:
            kinds += ["token_logps"] + (["ref_token_logps"] if self.with_ref else [])
        if self.hidden_sums:
            kinds += ["hidden_sum"] + (["ref_hidden_sum"] if self.with_ref else [])
        return kinds

    def schema(self) -> pa.Schema:
        columns = [("id", pa.string())]
        for kind in self._kinds():
            pair_pattern, kwise_column, element = _FIELDS[kind]
            columns += ([(kwise_column, pa.list_(element))] if self.kwise else
                        [(pair_pattern.format(name), element) for name in COMPLETION_NAMES])
        if self.ches:
            names = ["hidden_gram"] if self.kwise else ["ches", "ches_normalized"]
            element = pa.list_(pa.float64()) if self.kwise else pa.float64()
            columns += [(prefix + name, element) for prefix in ["", "ref_"][:1 + self.with_ref] for name in names]
        if self.kwise:
            columns += [("human_scores", pa.list_(pa.float64()))]
        else:
            columns += [("alpha", pa.float64())] + list(PAIR_EXTRAS.items())
        columns += [("multi_turn", pa.bool_()), ("truncated", pa.bool_()), ("status", pa.string()),
                    ("error", pa.string())]
        return pa.schema(columns)

    def completion_name(self, k: int) -> str:
        """How messages name completion k of a row."""
        return f"completion {k}" if self.kwise else COMPLETION_NAMES[k]

    def completion_fields(self, kind: str, values: list | None) -> dict:
        """Table columns holding one row's per-completion `values` (None on an error row)."""
        pair_pattern, kwise_column, _ = _FIELDS[kind]
        if self.kwise:
            return {kwise_column: values}
        return {pair_pattern.format(name): None if values is None else values[k]
                for k, name in enumerate(COMPLETION_NAMES)}

    def ches_columns(self, prefix: str, gram: list[float] | None, lengths: list[int] | None) -> dict:
        """One row's CHES columns: a pair's CHES = ⟨Σh_w, Σh_l⟩ − ‖Σh_w‖², and length-normalized with
        the means (Razin et al. 2025), from its 2×2 Gram matrix `gram` (row-major) and completion
        lengths; K-wise rows keep the Gram matrix itself."""
        if self.kwise:
            return {prefix + "hidden_gram": gram}
        if gram is None:
            return {prefix + "ches": None, prefix + "ches_normalized": None}
        (ww, wl, _, _), (n_w, n_l) = gram, lengths
        return {prefix + "ches": wl - ww, prefix + "ches_normalized": wl / (n_w * n_l) - ww / (n_w * n_w)}


@dataclass
class RunStats:
    """What a part of the table records about its rows, and the run's totals (their sum)."""
    rows: int = 0
    ok: int = 0
    errors: int = 0
    truncated: int = 0
    boundary_moved: int = 0  # rows whose prompt's last ids were joined to the completions (tokenization.py)
    glued: int = 0  # rows whose text prompt, given with no join rule, runs straight into a completion
    no_bos: int = 0  # rows rendered by a chat template that puts no BOS first (the tokenizer puts one before text)
    reoriented: int = 0  # pairs whose raters preferred the rejected column (swapped)
    ties: int = 0  # pairs whose raters tied (alpha = 0.5)
    multi_turn: int = 0  # rows whose completions hold more than one message
    real_tokens: int = 0
    padded_tokens: int = 0
    methods: dict = field(default_factory=dict)  # method → chunk scorings it did (policy and reference)
    seconds: float = 0.0  # the parts' own scoring times, whichever runs wrote them
    first_error: str | None = None

    @classmethod
    def from_json(cls, d: dict) -> "RunStats":
        """Statistics as a part's record or a sidecar holds them (keys of other versions ignored)."""
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})

    def add(self, other: "RunStats"):
        """Add another part's statistics to these."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "first_error":
                self.first_error = mine or theirs
            elif f.name == "methods":
                self.methods = {m: mine.get(m, 0) + theirs.get(m, 0) for m in {**mine, **theirs}}
            else:
                setattr(self, f.name, mine + theirs)


@dataclass
class Sidecar:
    """OUT.meta.json, beside a score table: how it was made. A scoring run fills every field (the
    summary when its parts are merged); the TRL drop-in's reference cache, a score table too, fills
    the common ones and `key`, `what` and `trl`. Sidecars of older versions read with the fields they
    lack left at their defaults."""
    table: TableLayout = field(default_factory=TableLayout)
    prefrank_version: str | None = None
    created: str | None = None
    command: list | None = None
    model: dict | None = None  # path, class, vocabulary, parameters, maximum positions
    ref_model: dict | None = None
    tokenizer: dict | None = None
    dtype: str | None = None
    device: str | None = None
    method: str | None = None
    tokenization: str | None = None
    # how text prompts met their answers: "chat" (the chat template), the text between them, or None (as given)
    join: str | None = None
    read_as: str = ""  # the column mapping and join, as the run's summary states them
    max_length: int | None = None
    options: dict | None = None  # every option of the run (prefrank.pipeline.ScoreOptions)
    input: dict | None = None  # source, split, subset and the contents' hash
    files: dict | None = None  # model and tokenizer files' fingerprints (prefrank.models.fingerprint)
    alpha_source: str | None = None  # rater votes, or a model's probability (a probability vote coding)
    world_size: int | None = None
    versions: dict | None = None
    summary: RunStats | None = None
    key: str | None = None  # the reference cache's key (TRL drop-in)
    what: str | None = None
    trl: dict | None = None

    def to_json(self) -> dict:
        """The sidecar as its JSON file holds it (the summary once merged; the reference cache's own
        fields only in its sidecar)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in _OMITTED_WHEN_UNSET}

    @classmethod
    def from_json(cls, d: dict) -> "Sidecar":
        if not isinstance(d, dict):
            raise ValueError("a sidecar is a JSON object")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["table"] = TableLayout(**{k: v for k, v in (d.get("table") or {}).items()
                                    if k in {f.name for f in fields(TableLayout)}})
        if d.get("summary") is not None:
            values["summary"] = RunStats.from_json(d["summary"])
        return cls(**values)


_OMITTED_WHEN_UNSET = ("summary", "key", "what", "trl")


def sidecar_path(table_path) -> Path:
    table_path = Path(table_path)
    return table_path.with_name(table_path.name + ".meta.json")


def read_sidecar(table_path) -> Sidecar:
    """The sidecar of the table at `table_path` (OSError if absent, ValueError if not a sidecar)."""
    return Sidecar.from_json(json.loads(sidecar_path(table_path).read_text()))
