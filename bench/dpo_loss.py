"""Fused DPO loss, forward + backward, on the CPU: prefrank vs naive torch vs Liger's
LigerFusedLinearDPOLoss (torch path, compiled=False) when installed.

  python -m bench.dpo_loss [--vocab 32000,128256] [--reps 3]

Shapes: B pairs of chosen + rejected rows of T tokens ([2B, T, d], chosen rows first, the TRL /
Liger layout), the first quarter of each row prompt tokens (ignore_index), d = 1024, fp32.
Each method runs in a fresh process: median seconds of `reps` forward + backward passes, and
peak RSS during them above the RSS once the inputs exist (the peak is reset through
/proc/self/clear_refs after the set-up). Methods:
  naive          full logits, log_softmax, gather, sums, DPO loss, autograd
  prefrank       fused_linear_dpo_loss with precomputed reference log-probs (how it is meant to be used)
  prefrank_compiled  the same step under torch.compile(fullgraph=True) (inductor); its first call, the
                 compilation, is timed apart ("compile_seconds") and left out of the median
  prefrank_refh  the same, the reference given as hidden states + weight (what Liger needs)
  liger          LigerFusedLinearDPOLoss(use_ref_model=True, compiled=False), reference hidden states
All methods' losses are compared before timing.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from bench.common import command, machine, peak_rss_since_reset, reset_peak_rss, write_result

D, IGNORE = 1024, -100


def inputs(vocab: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = 256
    B = tokens // (2 * T)
    hidden = torch.randn(2 * B, T, D, generator=g)
    ref_hidden = hidden + 0.1 * torch.randn(2 * B, T, D, generator=g)
    weight = torch.randn(vocab, D, generator=g) * 0.02
    targets = torch.randint(0, vocab, (2 * B, T), generator=g)
    targets[:, : T // 4] = IGNORE
    return hidden, ref_hidden, weight, targets


def ref_logps(ref_hidden, weight, targets):
    from prefrank import ops
    with torch.no_grad():
        token = ops.logprobs_from_hidden(ref_hidden.reshape(-1, D), weight, targets.reshape(-1))
    sums = token.view(targets.shape).double().sum(1)
    half = targets.shape[0] // 2
    return sums[:half], sums[half:]


def naive(hidden, weight, targets, ref_chosen, ref_rejected, beta=0.1):
    logits = hidden @ weight.T
    logp = torch.log_softmax(logits.float(), -1)
    keep = targets != IGNORE
    token = torch.where(keep, logp.gather(2, targets.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    sums = token.sum(1)
    half = targets.shape[0] // 2
    z = (sums[:half] - sums[half:]) - (ref_chosen - ref_rejected).float()
    return -torch.nn.functional.logsigmoid(beta * z).mean()


def run_method(method: str, vocab: int, tokens: int, reps: int):
    hidden, ref_hidden, weight, targets = inputs(vocab, tokens)
    ref_chosen, ref_rejected = ref_logps(ref_hidden, weight, targets)
    h = hidden.requires_grad_()
    w = weight.requires_grad_()
    if method == "naive":
        step = lambda: naive(h, w, targets, ref_chosen, ref_rejected)  # noqa: E731
    elif method == "prefrank":
        from prefrank.dpo import fused_linear_dpo_loss
        step = lambda: fused_linear_dpo_loss(h, w, targets, ref_chosen_logps=ref_chosen,  # noqa: E731
                                             ref_rejected_logps=ref_rejected, return_metrics=False)
    elif method == "prefrank_compiled":
        from prefrank.dpo import fused_linear_dpo_loss
        compiled = torch.compile(lambda h, w: fused_linear_dpo_loss(h, w, targets, ref_chosen_logps=ref_chosen,
                                                                    ref_rejected_logps=ref_rejected,
                                                                    return_metrics=False), fullgraph=True)
        start = time.perf_counter()
        compiled(h, w).backward()
        compile_seconds = time.perf_counter() - start
        step = lambda: compiled(h, w)  # noqa: E731
    elif method == "prefrank_refh":
        from prefrank.dpo import fused_linear_dpo_loss
        step = lambda: fused_linear_dpo_loss(h, w, targets, ref_hidden=ref_hidden, ref_weight=weight.detach(),  # noqa: E731
                                             return_metrics=False)
    elif method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        liger = LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=0.1, compiled=False, use_ref_model=True)
        step = lambda: liger(w, h, targets, ref_input=ref_hidden, ref_weight=weight.detach())[0]  # noqa: E731
    else:
        raise ValueError(method)
    base = reset_peak_rss()
    times, loss = [], None
    for _ in range(reps):
        h.grad = w.grad = None
        start = time.perf_counter()
        loss = step()
        loss.backward()
        times.append(time.perf_counter() - start)
    result = {"method": method, "vocab": vocab, "tokens": tokens, "seconds": statistics.median(times),
              "extra_peak_mb": (peak_rss_since_reset() - base) / 2**20, "loss": loss.item()}
    if method == "prefrank_compiled":
        result["compile_seconds"] = compile_seconds
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", default="32000,128256")
    parser.add_argument("--tokens", default="4096,2048", help="2B·T per vocabulary size")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", default="naive,prefrank,prefrank_compiled,prefrank_refh,liger")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)
    if args.child:
        method, vocab, tokens = args.child
        print(json.dumps(run_method(method, int(vocab), int(tokens), args.reps)))
        return
    methods = args.methods.split(",")
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        methods = [m for m in methods if m != "liger"]
        print("liger-kernel is not installed: skipping it", file=sys.stderr)
    runs = []
    for vocab, tokens in zip(map(int, args.vocab.split(",")), map(int, args.tokens.split(","))):
        for method in methods:
            out = subprocess.run([sys.executable, "-m", "bench.dpo_loss", "--reps", str(args.reps), "--child", method,
                                  str(vocab), str(tokens)], capture_output=True, text=True)
            if out.returncode:
                print(f"{method} V={vocab} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(runs[-1], file=sys.stderr)
        losses = [r["loss"] for r in runs if r["vocab"] == vocab]
        assert max(losses) - min(losses) < 1e-3 * max(1.0, abs(losses[0])), f"losses disagree: {losses}"
    result = {"benchmark": "fused DPO loss fwd+bwd (CPU)", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "command": command("dpo_loss", argv), "d": D, "runs": runs}
    write_result("dpo_loss_cpu", result, args.out_dir)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
