"""Argument checks shared by every public function.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong
shape, device or value) with a message that names the argument and what was expected.
None of them synchronizes with a GPU unless the caller asks: the data-dependent checks
(:func:`check_targets`' range check, :func:`check_finite`) read values back to the host
only on the CPU or when ``exact=True`` / ``check_finite=True``. On a GPU the range of the
targets is checked by a device-side assertion (``torch._assert_async``, as PyTorch's own
``cross_entropy`` does), which costs no synchronization in a training step: an
out-of-range target then stops the program with a CUDA device-side assertion at the next
synchronization instead of a ``ValueError``. Under ``torch.compile`` both checks become
device assertions, so that the graph has no break.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REGULARIZATIONS = ("l2", "kl")


def check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_logits(name: str, x) -> None:
    """``x`` must be a 2-D floating tensor [B, C] (fp16, bf16, fp32 or fp64)."""
    check_tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [B, C], got shape {tuple(x.shape)}")


def check_pair(student, teacher) -> None:
    """Student and teacher logits: both [B, C] floating tensors, same shape and device, B, C >= 1."""
    check_logits("student", student)
    check_logits("teacher", teacher)
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher must have the student's shape {tuple(student.shape)}, got {tuple(teacher.shape)}"
        )
    if teacher.device != student.device:
        raise ValueError(f"teacher must be on the student's device {student.device}, got {teacher.device}")
    if student.shape[0] < 1 or student.shape[1] < 1:
        raise ValueError(f"student must have at least one row and one class, got shape {tuple(student.shape)}")


def check_targets(target, batch: int, num_classes: int, device: torch.device, exact: bool = False) -> None:
    """``target`` must hold integer class indices [B] in [0, C) on the logits' device.

    The range is checked on the host (a clear ``ValueError``) for CPU tensors or when
    ``exact`` is True (one device synchronization), else by a device-side assertion.
    """
    check_tensor("target", target)
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"target must have shape ({batch},) to match the logits, got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target must be on the logits' device {device}, got {target.device}")
    if target.numel() == 0:
        return
    if torch.compiler.is_compiling() or (target.device.type != "cpu" and not exact):
        # A traced graph cannot raise from data, and reading the range back from a GPU
        # would synchronize every call: assert on the device instead.
        torch._assert_async(((target >= 0) & (target < num_classes)).all(),
                            f"target values must lie in [0, {num_classes - 1}]")
        return
    low, high = torch.stack([target.min(), target.max()]).tolist()
    if low < 0 or high >= num_classes:
        raise ValueError(f"target values must lie in [0, {num_classes - 1}], got values in [{low}, {high}]")


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_positive(name: str, value) -> float:
    """A finite real number > 0 (temperatures, regularization strengths)."""
    value = _number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


#: The largest temperature any loss accepts. The KD term is τ²·KL(q‖p) and KL shrinks like 1/τ²,
#: so fp32 arithmetic loses about log2(τ²) bits to cancellation: at τ = 100 every backend is within
#: 1e-4 (relative) of fp64, at τ = 1000 the error reaches 2e-3 and at τ = 1e5 the loss goes
#: negative. The literature's temperatures are 1–20; beyond 100 the softened distributions are
#: uniform to within the logits' own precision, so nothing is lost by refusing them.
MAX_TEMPERATURE = 100.0


def check_temperature(name: str, value) -> float:
    """A temperature: a finite real number in (0, MAX_TEMPERATURE]."""
    value = check_positive(name, value)
    if value > MAX_TEMPERATURE:
        raise ValueError(f"{name} must be in (0, {MAX_TEMPERATURE:g}] (fp32 loses the KD loss to cancellation "
                         f"beyond it), got {value:g}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` must be True or False (not a truthy stand-in such as 1 or "yes")."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_nonnegative(name: str, value) -> float:
    """A finite real number >= 0 (loss weights)."""
    value = _number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_regularization(regularization) -> str:
    if regularization not in REGULARIZATIONS:
        raise ValueError(f"regularization must be 'l2' or 'kl', got {regularization!r}")
    return regularization


def check_correlation_length(name: str, length: int, what: str) -> None:
    """A Pearson/Spearman correlation needs at least two elements to be defined."""
    if length < 2:
        raise ValueError(f"{name}: a correlation over {what} needs at least 2 elements, got {length}")


def check_finite(**tensors) -> None:
    """Raise if any named tensor holds NaN or Inf (costs one device sync per tensor).

    Inside ``torch.compile`` the check becomes an asynchronous device assertion.
    """
    for name, x in tensors.items():
        if x is None:
            continue
        if torch.compiler.is_compiling():
            torch._assert_async(torch.isfinite(x).all(), f"{name} contains NaN or Inf values (check_finite=True)")
        elif not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf values (check_finite=True)")


def check_fused_arguments(where: str, student, teacher, target, difficulty, temperature: float,
                          rank_strength: float, difficulty_mode: int, ce_coef: float, column_coef: float,
                          rectify: bool, teacher_indices=None, teacher_fill=None, teacher_grad: bool = False) -> None:
    """What every fused-loss operator (``kdfast::fused_kd_loss`` on CUDA, the Triton one)
    checks before it launches, as the CPU operator does: the kernels index with these
    sizes and trust these invariants. ``where`` names the operator in the messages.

    A sparse teacher (``teacher_indices`` given): ``teacher`` holds each row's k float32
    logits, ``teacher_indices`` their int32 classes, ``teacher_fill`` the float32 logit of
    every other class. Its indices' range and order are the caller's
    (:meth:`kdfast.sparse_teacher.SparseTeacher.kernel_arguments`): checking them here
    would cost a device sync; the GPU kernels never index memory with them."""
    if student.dim() != 2:
        raise ValueError(f"{where}: student must be [B, C], got {tuple(student.shape)}")
    if teacher_indices is None and teacher.shape != student.shape:
        raise ValueError(f"{where}: student and teacher must be [B, C] of one shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    rows, classes = student.shape
    if rows == 0 or classes == 0:
        raise ValueError(f"{where}: the logits must have at least one row and one class, got {tuple(student.shape)}")
    if teacher_indices is not None:
        if teacher_fill is None:
            raise ValueError(f"{where}: a sparse teacher needs teacher_fill")
        if (teacher.dtype, teacher_indices.dtype, teacher_fill.dtype) != (torch.float32, torch.int32, torch.float32):
            raise ValueError(f"{where}: a sparse teacher is float32 values, int32 teacher_indices and float32 "
                             f"teacher_fill, got {teacher.dtype}, {teacher_indices.dtype}, {teacher_fill.dtype}")
        if (teacher.dim() != 2 or teacher.shape[0] != rows or not 1 <= teacher.shape[1] <= classes
                or teacher_indices.shape != teacher.shape or tuple(teacher_fill.shape) != (rows,)):
            raise ValueError(f"{where}: a sparse teacher needs values and teacher_indices [B, k] with 1 <= k <= C "
                             f"and teacher_fill [B] for student {tuple(student.shape)}, got {tuple(teacher.shape)}, "
                             f"{tuple(teacher_indices.shape)}, {tuple(teacher_fill.shape)}")
        if teacher_grad:
            raise ValueError(f"{where}: a sparse teacher has no gradient (teacher_grad must be False)")
        for name, x in (("teacher_indices", teacher_indices), ("teacher_fill", teacher_fill)):
            if x.device != student.device:
                raise ValueError(f"{where}: {name} must be on {student.device}, got {x.device}")
    for name, x in (("teacher", teacher), ("target", target), ("difficulty", difficulty)):
        if x is not None and x.device != student.device:
            raise ValueError(f"{where}: {name} must be on {student.device}, got {x.device}")
    for name, x in (("target", target), ("difficulty", difficulty)):
        if x is not None and tuple(x.shape) != (rows,):
            raise ValueError(f"{where}: {name} must have shape ({rows},), got {tuple(x.shape)}")
    if not (0 < temperature <= MAX_TEMPERATURE and rank_strength > 0):
        raise ValueError(f"{where}: temperature must be in (0, {MAX_TEMPERATURE:g}] and rank_strength > 0, got "
                         f"{temperature} and {rank_strength}")
    if difficulty_mode not in (0, 1, 2):
        raise ValueError(f"{where}: difficulty_mode must be 0 (constant), 1 (entropy) or 2 (per sample), "
                         f"got {difficulty_mode}")
    if difficulty_mode == 2 and difficulty is None:
        raise ValueError(f"{where}: per-sample difficulty (difficulty_mode=2) needs the difficulty tensor")
    if rectify and column_coef != 0:
        raise ValueError(f"{where}: rectification does not combine with the column term")
    if (ce_coef != 0 or rectify) and target is None:
        raise ValueError(f"{where}: the CE term and rectification need a target")
