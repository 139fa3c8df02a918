"""DPO for other trainers: the light loss on log-probs and the fused linear loss."""
from prefrank.dpo.loss import LOSS_TYPES, FusedLinearDPOLoss, dpo_loss, dpo_metrics, fused_linear_dpo_loss

__all__ = ["LOSS_TYPES", "FusedLinearDPOLoss", "dpo_loss", "dpo_metrics", "fused_linear_dpo_loss"]
