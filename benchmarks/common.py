"""Timing, memory and result-file helpers shared by the benchmark scripts.

Times are medians with 20%/80% quantiles over repeated runs after a warm-up; on a GPU
each run is bracketed by CUDA events on the current stream, after reading a 256 MiB
buffer (untimed) so that no run finds its inputs left in the L2 cache by the previous
one (an H200's L2 is 60 MB: B = 4096, C = 1000 in bf16 would fit), on the CPU by
``time.perf_counter``. Peak memory is what a call allocates at its peak, from PyTorch's
allocators (see peak_memory_mb). Every result row carries the device, the commit and
the date.
"""

from __future__ import annotations

import csv
import datetime
import gc
import json
import os
import statistics
import tempfile
import time
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


_L2_FLUSH: dict[str, torch.Tensor] = {}


def flush_l2(device: torch.device) -> None:
    """Read 256 MiB on ``device`` (more than any GPU's L2 cache, the size triton.testing.do_bench
    flushes), so that the next kernel reads its inputs from device memory. A read leaves clean
    lines in the cache; a write would leave dirty ones, written back during the timed run."""
    buffer = _L2_FLUSH.get(str(device))
    if buffer is None:
        buffer = _L2_FLUSH[str(device)] = torch.zeros(256 * 2**20 // 4, dtype=torch.int32, device=device)
    buffer.sum()


def measure_ms(fn: Callable[[], object], device: torch.device, warmup: int = 5, reps: int = 30) -> dict:
    """Median and 20%/80% quantiles of ``fn``'s run time in milliseconds (on a GPU each run
    starts from a flushed L2 cache, outside the timed region)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            flush_l2(device)
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


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Megabytes that running ``fn`` allocates at its peak, beyond what existed before.

    On a GPU, from PyTorch's CUDA allocator statistics. On the CPU, from the profiler's
    allocation events, whose running "Total Allocated" counts every allocation made
    through PyTorch's CPU allocator during the call (kdfast's kernels take their scratch
    from it too).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    return max([0, *totals]) / 2**20


def copy_bandwidth_gbps(device: torch.device, megabytes: int = 256) -> float:
    """Measured copy bandwidth (bytes read + written per second, in GB/s): the floor that
    a memory-bound kernel's achieved bandwidth is compared with."""
    x = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    timing = measure_ms(lambda: y.copy_(x), device, warmup=3, reps=20)
    return 2 * x.numel() * 4 / (timing["median_ms"] * 1e-3) / 1e9


# Shared with the demo (kdfast.demo records the same provenance in its results.json).
from kdfast.provenance import device_name  # noqa: E402
from kdfast.provenance import source_commit as commit  # noqa: E402


def append_rows(filename: str, rows: list[dict]) -> str:
    """Append ``rows`` to ``benchmarks/results/filename`` (CSV with a header), adding
    device-independent provenance: commit and date. Returns the file's path. An absolute
    ``filename`` is used as it is (benchmarks/run_gpu.sh writes straight into its output
    folder that way). When the rows have columns the file's header lacks (a benchmark that
    gained a measurement), the file is rewritten, atomically, with the union of the columns
    (old rows empty in the new ones), so that every row stays under its own names."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, filename)
    stamp = {"commit": commit(), "date": datetime.date.today().isoformat()}
    rows = [{**row, **stamp} for row in rows]
    fields = list(rows[0])
    if os.path.exists(path):
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            header, old_rows = list(reader.fieldnames or []), list(reader)
        if header and set(fields) <= set(header):
            fields = header
        else:  # new columns: before commit/date, in the rows' order
            merged = [f for f in header if f not in ("commit", "date")]
            merged += [f for f in fields if f not in merged and f not in ("commit", "date")]
            fields = merged + ["commit", "date"]
            temporary = path + ".tmp"
            with open(temporary, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                writer.writerows(old_rows)
            os.replace(temporary, path)
    new_file = not os.path.exists(path)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    return path
