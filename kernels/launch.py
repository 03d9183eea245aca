"""Where a Triton launch runs.

Triton launches a kernel on ``torch.cuda.current_device()`` and that device's current
stream, not on the device of the tensors it is given: tensors on ``cuda:1`` while the
current device is 0 would be read by a kernel running on GPU 0 (an illegal address, or a
silent peer access). Every launcher of kdfast's Triton kernels runs inside
:func:`on_device_of` its inputs.
"""

from __future__ import annotations

import contextlib

import torch


def on_device_of(tensor: torch.Tensor):
    """A context in which ``tensor``'s CUDA device is current (its current stream is then the
    one Triton launches on); a no-op for CPU tensors (Triton's interpreter)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
