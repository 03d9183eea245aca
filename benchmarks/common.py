"""Timing and result-file helpers shared by the benchmark scripts.

Times are medians with 20%/80% quantiles over repeated runs after a warm-up; on a GPU
each run is bracketed by CUDA events on the current stream, on the CPU by
``time.perf_counter``. Every result row carries the device, the commit and the date.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def measure_ms(fn: Callable[[], object], device: torch.device, warmup: int = 5, reps: int = 30) -> dict:
    """Median and 20%/80% quantiles of ``fn``'s run time in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    quintiles = statistics.quantiles(times, n=5)
    return {"median_ms": statistics.median(times), "q20_ms": quintiles[0], "q80_ms": quintiles[3]}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        # Result files change as benchmarks run; only a change to the code makes the commit "dirty".
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)benchmarks/results"], capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_rows(filename: str, rows: list[dict]) -> str:
    """Append ``rows`` to ``benchmarks/results/filename`` (CSV with a header), adding
    device-independent provenance: commit and date. Returns the file's path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, filename)
    stamp = {"commit": commit(), "date": datetime.date.today().isoformat()}
    rows = [{**row, **stamp} for row in rows]
    new_file = not os.path.exists(path)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    return path
