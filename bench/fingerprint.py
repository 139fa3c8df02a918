"""Model fingerprints (what `--resume` compares): prefrank.models.fingerprint, an XXH3-128 of every
file's bytes, against the hashes it could have used and the bare read.

  python -m bench.fingerprint [--mb 4000] [--reps 3] [--dir /tmp] [--smoke]

Writes a folder holding one file of --mb megabytes of random bytes (named model.safetensors: the
fingerprint reads every file whole, so the content's structure does not matter) under --dir, then
times fingerprint() of that folder, a sha256 and a blake2b of the same file (hash_file, 1 MiB
reads), and reading it without hashing; the file is in the page cache (as right after a run has
loaded the weights), alternating, median of --reps. Also fingerprint() of ../shared's stories260K.
The file is deleted at the end.
"""
import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import SHARED, alternate, command, machine, write_result
from prefrank.io import hash_file
from prefrank.models import fingerprint

BF16_8B_GB = 8.03e9 * 2 / 1e9  # Llama 3.1 8B's weights in bf16


class _Discard:
    def update(self, block):
        pass


def _write_random(path: Path, megabytes: float):
    rng = np.random.default_rng(0)
    left = int(megabytes * 1e6)
    with open(path, "wb") as f:
        while left > 0:
            n = min(left, 64 << 20)
            f.write(rng.bytes(n))
            left -= n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=4000, help="size of the written file (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", help="where to write it (default: the temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="a 4 MB file, 3 repetitions: checks the script runs")
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)
    megabytes, reps = (4, 3) if args.smoke else (args.mb, args.reps)
    stories = SHARED / "models" / "stories260K"
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        weights = Path(folder) / "model.safetensors"
        _write_random(weights, megabytes)
        size = weights.stat().st_size
        fns = {"fingerprint_big": lambda: fingerprint(folder),
               "sha256_big": lambda: hash_file(hashlib.sha256(), weights).hexdigest(),
               "blake2b_big": lambda: hash_file(hashlib.blake2b(), weights).hexdigest(),
               "read_big": lambda: hash_file(_Discard(), weights)}
        if stories.is_dir():
            fns["fingerprint_stories260K"] = lambda: fingerprint(str(stories))
        for fn in fns.values():  # warm: the page cache and the imports
            fn()
        seconds = alternate(fns, reps)
    big = {name: s for name, s in seconds.items() if name.endswith("_big")}
    result = {"benchmark": "model fingerprint (XXH3-128 of every file) vs sha256, blake2b and a bare read",
              "date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": command("fingerprint", argv),
              "file_mb": size / 1e6, "reps": reps, "ms": {name: s * 1e3 for name, s in seconds.items()},
              "gb_per_s": {name: size / s / 1e9 for name, s in big.items()},
              "seconds_8b_bf16": {name: BF16_8B_GB / (size / s / 1e9) for name, s in big.items()}}
    if not stories.is_dir():
        print(f"{stories} not found: stories260K left out", file=sys.stderr)
    print(json.dumps(result, indent=2))
    if not args.smoke:
        write_result("fingerprint", result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
