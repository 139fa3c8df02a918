"""Model fingerprints (what `--resume` compares): prefrank.models.fingerprint vs a full sha256.

  python -m bench.fingerprint [--mb 100] [--reps 9] [--smoke]

Times fingerprint() on the real stories260K folder (../shared) and on a folder holding one
safetensors file of about --mb megabytes that it writes (random fp32 tensors), against a sha256 of
that whole file (hash_file, 1 MiB reads; the file is in the page cache, as it is right after being
written or loaded), alternating the three, median of --reps.
"""
import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import SHARED, alternate, command, machine, write_result
from prefrank.io import hash_file
from prefrank.models import fingerprint

BF16_8B_GB = 8.03e9 * 2 / 1e9  # Llama 3.1 8B's weights in bf16


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100, help="size of the written safetensors file (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--smoke", action="store_true", help="a 4 MB file, 3 repetitions: checks the script runs")
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)
    megabytes, reps = (4, 3) if args.smoke else (args.mb, args.reps)
    from safetensors.torch import save_file
    stories = SHARED / "models" / "stories260K"
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "model.safetensors"
        per_tensor = 1 << 20  # fp32 values: 4 MiB tensors
        torch.manual_seed(0)
        save_file({f"layers.{i}.weight": torch.randn(per_tensor)
                   for i in range(max(1, round(megabytes * 1e6 / (4 * per_tensor))))}, str(weights))
        size = weights.stat().st_size
        fns = {"fingerprint_big": lambda: fingerprint(folder),
               "sha256_big": lambda: hash_file(hashlib.sha256(), weights).hexdigest()}
        if stories.is_dir():
            fns["fingerprint_stories260K"] = lambda: fingerprint(str(stories))
        for fn in fns.values():  # warm: the page cache and the imports
            fn()
        seconds = alternate(fns, reps)
    result = {"benchmark": "model fingerprint vs full sha256", "date": time.strftime("%Y-%m-%d"),
              "machine": machine(), "command": command("fingerprint", argv), "safetensors_mb": size / 1e6,
              "reps": reps, "ms": {name: s * 1e3 for name, s in seconds.items()},
              "sha256_gb_per_s": size / seconds["sha256_big"] / 1e9,
              "sha256_8b_bf16_s": BF16_8B_GB / (size / seconds["sha256_big"] / 1e9)}
    if not stories.is_dir():
        print(f"{stories} not found: stories260K left out", file=sys.stderr)
    print(json.dumps(result, indent=2))
    if not args.smoke:
        write_result("fingerprint", result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
