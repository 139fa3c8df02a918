"""Analysis memory and time: `prefrank analyze` and `prefrank report` against the table's size.

  python -m bench.analysis [--sizes 100000,1000000,5000000] [--commands analyze,report]

For each size, writes a synthetic pair score table with reference columns and alpha (the scorer's
own schema; 1% error rows, 5% ties) and runs each command on it in a fresh process, which reports its
own peak RSS (VmHWM) and wall time.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import command, machine, peak_rss_since_reset, write_result


def write_table(path: Path, n: int, batch: int = 500_000):
    """n synthetic pairs in the scorer's schema, written batch by batch (this process stays small)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prefrank.table import TableLayout
    schema = TableLayout(with_ref=True).schema()
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, batch):
            m = min(batch, n - start)
            n_w, n_l = rng.integers(5, 400, m), rng.integers(5, 400, m)
            ref_w, ref_l = -1.5 * n_w + rng.normal(0, 20, m), -1.5 * n_l + rng.normal(0, 20, m)
            ok = rng.random(m) >= 0.01
            votes = rng.integers(1, 6, m)
            alpha = np.where(rng.random(m) < 0.05, 0.5, rng.integers(0, votes + 1) / votes)
            alpha = np.where(alpha < 0.5, 1 - alpha, alpha)
            col = lambda x: pa.array(np.where(ok, x, np.nan), mask=~ok)  # noqa: E731
            columns = {
                "id": pa.array([f"pair-{start + i}" for i in range(m)]),
                "logp_chosen": col(ref_w + rng.normal(0, 5, m)), "logp_rejected": col(ref_l + rng.normal(-2, 5, m)),
                "ref_logp_chosen": col(ref_w), "ref_logp_rejected": col(ref_l),
                "n_chosen": pa.array(n_w, mask=~ok), "n_rejected": pa.array(n_l, mask=~ok),
                "alpha": pa.array(alpha), "n_votes": pa.array(votes), "tie": pa.array(alpha == 0.5),
                "reoriented": pa.array(rng.random(m) < 0.3), "multi_turn": pa.array(np.zeros(m, bool)),
                "truncated": pa.array(np.zeros(m, bool)),
                "status": pa.array(np.where(ok, "ok", "error")),
                "error": pa.array(np.where(ok, None, "synthetic error"), type=pa.string())}
            writer.write_table(pa.table(columns, schema=schema))


def child(cmd: str, table: str, out: str):
    from prefrank.cli import main
    start = time.perf_counter()
    argv = ["analyze", table, "--out", out] if cmd == "analyze" else ["report", table, "--out", out]
    code = main(argv)
    print(json.dumps({"exit": code, "seconds": time.perf_counter() - start,
                      "peak_rss_mb": peak_rss_since_reset() / 2**20}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000,5000000")
    parser.add_argument("--commands", default="analyze,report")
    parser.add_argument("--child", nargs=3, metavar=("COMMAND", "TABLE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.sizes.split(",")):
            table = Path(tmp) / f"scores-{n}.parquet"
            write_table(table, n)
            for cmd in args.commands.split(","):
                out = Path(tmp) / (f"{cmd}-{n}.json" if cmd == "analyze" else f"{cmd}-{n}")
                result = subprocess.run([sys.executable, "-m", "bench.analysis", "--child", cmd, str(table), str(out)],
                                        capture_output=True, text=True)
                if result.returncode:
                    raise SystemExit(f"{cmd} on {n} pairs failed:\n{result.stderr[-2000:]}")
                runs.append({"command": cmd, "pairs": n, **json.loads(result.stdout.strip().splitlines()[-1])})
                print(runs[-1], file=sys.stderr)
    result = {"benchmark": "analysis peak RSS and time", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "command": command("analysis", argv), "runs": runs}
    print(json.dumps(result, indent=2))
    write_result("analysis", result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
