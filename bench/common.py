"""Shared benchmark helpers: machine description, timing by alternation, result files."""
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def machine() -> dict:
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def alternate(fns: dict, reps: int) -> dict:
    """Run each function `reps` times, alternating A, B, A, B... so drift hits all alike;
    returns each one's median seconds."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def command(module: str, argv) -> str:
    """The command line that ran a benchmark: its arguments, or the process's when run as a module."""
    import sys
    return f"python -m bench.{module} " + " ".join(sys.argv[1:] if argv is None else argv)


def write_result(name: str, result: dict, out_dir: str | None) -> Path:
    out = Path(out_dir or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def _status_kb(key: str) -> int:
    import re
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (Linux: /proc/self/clear_refs) and return the current RSS
    in bytes, the baseline for peak_rss_since_reset(). Freed heap memory is handed back to the
    system first (glibc malloc_trim), or a run could reuse it unseen."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may include freed memory
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def peak_rss_since_reset() -> int:
    return _status_kb("VmHWM") * 1024


def cuda_peak_mb(fn) -> float | None:
    """Peak GPU memory (MiB) that `fn` allocates above what was allocated before it; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
