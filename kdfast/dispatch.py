"""Backend registry and dispatch.

Every loss has up to four implementations computing the same function: ``torch`` (the
reference), ``cpu`` (fused C++), ``triton`` and ``cuda`` (fused GPU kernels). A call picks
one in this order of precedence: the ``backend=`` argument, the ``KDFAST_BACKEND``
environment variable, then ``"auto"`` (the fastest backend able to run on the inputs).
Forcing a backend that cannot run raises :class:`BackendUnavailableError` with the reason;
it never falls back silently to a slower one.

Each backend declares what it supports — devices, dtypes and shapes (e.g. the widest row
the Triton Spearman kernel holds) — through ``not_supported_reasons``; ``auto`` takes the
first backend of its preference list with no reasons, and when none fits the error lists
every backend with its reasons. The decision itself (:func:`choose`) is a function of the
op, the device, the dtypes, the shape and which backends are installed, so it can be
checked for CUDA inputs on a machine without a GPU.

Imports flow one way: this module knows the losses' implementations (``reference``,
``fused``); other op families (ResKD's gate) register theirs with :func:`register`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Mapping

import torch

from kdfast import _ops, fused, reference

__all__ = ["OPS", "BACKEND_NAMES", "ENV_VAR", "Backend", "BackendStatus", "BackendUnavailableError", "backends",
           "choose", "not_supported_reasons", "register", "requested_backend", "resolve"]

BACKEND_NAMES = ("torch", "cpu", "triton", "cuda")
ENV_VAR = "KDFAST_BACKEND"

#: Fastest first, per device type; ``torch`` is always last. On CUDA tensors the measured
#: choice of backend_choice.json comes first when the GPU and the loss are in it; where
#: nothing was measured, DESIGN_PREFERENCE orders the fused backends per loss.
AUTO_PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}
#: The order the kernels' designs predict on a GPU, until measured (static evidence in
#: benchmarks/results/gpu_static.csv). Without a Spearman term both row kernels read each
#: input once up to 2048 classes and twice for KL-type losses beyond, with 16-byte vectors;
#: Triton leads because it holds rows in registers up to 8192 classes (CUDA up to 2048) and
#: because its kernels are the ones the test suite runs (under Triton's interpreter) on
#: every machine. With a Spearman term CUDA leads: it has no width limit (Triton's rows end
#: at 8192) and runs a row's ranks and soft ranks in shared memory.
DESIGN_PREFERENCE = {"spearman_loss": ("cuda", "triton", "torch"), "cmkd_loss": ("cuda", "triton", "torch")}
CHOICE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_choice.json")


@functools.lru_cache(maxsize=None)
def measured_choices() -> dict:
    """GPU name -> {loss: backend} from backend_choice.json (written by benchmarks/choose_backends.py)."""
    with open(CHOICE_FILE) as handle:
        return json.load(handle)["devices"]


@functools.lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def auto_preference(op: str, device: torch.device, gpu_name: str | None = None) -> tuple[str, ...]:
    """The backends ``auto`` tries for ``op`` on ``device``, in order: on a GPU named in
    backend_choice.json, its measured choice first, then the order of DESIGN_PREFERENCE
    (``gpu_name`` defaults to the device's)."""
    order = AUTO_PREFERENCE.get(device.type, ("torch",))
    if device.type == "cuda":
        order = DESIGN_PREFERENCE.get(op, order)
        if gpu_name is None:
            index = device.index if device.index is not None else torch.cuda.current_device()
            gpu_name = _gpu_name(index)
        chosen = measured_choices().get(gpu_name, {}).get(op)
        if chosen in order:
            order = (chosen,) + tuple(b for b in order if b != chosen)
    return order

#: The losses every backend provides (ResKD's gate_compact has torch, cpu and triton ones).
OPS = ("kd_loss", "pearson_loss", "dist_loss", "spearman_loss", "cmkd_loss", "drkd_loss", "dkd_loss")


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run on the given inputs; the message says why."""


#: The ops whose Spearman terms sort each row (their shape limits differ).
SPEARMAN_OPS = ("spearman_loss", "cmkd_loss")
INT32_MAX = 2**31 - 1


def _no_limits(op: str, shape: tuple[int, ...]) -> list[str]:
    return []


def _triton_limits(op: str, shape: tuple[int, ...]) -> list[str]:
    from kdfast.kernels.kd_losses import MAX_CLASSES, MAX_SPEARMAN_CLASSES

    if len(shape) != 2:
        return []
    classes = shape[1]
    if op in SPEARMAN_OPS and classes > MAX_SPEARMAN_CLASSES:
        return [f"it computes the Spearman terms for at most {MAX_SPEARMAN_CLASSES} classes "
                f"(one program holds a row), not C={classes}"]
    if classes > MAX_CLASSES:
        return [f"it reads rows of at most {MAX_CLASSES} classes (32-bit column offsets), not C={classes}"]
    return []


def _cuda_limits(op: str, shape: tuple[int, ...]) -> list[str]:
    if len(shape) != 2:
        return []
    rows, classes = shape
    # (Its Spearman steps sort chunks of rows, each under 2^31 logits: no limit on B·C.)
    if rows > INT32_MAX:
        return [f"it takes at most 2^31 - 1 rows (one block per row), not B={rows}"]
    return []


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
    #: (op, shape of the logits) -> why it cannot take that shape (empty: it can).
    limits: Callable[[str, tuple[int, ...]], list[str]] = _no_limits

    def limitations(self, op: str, device_type: str, dtypes: tuple[torch.dtype, ...] = (),
                    shape: tuple[int, ...] = ()) -> list[str]:
        """Why the backend, once installed, cannot run ``op`` on such inputs (empty: it can)."""
        reasons = []
        if op not in self.ops:
            reasons.append(f"it has no implementation of {op}")
        if self.devices is not None and device_type not in self.devices:
            reasons.append(f"it runs on {' or '.join(self.devices)} tensors, not {device_type}")
        if self.dtypes is not None:
            unsupported = sorted({str(d).replace("torch.", "") for d in dtypes if d not in self.dtypes})
            if unsupported:
                supported = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
                reasons.append(f"it reads {supported} logits, not {', '.join(unsupported)} "
                               "(float64 runs on the torch reference)")
        return reasons + self.limits(op, tuple(shape))

    def not_supported_reasons(self, op: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = (),
                              shape: tuple[int, ...] = ()) -> list[str]:
        """Why the backend cannot run ``op`` here on such inputs: not installed, or its limitations."""
        reason = self.unavailable()
        if reason is not None:
            return [reason]
        return self.limitations(op, device.type, dtypes, shape)


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
        ops={op: getattr(reference, op) for op in OPS},
        devices=None,
    ),
    "cpu": Backend(
        name="cpu",
        description="fused C++ kernels for CPU tensors (loss and gradient in one pass per row)",
        unavailable=lambda: _ops.EXTENSION_ERROR,
        ops=dict(fused.OPS),
        devices=("cpu",),
        dtypes=fused.DTYPES,
    ),
    "triton": Backend(
        name="triton",
        description="fused Triton kernels for CUDA tensors (CPU tensors under TRITON_INTERPRET=1)",
        unavailable=fused.triton_unavailable,
        ops=dict(fused.TRITON_OPS),
        devices=("cuda", "cpu") if fused.triton_interpreted() else ("cuda",),
        dtypes=fused.DTYPES,
        limits=_triton_limits,
    ),
    "cuda": Backend(
        name="cuda",
        description="fused CUDA C++ kernels for CUDA tensors (one block per row)",
        unavailable=fused.cuda_unavailable,
        ops=dict(fused.OPS),
        devices=("cuda",),
        dtypes=fused.DTYPES,
        limits=_cuda_limits,
    ),
}


def register(op: str, implementations: Mapping[str, Callable]) -> None:
    """Add the implementations of ``op`` per backend name (an op family outside the losses,
    e.g. ResKD's gate, registers itself when its module is imported)."""
    for name, implementation in implementations.items():
        _REGISTRY[name].ops[op] = implementation


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


def not_supported_reasons(backend: str, op: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = (),
                          shape: tuple[int, ...] = ()) -> list[str]:
    """Why ``backend`` cannot run ``op`` on tensors of ``dtypes`` and ``shape`` on ``device`` (empty: it can)."""
    return _REGISTRY[backend].not_supported_reasons(op, device, dtypes, shape)


def choose(op: str, backend: str | None, device: torch.device, dtypes: tuple[torch.dtype, ...] = (),
           shape: tuple[int, ...] = (), *, installed: Callable[[str], str | None] | None = None,
           gpu_name: str | None = None) -> str:
    """The name of the backend that runs ``op`` on such inputs, or BackendUnavailableError.

    ``installed(name)`` says why a backend is not installed here (None: it is); by default
    each backend's own check. Tests pass ``lambda name: None`` to decide for CUDA inputs on
    a machine without a GPU.
    """
    installed = installed or (lambda name: _REGISTRY[name].unavailable())

    def reasons(name):
        why = installed(name)
        return [why] if why is not None else _REGISTRY[name].limitations(op, device.type, dtypes, shape)

    name = requested_backend(backend)
    if name != "auto":
        why = reasons(name)
        if why:
            raise BackendUnavailableError(f"backend '{name}' cannot run {op} here: " + "; ".join(why))
        return name
    all_reasons = []
    for candidate in auto_preference(op, device, gpu_name):
        why = reasons(candidate)
        if not why:
            return candidate
        all_reasons.append(f"{candidate}: " + "; ".join(why))
    raise BackendUnavailableError(f"no backend can run {op} on {device} tensors: " + " | ".join(all_reasons))


def resolve(op: str, backend: str | None, device: torch.device, dtypes: tuple[torch.dtype, ...] = (),
            shape: tuple[int, ...] = ()) -> Callable:
    """The implementation of ``op`` to run on tensors of ``dtypes`` and ``shape`` on ``device``."""
    return _REGISTRY[choose(op, backend, device, dtypes, shape)].ops[op]
