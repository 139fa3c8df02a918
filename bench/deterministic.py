"""`prefrank score --deterministic` against the default mode: how far default-mode scores move with the
batching, and what the deterministic mode costs, whole process.

  python -m bench.deterministic [--pairs 120] [--reps 3] [--model PATH] [--smoke]

On the first --pairs HH helpful-base test pairs (../shared) under --model (stories260K) as policy and
reference: (1) drift: the default mode scored with the default options, --max-tokens-per-batch 700,
--chunk-rows 7, --method packed / naive, and OMP_NUM_THREADS=1; for each variant, how many ok rows'
log-probs differ in any bit from the default run and the largest difference (nats); the same for
--deterministic, where none may differ. (2) cost: `python -m prefrank score` as a subprocess, default
vs --deterministic, alternating, median of --reps, whole process (start, model load, scoring, write),
and the scoring alone (the sidecar's summary).
On a GPU (--device cuda) the same commands time the GPU's deterministic mode, which scores rows one
at a time.
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from bench.common import SHARED, command, machine, write_result

FLOATS = ("logp_chosen", "logp_rejected", "ref_logp_chosen", "ref_logp_rejected")
VARIANTS = {"default options": [], "--max-tokens-per-batch 700": ["--max-tokens-per-batch", "700"],
            "--chunk-rows 7": ["--chunk-rows", "7"], "--method packed": ["--method", "packed"],
            "--method naive": ["--method", "naive"], "OMP_NUM_THREADS=1": []}


def _score(data: Path, model: str, out: Path, extra: list[str], env: dict | None = None) -> float:
    cmd = [sys.executable, "-m", "prefrank", "score", "--data", str(data), "--model", model, "--ref-model", model,
           "--out", str(out), *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def _drift(got: Path, base: Path) -> dict:
    a, b = pq.read_table(got).to_pydict(), pq.read_table(base).to_pydict()
    ok = [i for i, s in enumerate(b["status"]) if s == "ok"]
    differ = [i for i in ok if any(a[c][i] != b[c][i] for c in FLOATS)]
    worst = max((abs(a[c][i] - b[c][i]) for i in ok for c in FLOATS), default=0.0)
    return {"rows_differing": len(differ), "ok_rows": len(ok), "max_abs_diff": worst}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=120)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--model", default=str(SHARED / "models" / "stories260K"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="12 pairs, one rep, two variants")
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)
    pairs, reps = (12, 1) if args.smoke else (args.pairs, args.reps)
    variants = dict(list(VARIANTS.items())[:2]) if args.smoke else VARIANTS
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with gzip.open(SHARED / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz", "rt") as f:
            rows = [json.loads(line) for _, line in zip(range(pairs), f)]
        data = tmp / "hh.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        device = ["--device", args.device]
        drift = {}
        for mode, flag in (("default", []), ("deterministic", ["--deterministic"])):
            base = tmp / f"{mode}-base.parquet"
            _score(data, args.model, base, device + flag)
            drift[mode] = {}
            for k, (name, extra) in enumerate(variants.items()):
                out = tmp / f"{mode}-{k}.parquet"
                env = {**os.environ, "OMP_NUM_THREADS": "1"} if name.startswith("OMP") else None
                _score(data, args.model, out, device + flag + extra, env)
                drift[mode][name] = _drift(out, base)
                print(f"{mode:13s} {name:28s} {drift[mode][name]}", file=sys.stderr, flush=True)
        times = {"default": [], "deterministic": []}
        scoring = {"default": [], "deterministic": []}  # the scoring alone: the sidecar's summary
        for _ in range(reps):  # alternating, whole process
            for mode, flag in (("default", []), ("deterministic", ["--deterministic"])):
                times[mode].append(_score(data, args.model, tmp / "t.parquet", device + flag))
                sidecar = Path(f"{tmp / 't.parquet'}.meta.json")
                scoring[mode].append(json.loads(sidecar.read_text())["summary"]["seconds"])
                (tmp / "t.parquet").unlink()
                sidecar.unlink()
        median = {mode: sorted(t)[len(t) // 2] for mode, t in times.items()}
        scoring = {mode: sorted(t)[len(t) // 2] for mode, t in scoring.items()}
    result = {"command": command("deterministic", argv), "machine": machine(),
              "date": time.strftime("%Y-%m-%d"), "pairs": pairs, "model": args.model, "drift": drift,
              "seconds": median, "ratio": median["deterministic"] / median["default"],
              "scoring_seconds": scoring, "scoring_ratio": scoring["deterministic"] / scoring["default"]}
    print(f"whole process: default {median['default']:.2f} s, deterministic {median['deterministic']:.2f} s "
          f"({result['ratio']:.2f}x); scoring alone {scoring['default']:.2f} s vs {scoring['deterministic']:.2f} s "
          f"({result['scoring_ratio']:.2f}x)", file=sys.stderr)
    write_result("deterministic" + ("_smoke" if args.smoke else ""), result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
