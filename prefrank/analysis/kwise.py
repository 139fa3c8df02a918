"""Rankings over K completions per prompt (UltraFeedback / StackExchange style).

  exact-order accuracy  a prompt is correct when the model's log-likelihoods order its completions
                        as the human scores do: every pair the humans rank strictly (h_i > h_j) has
                        log π(y_i) >= log π(y_j). Human ties constrain nothing; a prompt whose
                        human scores are all tied carries no ranking and is left out (counted).
                        For K = 2 this is exactly the pair ranking accuracy.
  pairwise accuracy     the same rule over all strictly ranked pairs of all prompts
  Kendall's τ-b         between the model's and the human order, per prompt (ties on either side
                        handled by τ-b), averaged over prompts where it is defined
Length-normalized versions use mean token log-probs. CIs resample prompts (a cluster bootstrap),
since the pairs of one prompt are not independent.
"""
import itertools

import numpy as np
import pyarrow.parquet as pq

from prefrank.analysis import metrics
from prefrank.analysis.summary import AnalysisOptions
from prefrank.errors import InputError
from prefrank.table import PAIR_VERDICT, TableLayout

PAIRINGS = ("all", "best-worst", "best-random")


def strict_pairs(human) -> list[tuple[int, int]]:
    """(i, j) for every pair with human[i] > human[j]."""
    return [(i, j) for i, j in itertools.permutations(range(len(human)), 2) if human[i] > human[j]]


def exact_order_correct(model, human) -> bool | None:
    pairs = strict_pairs(human)
    if not pairs:
        return None
    return all(model[i] >= model[j] for i, j in pairs)


def pairwise_counts(model, human) -> tuple[int, int]:
    """(correctly ordered strict pairs, strict pairs)."""
    pairs = strict_pairs(human)
    return sum(model[i] >= model[j] for i, j in pairs), len(pairs)


def kendall_tau_b(model, human) -> float | None:
    concordant = discordant = tied_model = tied_human = 0
    for i, j in itertools.combinations(range(len(model)), 2):
        dm, dh = np.sign(model[i] - model[j]), np.sign(human[i] - human[j])
        tied_model += dm == 0
        tied_human += dh == 0
        concordant += dm * dh > 0
        discordant += dm * dh < 0
    n0 = len(model) * (len(model) - 1) // 2
    denominator = np.sqrt(float(n0 - tied_model) * float(n0 - tied_human))
    return None if denominator == 0 else float((concordant - discordant) / denominator)


def implied_pairs(human, pairing: str = "all", rng: np.random.Generator | None = None) -> list[tuple[int, int]]:
    """The (preferred, dispreferred) index pairs a K-wise row implies: all strictly ranked pairs;
    the best vs the worst; or the best vs a random strictly worse one. The first index of the
    best (and worst) score wins ties. Empty when all scores are tied."""
    if pairing == "all":
        return strict_pairs(human)
    best, worst = int(np.argmax(human)), int(np.argmin(human))
    if human[best] == human[worst]:
        return []
    if pairing == "best-worst":
        return [(best, worst)]
    if pairing == "best-random":
        worse = [j for j in range(len(human)) if human[j] < human[best]]
        return [(best, int((rng or np.random.default_rng(0)).choice(worse)))]
    raise InputError(f"pairing {pairing!r}: expected one of {', '.join(PAIRINGS)}")


def load_kwise(path: str) -> dict:
    try:
        t = pq.read_table(path).to_pydict()
    except (OSError, ValueError) as e:
        reason = "no such file" if isinstance(e, FileNotFoundError) else e
        raise InputError(f"cannot read score table {path}: {reason}") from None
    ok = [i for i, s in enumerate(t["status"]) if s == "ok"]
    return {"ids": [t["id"][i] for i in ok], "logps": [t["logps"][i] for i in ok],
            "n_tokens": [t["n_tokens"][i] for i in ok], "human": [t["human_scores"][i] for i in ok],
            "ref_logps": [t["ref_logps"][i] for i in ok] if "ref_logps" in t else None,
            "n_rows": len(t["status"]), "table": t}


def summarize_kwise(path: str, opts: AnalysisOptions | None = None) -> dict:
    """The K-wise measures of a K-wise score table, with bootstrap CIs (opts: --bootstrap, --bootstrap-seed)."""
    opts = opts or AnalysisOptions()
    boot = dict(n_boot=opts.n_boot, seed=opts.bootstrap_seed)
    k = load_kwise(path)
    out = {"n_prompts": len(k["ids"]), "n_errors": k["n_rows"] - len(k["ids"]),
           "completions_per_prompt": {str(n): int(c) for n, c in zip(*np.unique([len(x) for x in k["logps"]],
                                                                                 return_counts=True))},
           "n_all_tied": sum(not strict_pairs(h) for h in k["human"])}
    for kind, model in (("", k["logps"]),
                        ("_length_normalized", [np.asarray(lp) / np.asarray(n) for lp, n in zip(k["logps"], k["n_tokens"])])):
        exact = [exact_order_correct(m, h) for m, h in zip(model, k["human"])]
        informative = np.array([e for e in exact if e is not None], dtype=bool)
        lo, hi = metrics.bootstrap_ci(informative, **boot)
        out[f"exact_order_accuracy{kind}"] = {"value": float(informative.mean()) if len(informative) else None,
                                              "ci95": [lo, hi]}
        counts = np.array([pairwise_counts(m, h) for m, h in zip(model, k["human"])], dtype=np.float64).reshape(-1, 2)
        total = counts[:, 1].sum()
        out[f"pairwise_accuracy{kind}"] = {
            "value": float(counts[:, 0].sum() / total) if total else None,
            "ci95": list(metrics.bootstrap_ratio_ci(counts[:, 0], counts[:, 1], **boot)),
            "pairs": int(total)}
        taus = np.array([t for t in (kendall_tau_b(m, h) for m, h in zip(model, k["human"])) if t is not None])
        out[f"kendall_tau_b{kind}"] = {
            "value": float(taus.mean()) if len(taus) else None,
            "ci95": list(metrics.bootstrap_ratio_ci(taus, np.ones_like(taus), **boot)),
            "prompts": len(taus)}
    return out


def kwise_to_pair_table(path: str, pairing: str = "all", seed: int = 0) -> dict[str, list]:
    """A K-wise score table as the pair score table of its implied pairs (ids "ID:i>j"); an error
    row stays one error row. A table scored with CHES gives each implied pair its CHES."""
    t = pq.read_table(path).to_pydict()
    rng = np.random.default_rng(seed)
    with_ref = "ref_logps" in t
    grams = [prefix for prefix in ("", "ref_") if prefix + "hidden_gram" in t]
    pairs_layout = TableLayout(with_ref=with_ref, ches=bool(grams))
    out = {f.name: [] for f in pairs_layout.schema()}
    for r in range(len(t["id"])):
        if t["status"][r] != "ok":
            pairs = [None]
        else:
            pairs = implied_pairs(t["human_scores"][r], pairing, rng)
        for pair in pairs:
            i, j = pair if pair else (None, None)
            pick = lambda col, idx: None if idx is None else t[col][r][idx]  # noqa: E731
            out["id"].append(f"{t['id'][r]}:{i}>{j}" if pair else t["id"][r])
            out["logp_chosen"].append(pick("logps", i))
            out["logp_rejected"].append(pick("logps", j))
            out["n_chosen"].append(pick("n_tokens", i))
            out["n_rejected"].append(pick("n_tokens", j))
            if with_ref:
                out["ref_logp_chosen"].append(pick("ref_logps", i))
                out["ref_logp_rejected"].append(pick("ref_logps", j))
            for prefix in grams:  # the pair's 2×2 block of the K×K Gram matrix
                k = len(t["logps"][r]) if pair else 0
                gram = t[prefix + "hidden_gram"][r]
                block = [gram[a * k + b] for a in (i, j) for b in (i, j)] if pair else None
                lengths = [pick("n_tokens", i), pick("n_tokens", j)] if pair else None
                for name, value in pairs_layout.ches_columns(prefix, block, lengths).items():
                    out[name].append(value)
            for column in PAIR_VERDICT:  # human scores are no votes
                out[column].append(False if column == "reoriented" else None)
            out["multi_turn"].append(t["multi_turn"][r] if "multi_turn" in t else False)
            out["truncated"].append(t["truncated"][r])
            out["status"].append(t["status"][r])
            out["error"].append(t["error"][r])
    return out


def kwise_dataset_to_pairs(source: str, columns, out: str, pairing: str = "all", seed: int = 0) -> dict:
    """Write the implied pairs of a K-wise dataset (`columns`: a prefrank.data.Columns naming its
    completions and human scores) to `out` as JSON Lines (id "ID:i>j", prompt, chosen, rejected), for
    scoring or DPO training. Returns the counts: pairs written, bad rows skipped (and the first of
    them), rows whose scores all tie (no pair)."""
    import json

    from prefrank.data import open_examples
    columns, examples = open_examples(source, columns)
    if columns.completions is None:
        raise InputError("a dataset needs <completions> (and <human_scores>), or a K-wise <format>, to be read as "
                         "K-wise")
    rng = np.random.default_rng(seed)
    counts = {"written": 0, "skipped": 0, "all_tied": 0, "first_error": None}
    with open(out, "w") as f:
        for ex in examples:
            if ex.error:
                counts["skipped"] += 1
                counts["first_error"] = counts["first_error"] or f"row {ex.index} (id {ex.id}): {ex.error}"
                continue
            pairs = implied_pairs(ex.human_scores, pairing, rng)
            counts["all_tied"] += not pairs
            for i, j in pairs:
                f.write(json.dumps({"id": f"{ex.id}:{i}>{j}", "prompt": ex.prompt, "chosen": ex.completions[i],
                                    "rejected": ex.completions[j]}) + "\n")
                counts["written"] += 1
    return counts
