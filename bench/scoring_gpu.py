"""End-to-end scoring on a CUDA GPU: random-init models with real shapes, in bf16, on HH's
length distribution, every path users would pick, same answers checked before timing.

  python -m bench.scoring_gpu [--config llama-3.2-1b] [--mix hh] [--pairs 512] [--reps 3]
  python -m bench.scoring_gpu --smoke      (a tiny model on any device: checks the script itself)

Paths: prefrank's kv method (prompt once, cache reused, log-probs from hidden states) and packed
method (prompt and completions in one row under a block mask, log-probs from hidden states); naive
Hugging Face (prompt + completion per side, full logits, log_softmax, gather; length-bucketed, the
strongest simple baseline); TRL-style (pairs in input order, chosen and rejected concatenated,
full logits, TRL's selective_log_softmax when trl is installed); and, when installed, Liger's
fused linear cross-entropy and Cut Cross-Entropy as per-token log-prob heads (reduction "none",
prompt positions ignored) on the naive layout. Throughput does not depend on weight values, so
the weights are random; token ids are random too.

Lengths: bench/hh_lengths.json holds the characters of each helpful-base test pair's prompt,
chosen and rejected completion (Anthropic HH); tokens = ceil(chars / 4), about Llama 3's rate on
English. Mixes: hh as is, prompt-heavy (prompts × 4) and completion-heavy (completions × 4),
each capped at --max-length. Reported: prompts/s, tokens/s (the prompt counted K times, as the
naive layout computes it), peak memory above the weights, ratios in one run (methods alternate).
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch

from bench.common import alternate, command, cuda_peak_mb, flop_ideal, machine, write_result
from bench.scoring import trl_style
from prefrank.models import CausalLM
from prefrank.ops import IGNORE_INDEX
from prefrank.scoring import score, score_naive
from prefrank.tokenization import Tokenized

LENGTHS = Path(__file__).parent / "hh_lengths.json"
CONFIGS = {  # Llama 3 shapes (vocabulary 128256, grouped-query attention)
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=False),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True),
}
MIXES = {"hh": (1, 1), "prompt-heavy": (4, 1), "completion-heavy": (1, 4)}  # (prompt, completion) scale


def make_model(config: str, device, dtype, vocab: int, max_length: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=max_length, rope_theta=500000.0,
                      **CONFIGS[config])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def write_lengths(path: Path = LENGTHS):
    """Regenerate bench/hh_lengths.json from ../shared's HH helpful-base test split."""
    import gzip

    from bench.common import SHARED
    from prefrank.data import Columns, to_example
    lengths = []
    for i, line in enumerate(gzip.open(SHARED / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz", "rt")):
        ex = to_example(i, json.loads(line), Columns())
        if ex.error is None:
            lengths.append([len(ex.prompt)] + [len(c) for c in ex.completions])
    path.write_text(json.dumps({"source": "Anthropic/hh-rlhf helpful-base test: characters of prompt, chosen, "
                                          "rejected (python -m bench.scoring_gpu --write-lengths)",
                                "lengths": lengths}, separators=(",", ":")) + "\n")


def make_items(pairs: int, mix: str, vocab: int, max_length: int, seed: int = 0) -> list[Tokenized]:
    """`pairs` pairs with HH's lengths scaled by the mix; random token ids."""
    prompt_scale, completion_scale = MIXES[mix]
    g = torch.Generator().manual_seed(seed)
    items = []
    for p_chars, c_chars, r_chars in json.loads(LENGTHS.read_text())["lengths"]:
        p = math.ceil(p_chars / 4) * prompt_scale
        c, r = (max(1, math.ceil(x / 4) * completion_scale) for x in (c_chars, r_chars))
        if p + max(c, r) > max_length:
            continue
        ids = torch.randint(5, vocab, (p + c + r,), generator=g).tolist()
        items.append(Tokenized(ids[:p], [ids[p:p + c], ids[p + c:]]))
        if len(items) == pairs:
            break
    return items


def hidden_head_logprobs(name: str):
    """A peer's fused linear cross-entropy as the per-token step of score_naive: log-probs =
    minus its per-token loss (reduction "none"), prompt positions ignored; None if not installed."""
    if name == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return None
        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none")
        per_token = lambda h, w, t: loss(w, h, t)  # noqa: E731
    else:
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError:
            return None
        per_token = lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX, reduction="none")  # noqa: E731

    def token_logprobs(lm, ids, mask, targets):
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        hidden = lm.hidden(ids, mask, positions)[:, :-1]
        return -per_token(hidden.flatten(0, 1), lm.weight, targets.flatten()).float().view(targets.shape)

    return token_logprobs


def profile(paths: dict, names: tuple, rows: int = 15) -> dict:
    """torch.profiler's table of the top ops by device time (CPU time without a GPU), one run each."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    tables = {}
    for name in names:
        with torch_profile(activities=activities) as prof:
            paths[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        tables[name] = prof.key_averages().table(sort_by=key, row_limit=rows)
        print(f"== profile: {name}\n{tables[name]}")
    return tables


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=[c for c in CONFIGS if c != "smoke"], default="llama-3.2-1b")
    parser.add_argument("--mix", choices=sorted(MIXES), default="hh")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget", type=int, default=16384, help="max padded tokens per forward call, every path")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on any device, to check the script")
    parser.add_argument("--profile", action="store_true", help="print the top ops of one kv and one packed run")
    parser.add_argument("--compile", action="store_true",
                        help="also time packed and naive with torch.compile'd blocks (CausalLM.compile_blocks)")
    parser.add_argument("--write-lengths", action="store_true", help="regenerate bench/hh_lengths.json from ../shared")
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)
    if args.write_lengths:
        return write_lengths()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.smoke and device.type != "cuda":
        raise SystemExit("bench.scoring_gpu needs a CUDA GPU (use --smoke to check the script elsewhere)")
    config, vocab, dtype = args.config, 128256, torch.bfloat16
    if args.smoke:
        config, vocab, args.pairs, args.reps = "smoke", 1000, 24, 1
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm = CausalLM(make_model(config, device, dtype, vocab, args.max_length))
    items = make_items(args.pairs, args.mix, vocab, args.max_length)
    prompt = sum(len(it.prompt_ids) for it in items)
    completions = sum(len(c) for it in items for c in it.completion_ids)
    naive_tokens = 2 * prompt + completions

    paths = {"kv": lambda: score(lm, items, method="kv", budget=args.budget).logps,
             "packed": lambda: score(lm, items, method="packed", budget=args.budget).logps,
             "naive": lambda: score(lm, items, method="naive", budget=args.budget).logps,
             "trl_style": lambda: trl_style(lm, items).cpu()}
    if args.compile:
        def compiled(method):
            def run():
                lm.compile_blocks()
                try:
                    return score(lm, items, method=method, budget=args.budget).logps
                finally:
                    lm.compile_blocks(False)
            return run
        paths.update(packed_compiled=compiled("packed"), naive_compiled=compiled("naive"))
    for peer in ("liger", "cce"):
        step = hidden_head_logprobs(peer)
        if step is not None:
            paths[peer] = lambda step=step: score_naive(lm, items, args.budget, token_logprobs=step).logps
    # Same answers first: sums of ~100 bf16 token log-probs, compared relative to their size.
    reference = paths["naive"]()
    agreement, skipped = {}, {}
    for name, fn in paths.items():
        try:
            got = fn()
        except Exception as e:  # a peer that does not run here is reported, not timed
            skipped[name] = f"{type(e).__name__}: {e}"
            continue
        agreement[name] = ((got - reference).abs() / reference.abs().clamp(min=1)).max().item()
        assert agreement[name] < 2e-2, f"{name} disagrees with naive by {agreement[name]:.3g} (relative)"
    paths = {name: fn for name, fn in paths.items() if name not in skipped}
    memory = {name: cuda_peak_mb(fn) for name, fn in paths.items()}
    if args.profile:
        profile(paths, ("kv", "packed", "naive"))
    seconds = alternate(paths, args.reps)
    prefrank_paths = [m for m in ("kv", "packed", "packed_compiled") if m in seconds]
    ours = min(prefrank_paths, key=seconds.get)
    others = {m: s for m, s in seconds.items() if m not in prefrank_paths}
    best_other = min(others, key=others.get)
    result = {
        "benchmark": f"scoring end to end on GPU, {config}, {args.mix} mix", "date": time.strftime("%Y-%m-%d"),
        "machine": machine(), "command": command("scoring_gpu", argv),
        "config": config, "dtype": str(dtype), "mix": args.mix, "pairs": len(items), "budget": args.budget,
        "reps": args.reps, "lengths": "HH helpful-base test, tokens = ceil(chars / 4), scaled by the mix",
        "tokens": {"prompt": prompt, "completions": completions, "naive_layout": naive_tokens},
        "ideal_ratio": naive_tokens / (prompt + completions),
        "flop_ideal_ratio": flop_ideal(lm, items),
        "max_rel_diff_vs_naive": agreement, "skipped": skipped,
        "seconds": seconds, "peak_mb_above_weights": memory,
        "pairs_per_s": {m: len(items) / s for m, s in seconds.items()},
        "tokens_per_s": {m: naive_tokens / s for m, s in seconds.items()},
        "speedup_over_naive": {m: seconds["naive"] / seconds[m] for m in prefrank_paths},
        "faster_prefrank_method": ours, "best_other": best_other,
        "speedup_prefrank_over_best_other": others[best_other] / seconds[ours],
        "memory_over_naive": {m: memory[m] / memory["naive"] for m in prefrank_paths} if memory["naive"] else None,
    }
    print(json.dumps(result, indent=2))
    if not args.smoke:
        write_result(f"scoring_gpu_{config}_{args.mix}", result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
