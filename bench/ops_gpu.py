"""The log-prob ops on a CUDA GPU, with the machine's measured ceilings in the same run.

  python -m bench.ops_gpu [--rows 8192] [--hidden 4096] [--vocab 128256] [--reps 10]
  python -m bench.ops_gpu --smoke        (tiny shapes on any device: checks the script itself)

Ceilings: a large device-to-device copy (GB/s) and a large bf16 matmul (TFLOP/s).
op 1  logprobs_from_logits on [N, V] bf16 logits: forward as % of the copy bandwidth (it reads the
      logits once), forward + backward; torch log_softmax + gather beside it.
op 2  logprobs_from_hidden [N, d] × [V, d] bf16, a quarter of the rows ignored (prompt tokens):
      forward and forward + backward against torch (matmul, log_softmax, gather) and, when
      installed, Cut Cross-Entropy and Liger's fused linear cross-entropy (per-token, reduction
      "none"); time, extra peak memory, and the achieved matmul rate 2·N_kept·d·V·(1 or 3) / time
      as % of the ceiling. Outputs are compared before timing.
Targets (issue 3): op 1 ≥ 80% of the copy bandwidth; op 2 ≥ 1.5× torch's speed, ≤ 5% of its extra
memory, ≥ 70% of the bf16 matmul rate.
"""
import argparse
import json
import time

import torch

from bench.common import command, cuda_peak_mb, machine, write_result
from prefrank import ops

IGNORE = -100


def timed(fn, reps: int, device) -> float:
    """Median seconds per call (CUDA events on GPU)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def ceilings(device, reps, size_mb=2048, n=8192):
    src = torch.empty(size_mb * 2**20 // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), reps, device)
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    mm = timed(lambda: a @ b, reps, device)
    return {"copy_GBps": 2 * src.nbytes / copy / 1e9, "bf16_matmul_TFLOPs": 2 * n**3 / mm / 1e12}


def op1(N, V, device, reps, ceiling):
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(N, V, generator=g, device=device).to(torch.bfloat16)
    targets = torch.randint(0, V, (N,), generator=g, device=device)
    torch_fwd = lambda: torch.log_softmax(logits.float(), -1).gather(1, targets[:, None])  # noqa: E731
    err = (ops.logprobs_from_logits(logits, targets) - torch_fwd().squeeze(1)).abs().max().item()
    x = logits.clone().requires_grad_()

    def ours_fwd_bwd():
        ops.logprobs_from_logits(x, targets).sum().backward()
        x.grad = None

    def torch_fwd_bwd():
        torch.log_softmax(x.float(), -1).gather(1, targets[:, None]).sum().backward()
        x.grad = None

    out = {"N": N, "V": V, "max_abs_diff_vs_torch": err}
    for name, fn in (("prefrank_fwd", lambda: ops.logprobs_from_logits(logits, targets)), ("torch_fwd", torch_fwd),
                     ("prefrank_fwd_bwd", ours_fwd_bwd), ("torch_fwd_bwd", torch_fwd_bwd)):
        out[name] = {"seconds": timed(fn, reps, device), "extra_peak_mb": cuda_peak_mb(fn)}
    if ceiling:
        out["prefrank_fwd"]["pct_of_copy_bandwidth"] = (
            100 * logits.nbytes / out["prefrank_fwd"]["seconds"] / 1e9 / ceiling["copy_GBps"])
    return out


def op2(N, d, V, device, reps, ceiling):
    g = torch.Generator(device=device).manual_seed(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden = (torch.randn(N, d, generator=g, device=device) * 0.5).to(dtype)
    weight = (torch.randn(V, d, generator=g, device=device) * 0.02).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g, device=device)
    targets[: N // 4] = IGNORE
    kept = int((targets != IGNORE).sum())

    def torch_logprobs(h, w):
        logp = torch.log_softmax((h @ w.T).float(), -1)
        keep = targets != IGNORE
        return torch.where(keep, logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)

    methods = {"prefrank": lambda h, w: ops.logprobs_from_hidden(h, w, targets), "torch": torch_logprobs}
    try:
        from cut_cross_entropy import linear_cross_entropy
        methods["cce"] = lambda h, w: -linear_cross_entropy(h, w, targets, ignore_index=IGNORE, reduction="none")
    except ImportError:
        pass
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="none")
        methods["liger"] = lambda h, w: -liger(w, h, targets)
    except ImportError:
        pass
    reference = torch_logprobs(hidden, weight)
    out = {"N": N, "N_kept": kept, "d": d, "V": V, "dtype": str(dtype)}
    for name, fn in methods.items():
        try:
            diff = (fn(hidden, weight).float() - reference).abs().max().item()
        except Exception as e:  # a peer that does not run here
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

        def fwd_bwd(fn=fn, h=h, w=w):
            fn(h, w).sum().backward()
            h.grad = w.grad = None

        fwd = timed(lambda fn=fn: fn(hidden, weight), reps, device)
        both = timed(fwd_bwd, reps, device)
        out[name] = {"max_abs_diff_vs_torch": diff, "fwd_seconds": fwd, "fwd_bwd_seconds": both,
                     "fwd_extra_peak_mb": cuda_peak_mb(lambda fn=fn: fn(hidden, weight)),
                     "fwd_bwd_extra_peak_mb": cuda_peak_mb(fwd_bwd)}
        if ceiling:
            flops = 2 * kept * d * V
            out[name]["fwd_pct_of_matmul"] = 100 * flops / fwd / 1e12 / ceiling["bf16_matmul_TFLOPs"]
            out[name]["fwd_bwd_pct_of_matmul"] = 100 * 3 * flops / both / 1e12 / ceiling["bf16_matmul_TFLOPs"]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device, to check the script")
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.rows, args.hidden, args.vocab, args.reps = 64, 32, 1000, 2
    elif device.type != "cuda":
        raise SystemExit("bench.ops_gpu needs a CUDA GPU (use --smoke to check the script elsewhere)")
    ceiling = ceilings(device, args.reps) if device.type == "cuda" else None
    result = {"benchmark": "log-prob ops on GPU", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "command": command("ops_gpu", argv), "ceilings": ceiling,
              "op1_logprobs_from_logits": op1(args.rows, args.vocab, device, args.reps, ceiling),
              "op2_logprobs_from_hidden": op2(args.rows, args.hidden, args.vocab, device, args.reps, ceiling)}
    print(json.dumps(result, indent=2))
    if not args.smoke:
        write_result("ops_gpu", result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
