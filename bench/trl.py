"""prefrank inside TRL against TRL's own DPOTrainer (trl 1.16): the reference precompute (time and
peak memory) and the training step (forward + backward), same rows and batches, alternating.

  python -m bench.trl [--pairs 128] [--batches 4] [--reps 3]       CPU: random-init 11M Llama, real HH text
  python -m bench.trl --config llama-3.2-1b --pairs 512 --batches 8 --max-length 2048
                                                   GPU (bf16 autocast): random ids with HH's lengths (hh_lengths.json)

Precompute: DPOTrainer's `_precompute_ref_logps` (its collator's padded batches of
precompute_ref_batch_size pairs, default the training batch of 8, through the model's fused head)
vs PrefrankDPOTrainer's (prefrank's scorer on the same rows, each prompt once, written as a
score table; its cache is removed before each run). Both agree before timing. Memory: the peak
above the start of the run (on a GPU allocated CUDA memory; on CPU resident memory, each path in
two fresh processes after a warm-up run on 8 rows, the larger of the two).
Training step: `trainer.training_step` (forward + backward, no optimizer step) on the same
collated batches with precomputed reference log-probs: TRL's padded chosen + rejected rows vs
prefrank's prefix-shared fused step. Losses agree before timing. The FLOP ideal is
bench.common.flop_ideal of the pairs as TRL trains them (its truncation): TRL's layout (prompt
twice; its fused head at every position on CPU, at the completion tokens on a GPU) over the
least (each prompt once, the head at completion tokens); the target is the measured speedup
≥ 0.9× it.
CPU data: HH helpful-base test pairs (../shared) through TRL's own preparation with stories260K's
tokenizer (512 tokens, the 11M Llama's vocabulary), cut at 512 tokens as TRL cuts them (keep_start).
"""
import argparse
import gzip
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import (
    SHARED,
    alternate,
    command,
    cuda_peak_mb,
    flop_ideal,
    machine,
    peak_rss_since_reset,
    reset_peak_rss,
    write_result,
)

CONFIGS = ("llama-11m", "llama-3.2-1b", "llama-3.1-8b", "smoke")


def make_model(config: str, device):
    if config == "llama-11m":
        from bench.scoring import llama_11m
        return llama_11m().to(device)
    from bench.scoring_gpu import make_model as gpu_model
    return gpu_model(config, device, torch.float32, 128256 if config != "smoke" else 512, 4096)


def hh_rows(n: int) -> list[dict]:
    path = SHARED / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    return [json.loads(line) for line, _ in zip(gzip.open(path, "rt"), range(n))]


def random_rows(n: int, vocab: int, max_length: int) -> list[dict]:
    from bench.scoring_gpu import make_items
    return [{"prompt_ids": it.prompt_ids, "chosen_ids": it.completion_ids[0], "rejected_ids": it.completion_ids[1]}
            for it in make_items(n, "hh", vocab, max_length)]


def trainers(config: str, device, out: Path, batch_size: int, max_length: int, checkpointing: bool):
    """(TRL's DPOTrainer, PrefrankDPOTrainer) with equal models, precompute_ref_log_probs, TRL's
    precision on the device (bf16 autocast on a GPU, fp32 on CPU)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "models" / "stories260K")
    seed_rows = Dataset.from_list(hh_rows(2))  # the trainers' own datasets; the benchmark's rows come after
    out_trainers = []
    for cls in (DPOTrainer, PrefrankDPOTrainer):
        args = DPOConfig(output_dir=str(out / cls.__name__), per_device_train_batch_size=batch_size,
                         max_length=max_length, precompute_ref_log_probs=True, report_to=[], save_strategy="no",
                         use_cpu=device.type == "cpu", bf16=device.type == "cuda", gradient_checkpointing=checkpointing,
                         disable_tqdm=True)
        out_trainers.append(cls(model=make_model(config, device), args=args, train_dataset=seed_rows,
                                processing_class=tokenizer))
    return out_trainers


def bench_rows(args, trl_trainer, ours):
    """The prepared rows (TRL's token ids) the benchmark scores and trains on."""
    from datasets import Dataset
    if args.config == "llama-11m":  # real text through TRL's own preparation
        return trl_trainer._prepare_dataset(Dataset.from_list(hh_rows(args.pairs)), trl_trainer.processing_class,
                                            trl_trainer.args, "bench")
    return Dataset.from_list(random_rows(args.pairs, ours._policy_lm.vocab_size, args.max_length))


def fresh_peak_mb(name: str, argv) -> float:
    """Peak RSS above its start of one precompute by `name`, in a fresh process (this command
    with --memory-of)."""
    import subprocess
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    out = subprocess.run([sys.executable, "-m", "bench.trl", *argv, "--memory-of", name], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def peak_mb(fn, device) -> float:
    if device.type == "cuda":
        return cuda_peak_mb(fn)
    base = reset_peak_rss()
    fn()
    return (peak_rss_since_reset() - base) / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, default="llama-11m")
    parser.add_argument("--pairs", type=int, default=128, help="pairs the precompute scores")
    parser.add_argument("--batches", type=int, default=4, help="training batches timed per repetition")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per training batch (TRL's default)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; off here unless given")
    parser.add_argument("--out-dir", help="where the JSON result goes (default: bench/results)")
    parser.add_argument("--memory-of", choices=["trl", "prefrank"], help=argparse.SUPPRESS)  # one fresh process's peak
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import datasets
    datasets.disable_progress_bars()
    os.environ["TQDM_DISABLE"] = "1"  # TRL's precompute bar

    from prefrank.dpo.trl_reference import collate_pairs
    from prefrank.models import CausalLM
    from prefrank.scoring import packed_rows

    work = Path(tempfile.mkdtemp(prefix="bench-trl-"))
    trl_trainer, ours = trainers(args.config, device, work, args.batch_size, args.max_length,
                                 args.gradient_checkpointing)
    prepared = bench_rows(args, trl_trainer, ours)
    rows = prepared.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()
    cache = Path(ours.args.output_dir) / "prefrank_ref_logps"

    def precompute(trainer, dataset=prepared):
        shutil.rmtree(cache, ignore_errors=True)
        ds = trainer._precompute_ref_logps(dataset, "bench", args.batch_size)
        return torch.tensor([ds["ref_chosen_logps"], ds["ref_rejected_logps"]], dtype=torch.float64)

    if args.memory_of:
        trainer = trl_trainer if args.memory_of == "trl" else ours
        precompute(trainer, prepared.select(range(8)))  # one-time allocations (thread pools, arrow) out of the peak
        print(json.dumps({"peak_mb": peak_mb(lambda: precompute(trainer), device)}))
        return None
    values = {"trl": precompute(trl_trainer), "prefrank": precompute(ours)}
    ref_diff = (values["trl"] - values["prefrank"]).abs().max().item()
    ref_scale = values["trl"].abs().max().item()
    paths = {"trl": lambda: precompute(trl_trainer), "prefrank": lambda: precompute(ours)}
    if device.type == "cuda":
        memory = {name: max(peak_mb(fn, device) for _ in range(2)) for name, fn in paths.items()}
    else:  # RSS: each path in fresh processes, so neither inherits the other's freed memory
        memory = {name: max(fresh_peak_mb(name, argv) for _ in range(2)) for name in paths}
    seconds = alternate(paths, args.reps)

    # training steps on the same batches, with the precomputed reference; both policies moved alike
    # from it, so the loss is not log 2 at every pair
    for tr in (trl_trainer, ours):
        generator = torch.Generator(device).manual_seed(1)
        with torch.no_grad():
            for p in tr.model.parameters():
                p.add_(torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype) * 0.02)
    for k, row in enumerate(rows):
        row["ref_chosen_logps"], row["ref_rejected_logps"] = values["prefrank"][:, k].tolist()
    batches = [ours.data_collator(rows[i:i + args.batch_size])
               for i in range(0, args.batches * args.batch_size, args.batch_size)]
    items = collate_pairs(ours.data_collator, rows[:args.batches * args.batch_size]).items  # as TRL trains them
    # tokens each step pushes through the model: TRL's padded chosen + rejected rows, prefrank's
    # packed rows padded to each batch's longest (when the step runs packed, as on these shapes)
    tokens, methods = {"trl_real": 0, "trl_padded": 0, "prefrank_real": 0, "prefrank_padded": 0}, set()
    for i, batch in enumerate(batches):
        pairs = collate_pairs(ours.data_collator, rows[i * args.batch_size:(i + 1) * args.batch_size]).items
        methods.add(ours._method(pairs))
        lengths = [len(r) for r in packed_rows(pairs)]
        tokens["trl_real"] += int(batch["attention_mask"].sum())
        tokens["trl_padded"] += batch["input_ids"].numel()
        tokens["prefrank_real"] += sum(lengths)
        tokens["prefrank_padded"] += len(lengths) * max(lengths)
    if methods != {"packed"}:
        tokens = None
    losses = {}
    for name, tr in (("trl", trl_trainer), ("prefrank", ours)):
        tr.model.train()
        losses[name] = tr.compute_loss(tr.model, tr._prepare_inputs(batches[0])).item()

    def steps(tr):
        tr.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before its steps
        def run():
            for batch in batches:
                tr.training_step(tr.model, batch)
                tr.model.zero_grad(set_to_none=True)
        return run

    step_paths = {"trl": steps(trl_trainer), "prefrank": steps(ours)}
    step_memory = {name: peak_mb(fn, device) for name, fn in step_paths.items()}
    step_seconds = {name: s / len(batches) for name, s in alternate(step_paths, args.reps).items()}
    lm = CausalLM(ours.model)
    head_everywhere = device.type == "cpu"  # TRL's fused head scores every position on CPU, the labelled ones on GPU
    result = {
        "benchmark": "prefrank inside TRL vs TRL's DPOTrainer: reference precompute and training step",
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": command("trl", argv),
        "config": args.config, "device": str(device), "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "gradient_checkpointing": args.gradient_checkpointing,
        "data": "hh-rlhf helpful-base test, TRL's preparation, stories260K tokenizer" if args.config == "llama-11m"
        else "random ids with hh-rlhf helpful-base test lengths (bench/hh_lengths.json)",
        "pairs": len(rows), "max_length": args.max_length, "batch_size": args.batch_size,
        "batches": len(batches), "reps": args.reps,
        "precompute": {"seconds": seconds, "peak_mb": memory, "speedup": seconds["trl"] / seconds["prefrank"],
                       "memory_ratio": memory["prefrank"] / memory["trl"], "max_abs_diff": ref_diff,
                       "max_abs_value": ref_scale,
                       "flop_ideal": flop_ideal(lm, collate_pairs(ours.data_collator, rows).items, head_everywhere)},
        "train_step": {"seconds": step_seconds, "peak_mb": step_memory, "loss": losses, "methods": sorted(methods),
                       "tokens": tokens,
                       "padded_token_ratio": tokens and tokens["trl_padded"] / tokens["prefrank_padded"],
                       "speedup": step_seconds["trl"] / step_seconds["prefrank"],
                       "flop_ideal": flop_ideal(lm, items, head_everywhere)},
    }
    result["train_step"]["share_of_ideal"] = result["train_step"]["speedup"] / result["train_step"]["flop_ideal"]
    loose = 100 if device.type == "cuda" else 1  # bf16 autocast: rounding of other batch shapes
    assert ref_diff <= 1e-4 * loose * max(ref_scale, 1.0), ref_diff
    assert abs(losses["trl"] - losses["prefrank"]) <= 1e-3 * loose * abs(losses["trl"]) + 1e-4, losses
    path = write_result(f"trl_{device.type}_{args.config}", result, args.out_dir)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    p, t = result["precompute"], result["train_step"]
    print(f"\nprecompute: prefrank {p['seconds']['prefrank']:.2f}s vs TRL {p['seconds']['trl']:.2f}s = "
          f"**{p['speedup']:.2f}×** (target ≥ 2×), peak {p['peak_mb']['prefrank']:.0f} vs {p['peak_mb']['trl']:.0f} MB"
          f"\ntraining step: prefrank {t['seconds']['prefrank']:.3f}s vs TRL {t['seconds']['trl']:.3f}s = "
          f"**{t['speedup']:.2f}×**, FLOP ideal {t['flop_ideal']:.2f}× -> {t['share_of_ideal']:.2f} of it "
          f"(target ≥ 0.9) -> {path}")


if __name__ == "__main__":
    main()
