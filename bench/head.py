"""The fused output head on the CPU against Apple's Cut Cross-Entropy (torch.compile implementation).

  python -m bench.head [--shapes n4096,v128k,n8192] [--reps 3] [--threads N]

prefrank's `logprobs_from_hidden` (hidden [N, d] fp32, weight [V, d], a share of the rows ignored)
against `cut_cross_entropy.linear_cross_entropy(..., impl="torch_compile", reduction="none")` on
the same inputs, forward and forward + backward (an arbitrary per-token upstream gradient; d hidden
and d weight), alternating in one process, and with no peer the plain-torch bound: one GEMM
hidden @ weight.T of the scored rows (forward). CCE's torch.compile path, the one that runs on a
CPU, holds the scored rows' whole logits [n, V] fp32 and keeps them for the backward (3 GEMMs);
prefrank holds one tile and recomputes the logits in the backward (4 GEMMs), so its
forward + backward has a third more GEMM work. Peak memory: the resident set's peak above the
inputs, per call (prefrank's tile, CCE's logits). Results are compared (max abs difference) before
timing.

Shapes (the issue's): n4096 = N 4096 (a quarter ignored), d 1024, V 32000; v128k = N 1024, d 2048,
V 128256 (Llama 3's vocabulary); n8192 = N 8192 (half ignored), d 1024, V 32000. Without
cut-cross-entropy installed only prefrank and the GEMM run.
"""
import argparse
import json
import time

import torch

from bench.common import alternate, command, machine, peak_rss_since_reset, reset_peak_rss, write_result
from prefrank import ops

IGNORE = -100
SHAPES = {"n4096": (4096, 1024, 32000, 0.25), "v128k": (1024, 2048, 128256, 0.0), "n8192": (8192, 1024, 32000, 0.5)}
SMOKE = {"smoke": (300, 32, 5000, 0.25)}  # --shapes smoke: checks the script in seconds (two vocabulary tiles)


def inputs(n, d, v, ignored, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g) / d ** 0.5
    weight = torch.randn(v, d, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[:int(n * ignored)]] = IGNORE
    return hidden, weight, targets, torch.randn(n, generator=g)


def methods(hidden, weight, targets):
    """name → log-probs [N] of the scored rows (0 at ignored rows), differentiable."""
    out = {"prefrank": lambda h, w: ops.logprobs_from_hidden(h, w, targets)}
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return out
    out["cce"] = lambda h, w: -linear_cross_entropy(h, w, targets, ignore_index=IGNORE, reduction="none",
                                                    impl="torch_compile")
    return out


def peak_mb(fn) -> float:
    base = reset_peak_rss()
    fn()
    return (peak_rss_since_reset() - base) / 2**20


def run_shape(name, reps):
    n, d, v, ignored = {**SHAPES, **SMOKE}[name]
    hidden, weight, targets, upstream = inputs(n, d, v, ignored)
    fns = methods(hidden, weight, targets)
    leaves = {k: (hidden.clone().requires_grad_(), weight.clone().requires_grad_()) for k in fns}

    def forward(k):
        with torch.no_grad():
            return fns[k](hidden, weight)

    def both(k):
        h, w = leaves[k]
        h.grad = w.grad = None
        (fns[k](h, w) * upstream).sum().backward()
        return h.grad, w.grad

    results = {k: (forward(k), both(k)) for k in fns}  # also the warm-up (CCE compiles here)
    ref = results["prefrank"]
    diffs = {k: {"logp": (r[0] - ref[0]).abs().max().item(), "d_hidden": (r[1][0] - ref[1][0]).abs().max().item(),
                 "d_weight": (r[1][1] - ref[1][1]).abs().max().item()} for k, r in results.items() if k != "prefrank"}
    del results, ref
    scored = hidden[targets != IGNORE]
    fwd = alternate({**{k: (lambda k=k: forward(k)) for k in fns}, "gemm": lambda: scored @ weight.T}, reps)
    fb = alternate({k: (lambda k=k: both(k)) for k in fns}, reps)
    row = {"shape": {"N": n, "d": d, "V": v, "ignored": ignored}, "max_abs_diff_vs_prefrank": diffs,
           "forward_s": fwd, "forward_backward_s": fb,
           "peak_mb": {k: {"forward": peak_mb(lambda k=k: forward(k)), "forward_backward": peak_mb(lambda k=k: both(k))}
                       for k in fns}}
    if "cce" in fns:
        row["ratio_to_cce"] = {"forward": fwd["prefrank"] / fwd["cce"], "forward_backward": fb["prefrank"] / fb["cce"]}
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma-separated, of {', '.join([*SHAPES, *SMOKE])}")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: its own): 1 where other "
                        "work shares the cores, so that no parallel region waits for a descheduled thread")
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)
    shapes = args.shapes.split(",")
    unknown = sorted(set(shapes) - set(SHAPES) - set(SMOKE))
    if unknown:
        parser.error(f"--shapes: unknown {', '.join(unknown)}; choose from {', '.join([*SHAPES, *SMOKE])}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {}
    for name in shapes:
        rows[name] = row = run_shape(name, args.reps)
        print(name, json.dumps({k: row[k] for k in ("forward_s", "forward_backward_s", "peak_mb")}
                               | ({"ratio_to_cce": row["ratio_to_cce"]} if "ratio_to_cce" in row else {})), flush=True)
    result = {"benchmark": "fused head vs CCE (CPU)", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "command": command("head", argv), "dtype": "float32", "shapes": rows}
    write_result("head_cpu", result, args.out_dir)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
