"""How scoring time and memory grow with the prompt's share, the vocabulary and the sequence
length, for each method (CPU).

  python -m bench.scaling [--pairs 64] [--length 256] [--reps 2]

Synthetic pairs of random token ids on a random-init Llama (hidden 384, 6 layers): every pair has
a prompt of P tokens and two completions of C tokens. Three sweeps, methods alternating (median
seconds) and each method's peak memory above the start of its run (resident set, one run):
  prompt share  P / (P + C) from 0.1 to 0.9 at P + C = --length, vocabulary 512; the speed-ups of
                packed and kv over naive against the ideal (2P + 2C) / (P + 2C)
  vocabulary    512 to 131072 at P = C = --length / 2 (the full logits grow with it, the rest not)
  length        P + C from 128 to 1024 at share 0.5, vocabulary 512, --pairs × --length tokens each
Writes a JSON and a three-panel plot.
"""
import argparse
import time

import torch

from bench.common import alternate, command, machine, peak_rss_since_reset, reset_peak_rss, write_result
from prefrank.models import CausalLM
from prefrank.scoring import score
from prefrank.tokenization import Tokenized

METHODS = ("packed", "kv", "naive")


def make_lm(vocab: int, max_positions: int = 1024) -> CausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return CausalLM(LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=384, intermediate_size=1024,
                                                 num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                                                 max_position_embeddings=max_positions)).eval())


def measure(lm, pairs: int, p: int, c: int, reps: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    items = [Tokenized(torch.randint(0, lm.vocab_size, (p,), generator=g).tolist(),
                       [torch.randint(0, lm.vocab_size, (c,), generator=g).tolist() for _ in range(2)])
             for _ in range(pairs)]
    runs = {m: (lambda m=m: score(lm, items, method=m)) for m in METHODS}
    peak_mb = {}
    for m, fn in runs.items():
        base = reset_peak_rss()
        fn()
        peak_mb[m] = (peak_rss_since_reset() - base) / 2**20
    seconds = alternate(runs, reps)
    row = {"prompt": p, "completion": c, "vocab": lm.vocab_size, "seconds": seconds, "peak_mb": peak_mb,
           "speedup": {m: seconds["naive"] / seconds[m] for m in ("packed", "kv")},
           "ideal": (2 * p + 2 * c) / (p + 2 * c)}
    print(row, flush=True)
    return row


def plot(result: dict, path):
    from prefrank.analysis.report import pyplot
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    share = result["prompt_share"]
    x = [r["prompt"] / (r["prompt"] + r["completion"]) for r in share]
    axes[0].plot(x, [r["ideal"] for r in share], "k--", label="ideal (2P + 2C) / (P + 2C)")
    for m in ("packed", "kv"):
        axes[0].plot(x, [r["speedup"][m] for r in share], "o-", label=f"{m} / naive")
    axes[0].set(xlabel="prompt share P / (P + C)", ylabel="speed-up over naive", title="prompt share")
    for ax, key, rows, xlabel in ((axes[1], "vocab", result["vocab_sweep"], "vocabulary size"),
                                  (axes[2], "length", result["length_sweep"], "sequence length P + C")):
        xs = [r["vocab"] if key == "vocab" else r["prompt"] + r["completion"] for r in rows]
        for m in METHODS:
            ax.plot(xs, [r["seconds"][m] for r in rows], "o-", label=f"{m} time")
        ax.set(xlabel=xlabel, ylabel="seconds", xscale="log", title=key)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        mem = ax.twinx()
        for m in METHODS:
            mem.plot(xs, [r["peak_mb"][m] for r in rows], ":", label=f"{m} peak MiB")
        mem.set_ylabel("peak memory above start (MiB, dotted)")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--vocabs", default="512,8192,32768,131072")
    parser.add_argument("--lengths", default="128,256,512,1024")
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)
    lm = make_lm(512)
    shares = [measure(lm, args.pairs, max(1, round(args.length * s)), max(1, args.length - round(args.length * s)),
                      args.reps, seed=1) for s in (0.1, 0.3, 0.5, 0.7, 0.9)]
    half = args.length // 2
    vocabs = [measure(make_lm(v), args.pairs, half, half, args.reps, seed=2) for v in map(int, args.vocabs.split(","))]
    lengths = [measure(lm, max(1, args.pairs * args.length // n), n // 2, n // 2, args.reps, seed=3)
               for n in map(int, args.lengths.split(","))]
    result = {"benchmark": "scoring scaling: prompt share, vocabulary, length (CPU)", "date": time.strftime("%Y-%m-%d"),
              "machine": machine(), "command": command("scaling", argv),
              "model": "random-init Llama, hidden 384, 6 layers", "pairs": args.pairs, "length": args.length,
              "prompt_share": shares, "vocab_sweep": vocabs, "length_sweep": lengths}
    path = write_result("scaling", result, args.out_dir)
    plot(result, path.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
