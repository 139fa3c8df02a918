"""Streaming: peak memory of `prefrank score` does not grow with the number of pairs.

  python -m bench.streaming [--sizes 10000,100000,1000000]

For each size, writes that many synthetic pairs (the built-in addition task) as JSONL and scores
them with the built-in tiny model in a fresh process, which reports its own peak RSS.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import command, machine, peak_rss_since_reset, write_result


def child(data: str, model: str, out: str):
    from prefrank.data import Columns
    from prefrank.pipeline import ScoreOptions, score_dataset
    start = time.perf_counter()
    summary = score_dataset(ScoreOptions(data=data, model=model, out=out, columns=Columns()), progress=False)
    print(json.dumps({"rows": summary.rows, "errors": summary.errors, "seconds": time.perf_counter() - start,
                      # VmHWM: this program's own peak (ru_maxrss would also hold the parent's RSS that
                      # the forked process had before its exec)
                      "peak_rss_mb": peak_rss_since_reset() / 2**20}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--child", nargs=3, metavar=("DATA", "MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)
    from prefrank.demo.default import ensure_default
    from prefrank.demo.task import make_pairs
    _, model = ensure_default(log=lambda m: print(m, file=sys.stderr))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.sizes.split(",")):
            data = Path(tmp) / f"pairs-{n}.jsonl"
            with open(data, "w") as f:
                for start in range(0, n, 10_000):
                    rows = make_pairs(min(10_000, n - start), seed=start)
                    f.writelines(json.dumps({**r, "id": f"{start + i}"}) + "\n" for i, r in enumerate(rows))
            result = subprocess.run([sys.executable, "-m", "bench.streaming", "--child", str(data), model,
                                     str(Path(tmp) / f"out-{n}.parquet")], capture_output=True, text=True, check=True)
            runs.append({"pairs": n, **json.loads(result.stdout.strip().splitlines()[-1])})
            print(runs[-1], file=sys.stderr)
    result = {"benchmark": "streaming peak RSS", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "command": command("streaming", argv), "runs": runs}
    print(json.dumps(result, indent=2))
    write_result("streaming", result, args.out_dir)


if __name__ == "__main__":
    main()
