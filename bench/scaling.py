"""How the KV-reuse gain grows with the prompt's share of each pair, against its ideal.

  python -m bench.scaling [--pairs 64] [--length 256] [--reps 2]

Synthetic pairs of random token ids on a random-init 11M-parameter Llama (hidden 384, 6 layers,
vocabulary 512): every pair has prompt P and two completions of C tokens, P + C = --length, and
the prompt share P / (P + C) runs from 0.1 to 0.9. For each share: kv and naive seconds
(alternating, median), their ratio, and the ideal (2P + 2C) / (P + 2C). Writes a JSON and a plot.
"""
import argparse
import time

import torch

from bench.common import alternate, machine, write_result
from prefrank.models import CausalLM
from prefrank.scoring import score
from prefrank.tokenization import Tokenized


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    lm = CausalLM(LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=384, intermediate_size=1024,
                                               num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                                               max_position_embeddings=512)).eval())
    g = torch.Generator().manual_seed(1)
    rows = []
    for share in (0.1, 0.3, 0.5, 0.7, 0.9):
        p = max(1, round(args.length * share))
        c = max(1, args.length - p)
        items = [Tokenized(torch.randint(0, 512, (p,), generator=g).tolist(),
                           [torch.randint(0, 512, (c,), generator=g).tolist() for _ in range(2)])
                 for _ in range(args.pairs)]
        seconds = alternate({"kv": lambda: score(lm, items, method="kv"),
                             "naive": lambda: score(lm, items, method="naive")}, args.reps)
        rows.append({"prompt_share": share, "prompt": p, "completion": c, "seconds": seconds,
                     "speedup": seconds["naive"] / seconds["kv"], "ideal": (2 * p + 2 * c) / (p + 2 * c)})
        print(rows[-1])
    result = {"benchmark": "KV gain vs prompt share (CPU)", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "command": "python -m bench.scaling " + " ".join(argv or []), "model": "random-init Llama 11M",
              "pairs": args.pairs, "length": args.length, "rows": rows}
    path = write_result("scaling_prompt_share", result, args.out_dir)
    from prefrank.analysis.report import _plt
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    shares = [r["prompt_share"] for r in rows]
    ax.plot(shares, [r["ideal"] for r in rows], "k--", label="ideal (2P + 2C) / (P + 2C)")
    ax.plot(shares, [r["speedup"] for r in rows], "o-", label="kv / naive, measured")
    ax.set_xlabel("prompt share P / (P + C)")
    ax.set_ylabel("speed-up over naive")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    plt.close(fig)
    return result


if __name__ == "__main__":
    main()
