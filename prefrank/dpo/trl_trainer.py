"""prefrank's fused DPO loss inside TRL's DPOTrainer (requires `trl`; written against TRL 1.16, whose
private `_compute_loss` it overrides).

    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer   # instead of trl.DPOTrainer
    trainer = PrefrankDPOTrainer(model=model, args=DPOConfig(...), train_dataset=ds, processing_class=tok)

Same datasets, collator, reference handling (a reference model, or precompute_ref_log_probs=True) and
logged metrics as DPOTrainer; only the loss changes: the policy's final hidden states of the
completion tokens go through prefrank's fused linear DPO loss, so the [2B, T, V] logits (and their
log-softmax) never exist. Loss types sigmoid, robust, hinge and ipo with label smoothing; for any
other DPOTrainer feature (other loss types or mixtures, f-divergences, LD-alpha, WPO weighting,
MoE auxiliary losses, a PEFT adapter as its own reference) it defers to DPOTrainer unchanged.
"""
import torch
from trl import DPOTrainer

from prefrank.dpo.loss import fused_linear_dpo_loss
from prefrank.models import CausalLM

FUSED_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


class PrefrankDPOTrainer(DPOTrainer):
    def _fused_applies(self) -> bool:
        return (len(self.loss_types) == 1 and self.loss_types[0] in FUSED_LOSS_TYPES
                and self.f_divergence_type == "reverse_kl" and self.ld_alpha is None and not self.use_weighting
                and not self.aux_loss_enabled and (self.precompute_ref_logps or self.ref_model is not None))

    def _compute_loss(self, model, inputs, return_outputs):
        if not self._fused_applies():
            return super()._compute_loss(model, inputs, return_outputs)
        policy = CausalLM(self.accelerator.unwrap_model(model))
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        # [2B, T]: chosen rows first, right-padded; position t predicts token t + 1
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
        # the decoders run under the trainer's mixed precision, as DPOTrainer's own forwards do
        with self.accelerator.autocast():
            hidden = policy.decoder(**model_inputs).last_hidden_state[:, :-1]
            if self.precompute_ref_logps:
                reference = {"ref_chosen_logps": inputs["ref_chosen_logps"],
                             "ref_rejected_logps": inputs["ref_rejected_logps"]}
            else:
                ref = CausalLM(self.ref_model)
                with torch.no_grad():
                    ref_hidden = ref.decoder(**model_inputs).last_hidden_state[:, :-1]
                reference = {"ref_hidden": ref_hidden, "ref_weight": ref.weight, "ref_bias": ref.bias}
        loss, metrics = fused_linear_dpo_loss(hidden, policy.weight, labels, bias=policy.bias, beta=self.beta,
                                              loss_type=self.loss_types[0], label_smoothing=self.label_smoothing,
                                              softcap=policy.softcap, temperature=policy.temperature, **reference)
        mode = "train" if self.model.training else "eval"
        for name, key in (("rewards/chosen", "rewards_chosen"), ("rewards/rejected", "rewards_rejected"),
                          ("rewards/margins", "reward_margin"), ("rewards/accuracies", "reward_accuracy"),
                          ("logps/chosen", "logps_chosen"), ("logps/rejected", "logps_rejected")):
            self._metrics[mode][name].append(metrics[key])
        return (loss, None) if return_outputs else loss
