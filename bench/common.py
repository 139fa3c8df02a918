"""Shared benchmark helpers: machine description, timing by alternation, result files.

torch is imported by the helpers that use it: a benchmark of a torch-free command (the analysis)
measures that command's memory, not torch's."""
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def machine() -> dict:
    import torch
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


def alternate_times(fns: dict, reps: int) -> dict:
    """Run each function `reps` times, alternating A, B, A, B... so drift hits all alike;
    returns each one's seconds, run by run."""
    import torch
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
    return times


def medians(runs: dict) -> dict:
    """Each function's median seconds from its runs (alternate_times)."""
    return {name: statistics.median(t) for name, t in runs.items()}


def alternate(fns: dict, reps: int) -> dict:
    """alternate_times' median seconds of each function."""
    return medians(alternate_times(fns, reps))


def command(module: str, argv) -> str:
    """The command line that ran a benchmark: its arguments, or the process's when run as a module."""
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
    import torch
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def flop_ideal(lm, items, head_everywhere: bool = True) -> float:
    """Naive's FLOPs over the least any method needs to score `items`, counting the matmuls and the
    attention's (query, key) products: naive runs prompt + completion per completion, causal
    attention and the head at every position; the least is the prompt once, each completion but
    its last token attending to the prompt and itself, and the head at the completion tokens only.
    The ratio a method reaches at naive's efficiency (per FLOP); the token ratio ignores that
    attention over the prompt is not shared and that naive's head runs at prompt positions.
    `head_everywhere=False`: the baseline's head runs at the completion tokens only (TRL's fused
    head on a GPU)."""
    vocab, d = lm.weight.shape
    layers = lm.config.get_text_config().num_hidden_layers
    linear, width = 2 * lm.matmul_params_per_layer, lm.attention_width  # per token and layer
    naive = least = 0
    for it in items:
        p = len(it.prompt_ids)
        least += layers * (linear * p + 2 * width * p * p)
        for completion in it.completion_ids:
            t, n = p + len(completion), len(completion) - 1
            head_rows = t if head_everywhere else len(completion)
            naive += layers * (linear * t + 2 * width * t * t) + 2 * vocab * d * head_rows
            least += layers * (linear * n + 4 * width * n * p + 2 * width * n * n) + 2 * vocab * d * len(completion)
    return naive / least
