"""Runs for tests/test_trl.py that need their own processes (torchrun ranks, a precompute to kill).

  python -m torch.distributed.run --nproc-per-node 2 tests/trl_worker.py ddp OUT
      each rank trains PrefrankDPOTrainer (float64, 3 steps) in two configurations and saves its
      parameters and reference log-probs to OUT/NAME-rankR.pt
  python tests/trl_worker.py precompute OUT MODEL
      precomputes reference log-probs of 600 pairs with 2-row parts into OUT (to be killed)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# the two configurations of the DDP test: (name, per-device batch, gradient accumulation, precompute,
# gradient checkpointing: without it DDP looks for unused parameters); each makes a global batch of
# 8 pairs on 2 ranks
DDP_CONFIGS = [("plain", 4, 1, True, True), ("accumulate", 2, 2, False, False)]


def pair_rows(n: int, seed: int):
    from prefrank.demo.task import make_pairs
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_pairs(n, seed=seed)]


def train(out: str, per_device: int, grad_accum: int, precompute: bool, checkpointing: bool, steps: int = 3):
    """PrefrankDPOTrainer on a float64 tiny Llama from a fixed start; returns (parameters, the
    train dataset's reference log-probs or None, the loss per step)."""
    from datasets import Dataset
    from trl import DPOConfig

    from prefrank.demo.default import build_tokenizer
    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer
    from tiny_models import tiny_model

    model, ref = tiny_model("llama").double(), tiny_model("llama", seed=1).double()
    args = DPOConfig(output_dir=out, per_device_train_batch_size=per_device, gradient_accumulation_steps=grad_accum,
                     max_steps=steps, learning_rate=1e-3, beta=0.5, precompute_ref_log_probs=precompute, report_to=[],
                     use_cpu=True, save_strategy="no", logging_steps=1, bf16=False, seed=7,
                     gradient_checkpointing=checkpointing)
    trainer = PrefrankDPOTrainer(model=model, ref_model=None if precompute else ref, args=args,
                                 train_dataset=Dataset.from_list(pair_rows(48, seed=5)),
                                 processing_class=build_tokenizer())
    ref_logps = (torch.tensor([trainer.train_dataset["ref_chosen_logps"], trainer.train_dataset["ref_rejected_logps"]],
                              dtype=torch.float64) if precompute else None)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {n: p.detach().clone() for n, p in model.named_parameters()}, ref_logps, losses


def main(argv):
    mode, out = argv[0], Path(argv[1])
    if mode == "ddp":
        from prefrank.dpo import trl_reference
        trl_reference.CHUNK_ROWS = 5  # several chunks per rank
        import torch.distributed as dist
        for name, *options in DDP_CONFIGS:
            params, ref_logps, losses = train(str(out / name), *options)
            torch.save({"params": params, "ref_logps": ref_logps, "losses": losses},
                       out / f"{name}-rank{dist.get_rank()}.pt")
    elif mode == "precompute":
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig

        from prefrank.dpo import trl_reference
        from prefrank.dpo.trl_trainer import PrefrankDPOTrainer
        trl_reference.CHUNK_ROWS = 2
        model_dir = argv[2]
        args = DPOConfig(output_dir=str(out), precompute_ref_log_probs=True, report_to=[], use_cpu=True, bf16=False)
        PrefrankDPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                           train_dataset=Dataset.from_list(pair_rows(600, seed=11)),
                           processing_class=AutoTokenizer.from_pretrained(model_dir))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
