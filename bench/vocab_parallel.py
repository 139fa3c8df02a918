"""The output head under tensor parallelism on the CPU, 2 gloo processes: vocabulary-parallel vs gathered.

  python -m bench.vocab_parallel [--vocab 128256] [--dim 1024] [--tokens 256] [--reps 1]

Each process holds its Shard(0) rows of an fp32 head weight [V, d] as a DTensor (as transformers'
tensor-parallel plans leave lm_head; built from its own rows only) and the same hidden states [N, d]
and targets (replicated, as tensor parallelism leaves the decoder's output). A step is
ops.logprobs_from_hidden forward + backward (of the log-probs' sum), the gradients of hidden and
of the weight shard included:
  gathered        the weight gathered for the op (ops/sharded.py): what `prefrank score --tp` did
                  before (it gathered once at load, holding V × d for the whole run)
  vocab_parallel  vocab_parallel=True (ops/vocab_parallel.py): each process its shard's logits
Each method runs in a fresh torchrun: per process, the peak RSS during `reps` steps above the RSS
once the inputs exist (reset through /proc/self/clear_refs), the median step time (the slower
process's), and the log-probs' largest difference between the two methods. The weight alone is
V·d·4 bytes (fp32); at Llama 3 70B (V = 128256, d = 8192, bf16) V·d·2 = 2.1 GB, of which the
vocabulary-parallel head saves (1 - 1/tp) per process against the gathered one.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import command, machine, peak_rss_since_reset, reset_peak_rss, write_result

METHODS = ("gathered", "vocab_parallel")


def worker(args):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from prefrank.ops import logprobs_from_hidden
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = -(-args.vocab // world)  # torch's Shard(0): ceil(V / world) rows per rank
    rows = max(0, min(args.vocab, (rank + 1) * per_rank) - rank * per_rank)
    local = torch.randn(rows, args.dim, generator=torch.Generator().manual_seed(rank)) * 0.02
    weight = torch.nn.Parameter(DTensor.from_local(local, init_device_mesh("cpu", (world,)), [Shard(0)],
                                                   run_check=False, shape=(args.vocab, args.dim), stride=(args.dim, 1)))
    g = torch.Generator().manual_seed(100)
    hidden = torch.randn(args.tokens, args.dim, generator=g).requires_grad_(True)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)

    def step():
        hidden.grad = weight.grad = None
        logp = logprobs_from_hidden(hidden, weight, targets, vocab_parallel=args.method == "vocab_parallel")
        logp.sum().backward()
        return logp.detach()

    step()  # warm-up
    hidden.grad = weight.grad = None
    base = reset_peak_rss()
    seconds = []
    for _ in range(args.reps):
        dist.barrier()
        start = time.perf_counter()
        logp = step()
        took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(took, dist.ReduceOp.MAX)
        seconds.append(took.item())
    peaks = [None] * world
    dist.all_gather_object(peaks, (peak_rss_since_reset() - base) / 2**20)
    if rank == 0:
        Path(args.report).write_text(json.dumps({"seconds": statistics.median(seconds), "peak_mb_per_process": peaks,
                                                 "logp": logp.tolist()}))
    dist.barrier()
    dist.destroy_process_group()


def run_method(args, method: str, report: Path) -> dict:
    import socket
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "bench.vocab_parallel", "--worker", "--method", method,
           "--report", str(report), "--vocab", str(args.vocab), "--dim", str(args.dim), "--tokens", str(args.tokens),
           "--reps", str(args.reps)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(report.read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--out-dir")
    # the torchrun processes' own arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {m: run_method(args, m, Path(tmp) / f"{m}.json") for m in METHODS}
    a, b = (torch.tensor(runs[m].pop("logp")) for m in METHODS)
    result = {
        "benchmark": f"output head under tensor parallelism, 2 gloo processes, V={args.vocab}, d={args.dim}, "
                     f"{args.tokens} tokens, fp32, forward + backward",
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": command("vocab_parallel", argv),
        "methods": runs, "weight_mb": args.vocab * args.dim * 4 / 2**20,
        "max_abs_diff_logp": float((a - b).abs().max()),
        "llama3_70b_bf16_saved_mb_per_process_tp2": 128256 * 8192 * 2 * (1 - 1 / 2) / 2**20,
    }
    print(json.dumps(result, indent=2))
    write_result("vocab_parallel", result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
