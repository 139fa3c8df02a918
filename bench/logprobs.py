"""Per-token log-probs from logits: prefrank's fused op vs torch's log_softmax + gather.

  python -m bench.logprobs [--rows 4096] [--vocab 32000] [--reps 7]

CPU: the C++ extension (OpenMP, vectorized) on 1 and all threads against torch on as many threads.
Both read the same fp32 logits; results are compared (max abs difference) before timing.
"""
import argparse
import json
import time

import torch

from bench.common import alternate, command, machine, write_result
from prefrank import ops


def torch_logprobs(logits, targets):
    return torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, generator=g) * 3
    targets = torch.randint(0, args.vocab, (args.rows,), generator=g)
    diff = (ops.logprobs_from_logits(logits, targets) - torch_logprobs(logits, targets)).abs().max().item()
    threads = torch.get_num_threads()
    runs = {}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        seconds = alternate({"torch": lambda: torch_logprobs(logits, targets),
                             "cpp": lambda: ops.logprobs_from_logits(logits, targets, num_threads=n)}, args.reps)
        runs[n] = {"seconds": seconds, "speedup": seconds["torch"] / seconds["cpp"],
                   "cpp_GBps": logits.nbytes / seconds["cpp"] / 1e9}
        print(f"{n} thread(s): torch {seconds['torch'] * 1e3:.1f} ms, cpp {seconds['cpp'] * 1e3:.1f} ms, "
              f"{runs[n]['speedup']:.2f}x, cpp reads {runs[n]['cpp_GBps']:.1f} GB/s")
    torch.set_num_threads(threads)
    result = {"benchmark": "logprobs_from_logits CPU", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "command": command("logprobs", argv), "rows": args.rows, "vocab": args.vocab,
              "dtype": "float32", "max_abs_diff": diff, "threads": runs}
    write_result("logprobs_cpu", result, args.out_dir)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
