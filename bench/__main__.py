"""prefrank's benchmarks, one command per machine:

  python -m bench --suite cpu    scoring (packed and kv vs naive vs TRL-style, K = 2 and 4, stories260K
                                 and an 11M Llama), scaling with prompt share, vocabulary and length,
                                 C++ log-probs, the fused head vs CCE, fused DPO loss vs naive and Liger, the
                                 vocabulary-parallel vs the gathered head (2 gloo processes), streaming
                                 memory, analysis memory,
                                 grouping votes into pairs (memory, speed), model fingerprints vs sha256,
                                 --deterministic vs the default mode (drift, whole-process time),
                                 PrefrankDPOTrainer vs TRL's DPOTrainer (needs ../shared)
  python -m bench --suite gpu    the log-prob ops on a CUDA GPU with the machine's ceilings, and scoring end
                                 to end (random-init Llama 3.2 1B and 3.1 8B shapes, bf16, HH lengths:
                                 as is, prompt-heavy, completion-heavy) against naive (eager and with
                                 compiled blocks), TRL-style, Liger, CCE; PrefrankDPOTrainer vs TRL's
                                 DPOTrainer (1B shapes)
  python -m bench --suite multi-gpu   tensor-parallel scoring (Llama 3.1 8B shapes) on 2 GPUs as one
                                 tensor-parallel group vs two single-model ranks

Each benchmark writes its JSON into bench/results/ (or --out-dir); bench/RESULTS.md records the
figures with their command, machine and date. Every module also runs alone: python -m bench.NAME.
"""
import argparse
import importlib
import sys

SUITES = {
    "cpu": [("scoring", ["--pairs", "600", "--k", "2", "--reps", "5"]),
            ("scoring", ["--pairs", "600", "--k", "4", "--reps", "5"]),
            ("logprobs", []),
            ("head", ["--reps", "3"]),
            ("dpo_loss", []),
            ("vocab_parallel", []),
            ("scoring", ["--model", "llama-11m", "--pairs", "150", "--k", "2", "--reps", "3"]),
            ("scaling", ["--pairs", "32"]),
            ("streaming", ["--sizes", "10000,100000"]),
            ("analysis", ["--sizes", "100000,1000000"]),
            ("grouping", ["--mb", "300"]),
            ("fingerprint", []),
            ("deterministic", ["--pairs", "120", "--reps", "3"]),
            ("trl", ["--pairs", "128", "--batches", "4", "--reps", "3"])],
    "gpu": [("ops_gpu", []),
            ("scoring_gpu", ["--config", "llama-3.2-1b", "--mix", "hh", "--pairs", "512", "--compile"]),
            ("deterministic", ["--pairs", "120", "--reps", "3", "--device", "cuda"]),
            ("scoring_gpu", ["--config", "llama-3.2-1b", "--mix", "prompt-heavy", "--pairs", "128", "--compile"]),
            ("scoring_gpu", ["--config", "llama-3.2-1b", "--mix", "completion-heavy", "--pairs", "256", "--compile"]),
            ("scoring_gpu", ["--config", "llama-3.1-8b", "--mix", "hh", "--pairs", "192", "--reps", "2", "--compile"]),
            ("trl", ["--config", "llama-3.2-1b", "--pairs", "512", "--batches", "8", "--max-length", "2048"])],
    "multi-gpu": [("tensor_parallel", ["--gpus", "2", "--config", "llama-3.1-8b", "--pairs", "192"])],
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--out-dir", help="where the JSON results go (default: bench/results)")
    args = parser.parse_args(argv)
    for name, bench_args in SUITES[args.suite]:
        print(f"== python -m bench.{name} {' '.join(bench_args)}", file=sys.stderr, flush=True)
        extra = ["--out-dir", args.out_dir] if args.out_dir else []
        importlib.import_module(f"bench.{name}").main(bench_args + extra)


if __name__ == "__main__":
    main()
