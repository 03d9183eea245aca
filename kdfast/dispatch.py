"""Backend registry and dispatch.

Every loss has up to four implementations computing the same function: ``torch`` (the
reference), ``cpu`` (fused C++), ``triton`` and ``cuda`` (fused GPU kernels). A call picks
one in this order of precedence: the ``backend=`` argument, the ``KDFAST_BACKEND``
environment variable, then ``"auto"`` (the fastest backend able to run on the inputs).
Forcing a backend that cannot run raises :class:`BackendUnavailableError` with the reason;
it never falls back silently to a slower one.

Each backend declares what it supports through ``not_supported_reasons``; ``auto`` takes
the first backend of its preference list with no reasons, and when none fits the error
lists every backend with its reasons.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Mapping

import torch

from kdfast import _ops, fused, gate, reference

BACKEND_NAMES = ("torch", "cpu", "triton", "cuda")
ENV_VAR = "KDFAST_BACKEND"

#: Fastest first, per device type; ``torch`` is always last. On CUDA tensors the measured
#: choice of backend_choice.json comes first when the GPU and the loss are in it.
AUTO_PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}
CHOICE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_choice.json")


@functools.lru_cache(maxsize=None)
def measured_choices() -> dict:
    """GPU name -> {loss: backend} from backend_choice.json (written by benchmarks/choose_backends.py)."""
    with open(CHOICE_FILE) as handle:
        return json.load(handle)["devices"]


@functools.lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def auto_preference(op: str, device: torch.device) -> tuple[str, ...]:
    """The backends ``auto`` tries for ``op`` on ``device``, in order."""
    order = AUTO_PREFERENCE.get(device.type, ("torch",))
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        chosen = measured_choices().get(_gpu_name(index), {}).get(op)
        if chosen in order:
            order = (chosen,) + tuple(b for b in order if b != chosen)
    return order

#: The losses every backend provides (ResKD's gate_compact has torch, cpu and triton ones).
OPS = ("kd_loss", "pearson_loss", "dist_loss", "spearman_loss", "cmkd_loss", "drkd_loss")


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run on the given inputs; the message says why."""


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    description: str
    #: Why the backend cannot run at all on this installation (None: it can).
    unavailable: Callable[[], str | None]
    #: op name -> implementation taking the checked arguments of the public function.
    ops: Mapping[str, Callable]
    #: device types whose tensors the backend computes on (None: any device).
    devices: tuple[str, ...] | None
    #: dtypes of logits it reads (None: any floating dtype).
    dtypes: tuple[torch.dtype, ...] | None = None

    def not_supported_reasons(self, op: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = ()) -> list[str]:
        reason = self.unavailable()
        if reason is not None:
            return [reason]
        reasons = []
        if op not in self.ops:
            reasons.append(f"it has no implementation of {op}")
        if self.devices is not None and device.type not in self.devices:
            reasons.append(f"it runs on {' or '.join(self.devices)} tensors, not {device.type}")
        if self.dtypes is not None:
            unsupported = sorted({str(d).replace("torch.", "") for d in dtypes if d not in self.dtypes})
            if unsupported:
                supported = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
                reasons.append(f"it reads {supported} logits, not {', '.join(unsupported)} "
                               "(float64 runs on the torch reference)")
        return reasons


def _torch_unavailable() -> str | None:
    # Only the soft ranks of the reference need the compiled extension, but an install
    # without it is broken: report it (with the command that rebuilds it) rather than
    # fail later inside a Spearman term.
    return _ops.EXTENSION_ERROR


_REGISTRY: dict[str, Backend] = {
    "torch": Backend(
        name="torch",
        description="reference implementation in plain PyTorch (any device)",
        unavailable=_torch_unavailable,
        ops={**{op: getattr(reference, op) for op in OPS}, "gate_compact": gate.IMPLEMENTATIONS["torch"]},
        devices=None,
    ),
    "cpu": Backend(
        name="cpu",
        description="fused C++ kernels for CPU tensors (loss and gradient in one pass per row)",
        unavailable=lambda: _ops.EXTENSION_ERROR,
        ops={**fused.OPS, "gate_compact": gate.IMPLEMENTATIONS["cpu"]},
        devices=("cpu",),
        dtypes=fused.DTYPES,
    ),
    "triton": Backend(
        name="triton",
        description="fused Triton kernels for CUDA tensors (CPU tensors under TRITON_INTERPRET=1)",
        unavailable=fused.triton_unavailable,
        ops={**fused.TRITON_OPS, "gate_compact": gate.IMPLEMENTATIONS["triton"]},
        devices=("cuda", "cpu") if fused.triton_interpreted() else ("cuda",),
        dtypes=fused.DTYPES,
    ),
    "cuda": Backend(
        name="cuda",
        description="fused CUDA C++ kernels for CUDA tensors (one block per row)",
        unavailable=fused.cuda_unavailable,
        ops=fused.OPS,
        devices=("cuda",),
        dtypes=fused.DTYPES,
    ),
}


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """What :func:`backends` reports for one backend."""

    name: str
    available: bool
    reason: str
    description: str

    def __str__(self) -> str:
        state = "available" if self.available else "unavailable"
        return f"{self.name:7s} {state:11s} {self.reason or self.description}"


def backends() -> dict[str, BackendStatus]:
    """Report each backend and why it is or is not usable on this installation.

    Returns:
        A dict from backend name (``torch``, ``cpu``, ``triton``, ``cuda``) to a
        :class:`BackendStatus` with ``available`` and ``reason`` (empty when available).
        ``print(*kdfast.backends().values(), sep="\\n")`` gives a readable table.
    """
    report = {}
    for name in BACKEND_NAMES:
        backend = _REGISTRY[name]
        reason = backend.unavailable()
        report[name] = BackendStatus(name, reason is None, reason or "", backend.description)
    return report


def requested_backend(backend: str | None) -> str:
    """The backend name a call asks for: the argument, else ``$KDFAST_BACKEND``, else ``auto``."""
    if backend is None:
        backend = os.environ.get(ENV_VAR, "").strip() or "auto"
        source = f"the environment variable {ENV_VAR}"
    else:
        source = "backend"
    if not isinstance(backend, str) or backend not in ("auto",) + BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    return backend


def not_supported_reasons(backend: str, op: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = ()) -> list[str]:
    """Why ``backend`` cannot run ``op`` on tensors of ``dtypes`` on ``device`` (empty: it can)."""
    return _REGISTRY[backend].not_supported_reasons(op, device, dtypes)


def resolve(op: str, backend: str | None, device: torch.device, dtypes: tuple[torch.dtype, ...] = ()) -> Callable:
    """The implementation of ``op`` to run on tensors of ``dtypes`` on ``device``."""
    name = requested_backend(backend)
    if name != "auto":
        reasons = _REGISTRY[name].not_supported_reasons(op, device, dtypes)
        if reasons:
            raise BackendUnavailableError(f"backend '{name}' cannot run {op} here: " + "; ".join(reasons))
        return _REGISTRY[name].ops[op]
    all_reasons = []
    for candidate in auto_preference(op, device):
        reasons = _REGISTRY[candidate].not_supported_reasons(op, device, dtypes)
        if not reasons:
            return _REGISTRY[candidate].ops[op]
        all_reasons.append(f"{candidate}: " + "; ".join(reasons))
    raise BackendUnavailableError(f"no backend can run {op} on {device} tensors: " + " | ".join(all_reasons))
