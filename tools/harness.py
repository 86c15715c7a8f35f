"""What every benchmark under tools/ shares: timing, peak memory, the machine, the JSON file.

Run the benchmarks from the repository root as ``PYTHONPATH=. python tools/bench_x.py``.
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

GIB = 2**30


def on_cuda(device: str | torch.device) -> bool:
    return str(device).startswith("cuda")


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if on_cuda(device):
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: str | torch.device = "cuda",
                   warmup: int = 2, iters: int = 5) -> float:  # fmt: skip
    """Median wall-clock seconds of fn(), each run waited for: host and GPU time together."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gpu_seconds(fn: Callable[[], object], warmup: int = 2, iters: int = 5) -> float:
    """Median seconds of fn() between two CUDA events: the GPU's time, with no wait on the host."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def reset_peak(device: str | torch.device) -> None:
    """Free what can be freed and start a new peak-memory count."""
    gc.collect()
    if on_cuda(device):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str | torch.device) -> float | None:
    """Peak GiB allocated on the device since the last reset_peak (None on CPU)."""
    return torch.cuda.max_memory_allocated() / GIB if on_cuda(device) else None


def machine(device: str | torch.device = "cuda") -> dict:
    """Where and when a result was measured, for its JSON file."""
    cpu = platform.processor() or platform.machine()
    return {
        "device": torch.cuda.get_device_name() if on_cuda(device) else cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def write_json(path: Path | str | None, result: object) -> None:
    """Write result as indented JSON to path (creating its folder); nothing when path is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
