"""Threads and determinism for one run of work, restored afterwards.

A leaf module: the trainer and the teacher-cache builder set the same process-wide
PyTorch switches for what they run (several runs may share one process, e.g. the demo).
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["execution_settings"]


@contextlib.contextmanager
def execution_settings(threads: int | None, deterministic: bool):
    """``threads`` CPU threads (None or 0: leave as is) and, when ``deterministic``, PyTorch's
    deterministic algorithms (cuBLAS's workspace configured for them, cuDNN autotuning off);
    otherwise nondeterministic algorithms with cuDNN autotuning. Everything is restored on exit."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.backends.cudnn.benchmark = saved[2]
