"""Where a result comes from: the device it ran on and the commit of the code that produced it.

Every result file kdfast writes (the benchmarks' CSVs, the demo's ``results.json``) carries
both, so that a number in the README can be traced to the code and machine behind it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["device_name", "source_commit"]

_ROOT = Path(__file__).resolve().parents[1]


def device_name(device: torch.device | str = "cpu") -> str:
    """The GPU's name, or the CPU's model with this process's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def source_commit() -> str:
    """The short commit of kdfast's checkout, "-dirty" when code differs from it (result files
    under ``benchmarks/results`` do not count); ``KDFAST_COMMIT`` when set (a copy of the tree
    without its ``.git``, e.g. on a lent GPU machine); "unknown" outside a git checkout."""
    if os.environ.get("KDFAST_COMMIT"):
        return os.environ["KDFAST_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=_ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)benchmarks/results"], capture_output=True, text=True,
                               cwd=_ROOT).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
