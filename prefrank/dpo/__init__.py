"""DPO for other trainers: the light loss on log-probs and the fused linear loss."""
from prefrank.dpo.loss import FusedLinearDPOLoss, fused_linear_dpo_loss
from prefrank.dpo.objective import LOSS_TYPES, dpo_loss, dpo_metrics

__all__ = ["LOSS_TYPES", "FusedLinearDPOLoss", "dpo_loss", "dpo_metrics", "fused_linear_dpo_loss"]
