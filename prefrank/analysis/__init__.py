"""The paper's measurements on score tables: ranking accuracy, idealized accuracy and the
alignment gap, DPO loss and Theorem 4.1, the four flip groups, and a report with plots."""
from prefrank.analysis import kwise
from prefrank.analysis.metrics import (
    DEFAULT_BETAS,
    DEFAULT_EPSILON,
    bootstrap_ci,
    bootstrap_ratio_ci,
    dpo_margin,
    flip_groups,
    idealized_correct,
    idealized_sweep,
    length_normalized,
    ranking_correct,
    sigmoid_dpo_loss,
    spearman,
    theorem41,
)
from prefrank.analysis.report import checkpoint_series, write_report
from prefrank.analysis.summary import AnalysisOptions, Pairs, load_pairs, per_pair_table, summarize

__all__ = ["AnalysisOptions", "DEFAULT_BETAS", "DEFAULT_EPSILON", "Pairs", "bootstrap_ci", "bootstrap_ratio_ci",
           "kwise", "checkpoint_series", "dpo_margin", "flip_groups", "idealized_correct", "idealized_sweep",
           "length_normalized", "load_pairs", "per_pair_table", "ranking_correct", "sigmoid_dpo_loss", "spearman",
           "summarize", "theorem41", "write_report"]
