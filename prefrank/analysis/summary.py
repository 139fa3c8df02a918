"""Score tables → the paper's measurements, as one JSON-ready summary.

The policy's log-probs come from a score table (`prefrank score`); the reference's from the same
table's ref_ columns (scored with --ref-model) or from a second score table of the reference model
(`ref_scores`), matched row by row. Only rows with status "ok" in every table enter the metrics;
the others are counted in `n_errors`.

Tied pairs (alpha = 0.5) have no preferred completion: Chen et al. define ranking accuracy and
the idealized accuracy over triples (x, y_w, y_l) whose y_w the raters prefer, and their code
drops ties (include_ties=False) before computing R*. So every measure here is taken over the
untied pairs, and the ties are counted (`n_ties`); with a tie band they count instead, as correct
when the model's (or the idealized model's) log-likelihoods lie within the band.

alpha is used as the table gives it: a share of rater votes, or a judge's or reward model's
probability (a probability vote coding); the table's sidecar says which, and the summary repeats
it (`alpha_source`).
"""
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prefrank.analysis import metrics
from prefrank.errors import InputError
from prefrank.options import flags, float_list, option, options, positive_float, positive_int
from prefrank.table import TableLayout, read_sidecar


@options
class AnalysisOptions:
    """The analysis's parameters: `prefrank analyze` and `report` take them as options."""
    beta: float = option(0.1, "β of the DPO loss and Theorem 4.1", type=positive_float)
    betas: tuple[float, ...] = option(metrics.DEFAULT_BETAS, "β sweep of the idealized accuracy", type=float_list,
                                      default_text=",".join(f"{b:g}" for b in metrics.DEFAULT_BETAS))
    epsilon: float = option(metrics.DEFAULT_EPSILON, "alpha is clipped to [ε, 1-ε]")
    gamma: float = option(1.0, "DPO^γ: γ scales the reference log-ratio; reported as dpo_gamma_loss_mean when not 1")
    tie_band: float | None = option(None, "pairs with alpha = 0.5 count as correct when |Δ log π| <= band",
                                    type=float)
    n_boot: int = option(1000, "bootstrap resamples", flag="--bootstrap", type=positive_int)
    bootstrap_seed: int = option(0, "seed of the bootstrap resamples")

    def __post_init__(self):
        self.betas = tuple(self.betas)  # the command line gives a list


@dataclass
class Pairs:
    """Aligned per-pair arrays of the rows that scored ok (w = chosen, l = rejected)."""
    ids: pa.StringArray  # Arrow, not Python strings: a few bytes a pair on big tables
    rows: np.ndarray  # row positions in the score table (= input order)
    pol_w: np.ndarray
    pol_l: np.ndarray
    n_w: np.ndarray
    n_l: np.ndarray
    ref_w: np.ndarray | None
    ref_l: np.ndarray | None
    alpha: np.ndarray | None
    reoriented: np.ndarray  # bool: the scorer swapped the input's columns to the raters' choice
    n_rows: int
    ref_ches: np.ndarray | None = None  # [n, 2]: the reference's CHES and its length-normalized form (--ches)
    alpha_source: str | None = None  # where alpha came from (the sidecar's words), when known

    @property
    def n_errors(self) -> int:
        return self.n_rows - len(self.ids)

    @property
    def has_ref(self) -> bool:
        return self.ref_w is not None

    @property
    def tie(self) -> np.ndarray:
        """bool: the raters tied (alpha = 0.5; exact, as alpha is a share of votes or a probability as given)."""
        return np.zeros(len(self.ids), bool) if self.alpha is None else self.alpha == 0.5

    def subset(self, keep: np.ndarray) -> "Pairs":
        """The pairs where `keep` is true (n_rows unchanged)."""
        def part(name, values):
            if name in ("n_rows", "alpha_source") or values is None:
                return values
            return values.filter(pa.array(keep)) if name == "ids" else values[keep]
        return Pairs(**{f.name: part(f.name, getattr(self, f.name)) for f in fields(self)})

    def id_list(self, positions) -> list[str]:
        """The ids of the pairs at `positions` (indices into these pairs)."""
        return self.ids.take(pa.array(np.asarray(positions, np.int64))).to_pylist()


POLICY = ("logp_chosen", "logp_rejected", "n_chosen", "n_rejected")


def _parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as e:
        reason = "no such file" if isinstance(e, FileNotFoundError) else e
        raise InputError(f"cannot read score table {path}: {reason}") from None


def _names(source) -> set[str]:
    return set(source) if isinstance(source, dict) else set(_parquet(source).schema_arrow.names)


class _Rows:
    """A score table's `columns`, handed out in consecutive record batches of the sizes asked for:
    a Parquet file is read a batch at a time, so the analysis never holds a table's rows as Python
    objects, and two tables are walked in step whatever their row groups."""

    def __init__(self, source, columns: list[str], batch_rows: int = 1 << 18):
        self.batch_rows = batch_rows
        if isinstance(source, dict):
            self._batches = iter(pa.table({c: source[c] for c in columns}).to_batches(batch_rows))
        else:
            self._batches = _parquet(source).iter_batches(batch_size=batch_rows, columns=columns)
        self._held = []  # record batches read and not yet handed out
        self._n_held = 0

    def __iter__(self):
        while batch := self.take(self.batch_rows):
            yield batch

    def take(self, n: int) -> pa.Table | None:
        """The next n rows (fewer at the end; None when none are left)."""
        while self._n_held < n and (batch := next(self._batches, None)) is not None:
            self._held.append(batch)
            self._n_held += len(batch)
        if not self._n_held:
            return None
        rows = pa.Table.from_batches(self._held)
        head, rest = rows.slice(0, n), rows.slice(n)
        self._held, self._n_held = rest.to_batches(), len(rest)
        return head


def _values(column: pa.ChunkedArray) -> np.ndarray:
    """A column as numpy, a batch at a time; null reads as nan."""
    return column.to_numpy()


def _ok(rows: pa.Table) -> pa.Array:
    return pc.fill_null(pc.equal(rows.column("status"), "ok"), False)


def _alpha_source(scores) -> str | None:
    """Where the table's alpha came from, as its sidecar records it (None for a table without one,
    or from a prefrank that did not record it)."""
    if isinstance(scores, dict):
        return None
    try:
        return read_sidecar(scores).alpha_source
    except (OSError, ValueError, TypeError):  # no sidecar (a table from elsewhere), or not prefrank's
        return None


def load_pairs(scores, ref_scores: str | None = None) -> Pairs:
    """Pairs from a pair score table: a Parquet path (read in record batches), or its columns as a
    dict of lists."""
    names = _names(scores)
    layout = TableLayout.of_names(names)
    if layout.kwise:
        raise InputError(f"{scores} is a K-wise score table: analyze it as such, or convert it with `prefrank pairs`")
    if missing := {"id", "status", *POLICY} - names:
        raise InputError(f"not a prefrank score table (missing {', '.join(sorted(missing))})")
    # the reference's columns, as named in the table that holds them
    if ref_scores is not None:
        ref_names = _names(ref_scores)
        if missing := {"id", "status", "logp_chosen", "logp_rejected"} - ref_names:
            raise InputError(f"{ref_scores}: not a prefrank score table (missing {', '.join(sorted(missing))})")
        ref_cols = ["logp_chosen", "logp_rejected"] + (["ches", "ches_normalized"] if "ches" in ref_names else [])
    elif layout.with_ref:  # the CHES columns read where present (a table may carry the reference's alone)
        ref_cols = ["ref_logp_chosen", "ref_logp_rejected"] + (
            ["ref_ches", "ref_ches_normalized"] if "ref_ches" in names else [])
    else:
        ref_cols = []
    own = ["id", "status", *POLICY, *(c for c in ("alpha", "reoriented") if c in names)]
    own += ref_cols if ref_scores is None else []
    ref_rows = _Rows(ref_scores, ["id", "status", *ref_cols]) if ref_scores is not None else None
    # the scored rows' values, filled batch by batch into arrays sized for the whole table: the table is
    # never held twice (as batches and joined), and status is read for the mask only
    total = len(scores["id"]) if isinstance(scores, dict) else _parquet(scores).metadata.num_rows
    # 32-bit integers where they always fit (token counts; row positions below 2^31): the values are the
    # same, in half the memory
    dtypes = {"n_chosen": np.int32, "n_rejected": np.int32, "reoriented": bool}
    kept = {c: np.empty(total, dtypes.get(c, np.float64)) for c in own if c not in ("id", "status")}
    kept_ids, ref_kept = [], {c: np.empty(total) for c in ref_cols} if ref_rows is not None else kept
    rows, n_kept, n_rows = np.empty(total, np.int32 if total < 2 ** 31 else np.int64), 0, 0
    for batch in _Rows(scores, own):
        ok = _ok(batch)
        if ref_rows is not None:
            ref = ref_rows.take(len(batch))
            if ref is None or not ref.column("id").equals(batch.column("id")):
                raise InputError(f"{ref_scores} does not hold the same rows as the policy's table (ids differ)")
            ok = pc.and_(ok, _ok(ref))
        positions = np.flatnonzero(ok.to_numpy(zero_copy_only=False))
        end = n_kept + len(positions)
        if ref_rows is not None:
            for c in ref_cols:
                ref_kept[c][n_kept:end] = _values(ref.column(c).filter(ok))
        for c in kept:
            kept[c][n_kept:end] = _values(batch.column(c).filter(ok))
        kept_ids.append(batch.column("id").filter(ok))
        rows[n_kept:end] = positions + n_rows
        n_kept, n_rows = end, n_rows + len(batch)
    if ref_rows is not None and ref_rows.take(1) is not None:
        raise InputError(f"{ref_scores} does not hold the same rows as the policy's table (ids differ)")
    rows = rows[:n_kept]
    pa.default_memory_pool().release_unused()  # the batches' memory, which Arrow's allocator would keep

    def column(name, source=kept):
        return source[name][:n_kept]

    reoriented = column("reoriented") if "reoriented" in kept else np.zeros(len(rows), bool)
    alpha = column("alpha") if "alpha" in kept else None
    if alpha is not None and np.isnan(alpha).all():
        alpha = None
    elif alpha is not None and np.isnan(alpha).any():
        raise InputError("alpha is missing on some scored rows but not all; idealized accuracy needs it on every pair")
    ref_w, ref_l, *ches = [column(c, source=ref_kept) for c in ref_cols] or [None, None]
    return Pairs(ids=pa.chunked_array(kept_ids, type=pa.string()).combine_chunks(), rows=rows,
                 pol_w=column("logp_chosen"), pol_l=column("logp_rejected"),
                 n_w=column("n_chosen"), n_l=column("n_rejected"),
                 ref_w=ref_w, ref_l=ref_l, alpha=alpha, reoriented=reoriented, n_rows=n_rows,
                 ref_ches=np.stack(ches, 1) if ches else None,
                 alpha_source=None if alpha is None else _alpha_source(scores))


def ranked_pairs(p: Pairs, tie_band: float | None = None) -> Pairs:
    """The pairs every measure is taken over: without a tie band, those the raters did not tie."""
    return p if tie_band is not None else p.subset(~p.tie)


@dataclass
class PairMeasures:
    """The per-pair quantities of pairs under the policy and the reference."""
    correct: np.ndarray  # bool: the policy ranks the pair right (the tie band applied)
    ref_correct: np.ndarray  # bool: the reference does
    theorem: dict  # metrics.theorem41: difficulty c, DPO loss, its bound, the violations
    margin: np.ndarray  # the DPO reward margin
    moved: dict  # metrics.displacement: Δ_w, Δ_l, and their shares and means
    groups: list[dict]  # metrics.flip_groups: the four reference × policy groups

    @property
    def displacement(self) -> dict:
        """The displacement's shares and means, without the per-pair Δ arrays (JSON-ready)."""
        return {k: v for k, v in self.moved.items() if k not in ("delta_w", "delta_l")}


def pair_measures(p: Pairs, beta: float, tie_band: float | None = None) -> PairMeasures:
    """The per-pair quantities of pairs that have reference log-probs: every table's summary,
    checkpoint series, plots and per-pair table take them from here."""
    correct = metrics.ranking_correct(p.pol_w, p.pol_l, p.alpha, tie_band)
    ref_correct = metrics.ranking_correct(p.ref_w, p.ref_l, p.alpha, tie_band)
    theorem = metrics.theorem41(p.pol_w, p.pol_l, p.ref_w, p.ref_l, beta)
    margin = metrics.dpo_margin(p.pol_w, p.pol_l, p.ref_w, p.ref_l, beta)
    moved = metrics.displacement(p.pol_w, p.pol_l, p.ref_w, p.ref_l, correct)
    groups = metrics.flip_groups(ref_correct, correct, theorem["loss"], margin, moved["delta_w"], moved["delta_l"])
    return PairMeasures(correct=correct, ref_correct=ref_correct, theorem=theorem, margin=margin, moved=moved,
                        groups=groups)


# Said wherever the idealized accuracy is shown for a table whose alpha is all 0 or 1
NO_DISAGREEMENT = ("every ranked pair's alpha is 0 or 1 (one vote or label per pair, or unanimous raters): alpha "
                   "carries no rater disagreement, so the idealized accuracy R* follows from the clip ε (alpha is "
                   "clipped to [ε, 1 − ε]), not from the data, and the alignment gap is R* − R by construction, "
                   "not a measured gap")


def _accuracy(correct, n_boot, seed) -> dict:
    lo, hi = metrics.bootstrap_ci(correct, n_boot=n_boot, seed=seed)
    return {"value": float(np.mean(correct)) if len(correct) else None, "ci95": [lo, hi]}


def summarize(pairs: Pairs, opts: AnalysisOptions | None = None) -> dict:
    """Every measurement the inputs allow: accuracies with bootstrap CIs; with a reference, DPO
    loss, Theorem 4.1 and the four groups; with a reference and alpha, idealized accuracy over
    the β sweep and the alignment gap. Taken over the untied pairs (all of them with a tie band);
    the counts say how many pairs were tied, reoriented by the scorer, or kept with the raters'
    rejected completion as chosen (alpha < 0.5: --keep-column-order, or an older table)."""
    opts = opts or AnalysisOptions()
    beta, betas, epsilon, gamma, tie_band = opts.beta, opts.betas, opts.epsilon, opts.gamma, opts.tie_band
    n_boot, bootstrap_seed = opts.n_boot, opts.bootstrap_seed
    p = ranked_pairs(pairs, tie_band)
    out = {
        "n_pairs": len(pairs.ids), "n_errors": pairs.n_errors, "n_ties": int(pairs.tie.sum()), "n_ranked": len(p.ids),
        "n_reoriented": int(pairs.reoriented.sum()),
        "n_chosen_rejected_by_raters": 0 if pairs.alpha is None else int((pairs.alpha < 0.5).sum()),
        **({"alpha_source": pairs.alpha_source} if pairs.alpha_source else {})}
    # from here on only the ranked pairs: when the caller keeps no reference to the whole table
    # (analyze without --pairs-out), its arrays are freed rather than held beside their subset
    del pairs
    pa.default_memory_pool().release_unused()  # the whole table's ids, which Arrow's allocator would keep
    out["ranking_accuracy"] = _accuracy(metrics.ranking_correct(p.pol_w, p.pol_l, p.alpha, tie_band), n_boot,
                                        bootstrap_seed)
    norm_w, norm_l = metrics.length_normalized(p.pol_w, p.n_w), metrics.length_normalized(p.pol_l, p.n_l)
    out.update({
        "ranking_accuracy_length_normalized": _accuracy(metrics.ranking_correct(norm_w, norm_l, p.alpha, tie_band),
                                                        n_boot, bootstrap_seed),
        # keyed as the command line names them (--bootstrap: n_boot)
        "options": {flag[2:].replace("-", "_"): getattr(opts, name) for name, flag in flags(AnalysisOptions).items()},
    })
    del norm_w, norm_l
    if not p.has_ref or not len(p.ids):
        return out
    m = pair_measures(p, beta, tie_band)
    out["reference_ranking_accuracy"] = _accuracy(m.ref_correct, n_boot, bootstrap_seed)
    mean = lambda x: float(np.mean(x)) if len(x) else None  # noqa: E731
    out["dpo_loss_mean"] = mean(m.theorem["loss"])
    if gamma != 1.0:
        out["dpo_gamma_loss_mean"] = mean(metrics.sigmoid_dpo_loss(p.pol_w, p.pol_l, p.ref_w, p.ref_l, beta, gamma))
    out["reward_margin_mean"] = mean(m.margin)
    out["reward_accuracy"] = _accuracy(m.margin > 0, n_boot, bootstrap_seed)
    out["theorem41_violations"] = int(len(m.theorem["violations"]))
    out["theorem41_violating_ids"] = p.id_list(m.theorem["violations"][:20])
    displacement, groups, c = m.displacement, m.groups, m.theorem["c"]
    if p.ref_ches is not None:  # CHES of the reference predicts which pairs' chosen loses likelihood
        delta_w = m.moved["delta_w"]
        displacement["spearman_ref_ches_vs_delta_chosen"] = metrics.spearman(p.ref_ches[:, 0], delta_w)
        displacement["spearman_ref_ches_normalized_vs_delta_chosen"] = metrics.spearman(p.ref_ches[:, 1], delta_w)
        del delta_w
    del m  # the per-pair measures but c: the difficulty's rank correlations need the room
    out["difficulty"] = _difficulty(p, c)
    del c
    out["displacement"] = displacement
    out["groups"] = groups
    if p.alpha is None:
        return out
    ref_norm_w, ref_norm_l = metrics.length_normalized(p.ref_w, p.n_w), metrics.length_normalized(p.ref_l, p.n_l)
    idealized = {"raw": metrics.idealized_sweep(p.ref_w, p.ref_l, p.alpha, betas, epsilon, n_boot, bootstrap_seed,
                                                tie_band),
                 "length_normalized": metrics.idealized_sweep(ref_norm_w, ref_norm_l, p.alpha, betas, epsilon,
                                                              n_boot, bootstrap_seed, tie_band)}
    out["idealized"] = idealized
    out["alpha_without_disagreement"] = bool(np.isin(p.alpha, (0.0, 1.0)).all())
    out["alignment_gap"] = {
        kind: {stat: idealized[kind][stat] - out[key]["value"] for stat in ("min", "median", "max")}
        for kind, key in (("raw", "ranking_accuracy"), ("length_normalized", "ranking_accuracy_length_normalized"))}
    return out


def per_pair_table(p: Pairs, beta: float) -> dict[str, list]:
    """One row per scored pair: its Theorem 4.1 difficulty c, DPO loss, reward margin and who
    ranks it correctly (needs reference log-probs)."""
    m = pair_measures(p, beta)
    return {"id": p.ids.to_pylist(), "row": p.rows.tolist(), "c": m.theorem["c"].tolist(),
            "dpo_loss": m.theorem["loss"].tolist(), "loss_bound": m.theorem["bound"].tolist(),
            "reward_margin": m.margin.tolist(), "policy_correct": m.correct.tolist(),
            "reference_correct": m.ref_correct.tolist(),
            "alpha": None if p.alpha is None else p.alpha.tolist(), "tie": p.tie.tolist(),
            "reoriented": p.reoriented.tolist()}


def _difficulty(p: Pairs, c: np.ndarray, k: int = 5) -> dict:
    """How the Theorem-4.1 difficulty c relates to lengths and agreement; the hardest and easiest pairs."""
    order = np.argsort(-c, kind="stable")
    out = {"c_mean": float(c.mean()) if len(c) else None, "c_median": float(np.median(c)) if len(c) else None,
           "share_c_positive": float((c > 0).mean()) if len(c) else None,
           "spearman_c_vs_n_chosen": metrics.spearman(c, p.n_w),
           "spearman_c_vs_n_rejected": metrics.spearman(c, p.n_l),
           "spearman_c_vs_length_difference": metrics.spearman(c, p.n_w - p.n_l),
           "hardest": [{"id": p.id_list([i])[0], "row": int(p.rows[i]), "c": float(c[i])} for i in order[:k]],
           "easiest": [{"id": p.id_list([i])[0], "row": int(p.rows[i]), "c": float(c[i])} for i in order[::-1][:k]]}
    if p.alpha is not None:
        out["spearman_c_vs_alpha"] = metrics.spearman(c, p.alpha)
    return out
