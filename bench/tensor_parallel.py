"""Tensor-parallel scoring throughput: the same GPUs as data-parallel single-model ranks (tp 1) and
as tensor-parallel groups of 2, 4, ... up to all of them (several groups: data parallel across
them), random-init Llama shapes in bf16 on HH's lengths.

  python -m bench.tensor_parallel [--gpus 2] [--config llama-3.1-8b] [--pairs 192] [--method packed]
  python -m bench.tensor_parallel --smoke     (a tiny model, 2 gloo processes on the CPU: checks the script)

The model is written once to a temporary folder (save_pretrained), then each layout runs under
torchrun: every process loads it through prefrank.runtime.load_lm (sharded by transformers'
tensor-parallel plan when tp > 1), its group scores its share of the pairs (pair i goes to group
i mod groups, as the scorer shares chunks), and the slowest rank's wall time counts. Reported:
pairs/s and tokens/s of each layout, their ratios to tp 1, peak GPU memory per process (weights
included: what tensor parallelism buys), and the largest relative difference of the pair sums from
tp 1's on the pairs both score (bf16 matmuls split differently).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import command, machine, write_result
from bench.scoring_gpu import make_items, make_model


def worker(args):
    import torch.distributed as dist

    from prefrank.models import LoadOptions
    from prefrank.runtime import layout, load_lm, process_device, shutdown
    from prefrank.scoring import score
    where = layout(args.tp)
    device = process_device("auto", where.world)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm = load_lm(args.model_dir, LoadOptions(), device, dtype, where)
    items = make_items(args.pairs, "hh", lm.vocab_size, args.max_length)
    mine = items[where.group::where.groups]
    score(lm, mine[:4], method=args.method, budget=args.budget)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    start = time.perf_counter()
    logps = score(lm, mine, method=args.method, budget=args.budget).logps
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    if where.rank == 0:
        tokens = sum(len(it.prompt_ids) + sum(map(len, it.completion_ids)) for it in items)
        Path(args.report).write_text(json.dumps({
            "tp": args.tp, "world": where.world, "seconds": seconds.item(), "pairs_per_s": len(items) / seconds.item(),
            "tokens_per_s": tokens / seconds.item(), "peak_mb_per_process": peak,
            "group_0_pairs": list(range(0, len(items), where.groups)),
            "group_0_logps": logps.view(len(mine), -1).tolist()}))  # [pair, completion]
    dist.barrier()  # no rank tears its process group down while another still talks to it
    shutdown()


def run_layout(args, model_dir: str, tp: int, report: Path) -> dict:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.gpus), "--master-addr",
           "127.0.0.1", "--master-port", str(port), "-m", "bench.tensor_parallel", "--worker",
           "--tp", str(tp), "--model-dir", model_dir, "--report", str(report), "--pairs", str(args.pairs),
           "--method", args.method, "--budget", str(args.budget), "--max-length", str(args.max_length)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.smoke else None
    subprocess.run(cmd, check=True, env=env)
    return json.loads(report.read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--config", default="llama-3.1-8b", choices=("llama-3.2-1b", "llama-3.1-8b"))
    parser.add_argument("--pairs", type=int, default=192)
    parser.add_argument("--method", default="packed", choices=("packed", "kv", "naive"))
    parser.add_argument("--budget", type=int, default=16384, help="max padded tokens per forward call")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 2 gloo processes on the CPU")
    parser.add_argument("--out-dir")
    # the torchrun processes' own arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.smoke:
        args.gpus, args.pairs, config, vocab = 2, 24, "smoke", 1000
    elif torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"bench.tensor_parallel needs {args.gpus} CUDA GPUs (use --smoke to check the script)")
    else:
        config, vocab = args.config, 128256
    # tp 1 (a whole model per process), then tensor-parallel groups of 2, 4, ... processes up to all of them
    layouts = [tp for tp in (1, 2, 4, 8, 16) if tp <= args.gpus and args.gpus % tp == 0]
    with tempfile.TemporaryDirectory() as tmp:
        device = "cpu" if args.smoke else "cuda"
        make_model(config, device, torch.float32 if args.smoke else torch.bfloat16, vocab,
                   args.max_length).save_pretrained(tmp)
        runs = {tp: run_layout(args, tmp, tp, Path(tmp) / f"tp{tp}.json") for tp in layouts}
    one = runs[1]
    diffs = {}
    for tp, run in runs.items():  # the pairs group 0 scored under both layouts (tp 1's are a subset)
        by_pair = dict(zip(run["group_0_pairs"], run["group_0_logps"]))
        diffs[f"tp{tp}"] = max(abs(a - b) / max(1.0, abs(b)) for i, row in zip(one["group_0_pairs"], one["group_0_logps"])
                               if i in by_pair for a, b in zip(by_pair[i], row))
    result = {
        "benchmark": f"tensor-parallel scoring, {config}, {args.gpus} devices, {args.method}",
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": command("tensor_parallel", argv),
        "pairs": args.pairs, "budget": args.budget,
        "layouts": {f"tp{tp}": {k: v for k, v in r.items() if not k.startswith("group_0")} for tp, r in runs.items()},
        "throughput_over_tp1": {f"tp{tp}": r["pairs_per_s"] / one["pairs_per_s"] for tp, r in runs.items()},
        "max_rel_diff_vs_tp1": diffs,
    }
    print(json.dumps(result, indent=2))
    if not args.smoke:
        write_result(f"tensor_parallel_{config}_{args.gpus}gpu", result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
