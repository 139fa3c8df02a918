"""prefrank: exact, fast log-probability scoring of preference data, and the ranking analysis of
Chen et al. 2024, "Preference Learning Algorithms Do Not Learn Preference Rankings"."""
__version__ = "0.1.0"


def __getattr__(name):
    # prefrank.FusedLinearDPOLoss and prefrank.dpo_loss without importing torch at package import
    if name in ("FusedLinearDPOLoss", "fused_linear_dpo_loss", "dpo_loss"):
        from prefrank import dpo
        return getattr(dpo, name)
    raise AttributeError(f"module 'prefrank' has no attribute {name!r}")
