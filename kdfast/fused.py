"""The fused backends (``cpu``, ``cuda``): every loss as one call of ``kdfast::fused_kd_loss``.

All kdfast losses are settings of one generic loss (csrc/losses.h)::

    L = (1/B) Σ_i ℓ_i + column · (1 − (1/C) Σ_c ρ(p_:,c, q_:,c))
    ℓ_i = kl·KL(q_i‖p_i) + ce·CE(s_i, y_i) + pearson·(1−d_i)(1−ρ(p_i,q_i)) + spearman·d_i·(1−ρ_S,i)
          + tckd·KL(b̂_i‖b_i) + nckd·KL(q̃_i‖p̃_i)

(DKD's terms: ``b`` the target / non-target split of ``p``, ``p̃`` the non-target classes
renormalized), with p = softmax(z_s/τ), q = softmax(z_t/τ), where z are the logits or, with
``standardize``, their rows z-scored (logit standardization; CE keeps the raw logits).

The operator computes L and, in the same pass over each row, dL/ds (and dL/dt when the
teacher requires grad); backward only scales those saved gradients by ``grad_output``,
in place unless the graph is retained for another backward.
The operator has a CPU kernel (csrc/losses_cpu.cpp) and, when kdfast was built with
nvcc, CUDA kernels (csrc/cuda/, module ``kdfast._C_cuda``), registered below for the
CUDA dispatch key; its fake implementation lets ``torch.compile`` trace it.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch.autograd.function import once_differentiable

from kdfast import _checks, _ops
from kdfast.sparse_teacher import SparseTeacher

#: dtypes the fused kernels read (they accumulate in fp32); fp64 runs on the reference.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # kdfast::cuda::LogitType

try:
    from kdfast import _C_cuda
except ImportError as error:
    _C_cuda = None
    #: Why the CUDA kernels cannot be used, or None when they were compiled.
    CUDA_BUILD_ERROR: str | None = (
        f"not compiled: kdfast was built without nvcc ({error}); reinstall with nvcc on PATH or KDFAST_CUDA=1"
    )
else:
    CUDA_BUILD_ERROR = None

DIFFICULTY_CONSTANT, DIFFICULTY_ENTROPY, DIFFICULTY_PER_SAMPLE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    """Coefficients of the generic loss (τ² already folded in) and its options."""

    temperature: float = 1.0
    kl: float = 0.0
    ce: float = 0.0
    pearson: float = 0.0
    spearman: float = 0.0
    column: float = 0.0
    rank_strength: float = 1.0
    difficulty_mode: int = DIFFICULTY_CONSTANT
    difficulty_value: float = 0.0
    rectify: bool = False
    tckd: float = 0.0
    nckd: float = 0.0
    standardize: bool = False

    def op_arguments(self) -> tuple:
        """The operator's arguments from ``temperature`` to ``rectify``."""
        return (self.temperature, self.kl, self.ce, self.pearson, self.spearman, self.column,
                self.rank_strength, self.difficulty_mode, self.difficulty_value, self.rectify)

    def trailing_arguments(self) -> tuple:
        """The operator's arguments after ``teacher_fill``."""
        return self.tckd, self.nckd, self.standardize


if _ops.EXTENSION_ERROR is None:

    @torch.library.register_fake("kdfast::fused_kd_loss")
    def _fused_kd_loss_fake(student, teacher, target, difficulty, temperature, kl_coef, ce_coef, pearson_coef,
                            spearman_coef, column_coef, rank_strength, difficulty_mode, difficulty_value, rectify,
                            student_grad, teacher_grad, teacher_indices=None, teacher_fill=None, tckd_coef=0.0,
                            nckd_coef=0.0, standardize=False):
        loss = student.new_empty((), dtype=torch.float32)
        grad_student = torch.empty_like(student) if student_grad else student.new_empty((0,))
        grad_teacher = torch.empty_like(teacher) if teacher_grad else teacher.new_empty((0,))
        return loss, grad_student, grad_teacher


def _fused_kd_loss_cuda(student, teacher, target, difficulty, temperature, kl_coef, ce_coef, pearson_coef,
                        spearman_coef, column_coef, rank_strength, difficulty_mode, difficulty_value, rectify,
                        student_grad, teacher_grad, teacher_indices=None, teacher_fill=None, tckd_coef=0.0,
                        nckd_coef=0.0, standardize=False):
    """CUDA implementation of kdfast::fused_kd_loss: allocates the outputs and workspace with
    PyTorch's caching allocator and launches csrc/cuda/ on the current stream.

    A sparse teacher (``teacher_indices`` given, as SparseTeacher.kernel_arguments makes
    them): ``teacher`` is its float32 values [B, k], ``teacher_indices`` their int32 classes
    [B, k] (ascending within a row), ``teacher_fill`` the float32 logit [B] of every other
    class; the kernels rebuild each row where they read it (no dense B×C teacher), with the
    dense teacher's workspace.

    DKD (``tckd_coef``, ``nckd_coef``: need a target and C >= 2) and logit standardization
    (``standardize``: C >= 2; its workspace holds the standardized rows) reach the kernels
    through the LossConfig."""
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dtype not in _DTYPE_CODES:
            raise TypeError(f"kdfast fused loss (cuda): {name} must be float32, float16 or bfloat16, got {x.dtype}")
    _checks.check_fused_arguments("kdfast fused loss (cuda)", student, teacher, target, difficulty, temperature,
                                  rank_strength, difficulty_mode, ce_coef, column_coef, rectify, teacher_indices,
                                  teacher_fill, teacher_grad)
    dkd = tckd_coef != 0 or nckd_coef != 0
    if dkd and target is None:
        raise ValueError("kdfast fused loss (cuda): the DKD terms need a target")
    if (dkd or standardize) and student.shape[1] < 2:
        raise ValueError("kdfast fused loss (cuda): the DKD terms and logit standardization need at least 2 classes, "
                         f"got {student.shape[1]}")
    student, teacher = student.contiguous(), teacher.contiguous()
    sparse = teacher_indices is not None
    if sparse:
        teacher_indices, teacher_fill = teacher_indices.contiguous(), teacher_fill.contiguous()
    rows, cols = student.shape
    device = student.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    config = _C_cuda.LossConfig()
    config.inv_temperature = 1.0 / temperature
    config.kl_coef, config.ce_coef, config.pearson_coef = kl_coef, ce_coef, pearson_coef
    config.spearman_coef, config.column_coef, config.rank_strength = spearman_coef, column_coef, rank_strength
    config.difficulty_mode, config.difficulty_value, config.rectify = difficulty_mode, difficulty_value, rectify
    config.student_grad, config.teacher_grad = student_grad, teacher_grad
    config.tckd_coef, config.nckd_coef, config.standardize = tckd_coef, nckd_coef, bool(standardize)
    loss = torch.empty((), dtype=torch.float32, device=device)
    grad_student = torch.empty_like(student) if student_grad else student.new_empty((0,))
    grad_teacher = torch.empty_like(teacher) if teacher_grad else teacher.new_empty((0,))
    target = None if target is None else target.long().contiguous()
    difficulty = None if difficulty is None else difficulty.float().contiguous()

    def pointer(x):
        return 0 if x is None or x.numel() == 0 else x.data_ptr()

    # The launcher selects the tensors' device in the CUDA runtime it links statically; that
    # is the driver's current context, shared with PyTorch's runtime, so the guard also
    # restores PyTorch's current device afterwards.
    with torch.cuda.device(device):
        workspace = torch.empty(_C_cuda.fused_loss_workspace_bytes(rows, cols, config, index), dtype=torch.uint8,
                                device=device)
        _C_cuda.fused_loss(pointer(student), _DTYPE_CODES[student.dtype], pointer(teacher),
                           _DTYPE_CODES[teacher.dtype], pointer(target), pointer(difficulty), rows, cols, config,
                           pointer(loss), pointer(grad_student), pointer(grad_teacher), pointer(workspace), index,
                           torch.cuda.current_stream(device).cuda_stream,
                           teacher_indices=pointer(teacher_indices) if sparse else 0,
                           teacher_fill=pointer(teacher_fill) if sparse else 0,
                           teacher_k=teacher.shape[1] if sparse else 0)
    return loss, grad_student, grad_teacher


if _C_cuda is not None and _ops.EXTENSION_ERROR is None:
    torch.library.impl("kdfast::fused_kd_loss", "CUDA", _fused_kd_loss_cuda)


#: The oldest Linux driver of each CUDA major version (CUDA's release notes, "CUDA Toolkit
#: and Corresponding Driver Versions"); within a major version, minor version compatibility
#: lets any of them run a statically linked runtime of that major version.
MINIMUM_DRIVERS = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


def driver_problem(runtime_version: int, driver_version: int) -> str | None:
    """Why a runtime of CUDA ``runtime_version`` cannot run on a driver that supports CUDA
    ``driver_version`` (both as 1000·major + 10·minor; 0: no driver), or None.

    kdfast._C_cuda links the CUDA runtime statically, so it needs a driver of at least
    the runtime's major version, whatever CUDA build of PyTorch is installed.
    """
    major, minor = divmod(runtime_version, 1000)
    if driver_version // 1000 >= major:
        return None
    needed = MINIMUM_DRIVERS.get(major, f"one supporting CUDA {major}.0")
    found = "no NVIDIA driver" if driver_version <= 0 else (
        f"a driver that supports CUDA {driver_version // 1000}.{driver_version % 1000 // 10} at most")
    return (f"the CUDA kernels were built with CUDA {major}.{minor // 10}, which needs an NVIDIA driver >= {needed}; "
            f"this machine has {found}. KDFAST_BACKEND=triton (or torch) runs without them; or rebuild kdfast "
            "with an older CUDA toolkit (nvcc) on PATH")


@functools.lru_cache(maxsize=None)
def _driver_problem_here() -> str | None:
    return driver_problem(_C_cuda.cuda_runtime_version(), _C_cuda.cuda_driver_version())


def cuda_unavailable() -> str | None:
    """Why the CUDA kernels cannot run here, or None."""
    if _ops.EXTENSION_ERROR is not None:
        return _ops.EXTENSION_ERROR
    if CUDA_BUILD_ERROR is not None:
        return CUDA_BUILD_ERROR
    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    return _driver_problem_here()


class _FusedLoss(torch.autograd.Function):
    """Runs a fused-loss operator (same schema as kdfast::fused_kd_loss) in forward, which
    returns the loss and the gradients; backward only scales those by grad_output."""

    @staticmethod
    def forward(ctx, student, teacher, target, difficulty, config: FusedConfig, op, teacher_indices=None,
                teacher_fill=None):
        student_grad, teacher_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_student, grad_teacher = op(
            student, teacher, target, difficulty, *config.op_arguments(), student_grad, teacher_grad, teacher_indices,
            teacher_fill, *config.trailing_arguments()
        )
        ctx.save_for_backward(grad_student, grad_teacher)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_student, grad_teacher = ctx.saved_tensors
        student_grad, teacher_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        in_place = not _graph_is_kept()
        return (
            _scaled(grad_student, grad_output, in_place) if student_grad else None,
            _scaled(grad_teacher, grad_output, in_place) if teacher_grad else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``): then a later
    backward reads the saved gradients again and they must stay as forward left them. Under
    torch.compile, or outside a graph task, assume it does."""
    if torch.compiler.is_compiling():
        return True
    try:
        return torch._C._autograd._get_current_graph_task_keep_graph()
    except (AttributeError, RuntimeError):
        return True


def _scaled(grad: torch.Tensor, grad_output: torch.Tensor, in_place: bool) -> torch.Tensor:
    """The saved gradient times ``grad_output``: scaled in place (no second B×C tensor, no
    host sync) unless the graph is kept for another backward; on the CPU, the saved tensor
    itself when ``grad_output`` is 1 (reading a CPU scalar costs no device sync)."""
    if grad_output.device.type == "cpu" and not torch.compiler.is_compiling() and grad_output.item() == 1.0:
        return grad
    return grad.mul_(grad_output) if in_place else grad * grad_output


def losses_for(op) -> dict:
    """Every public loss as a setting of the fused operator ``op`` (a callable with the
    schema of kdfast::fused_kd_loss), keyed by the loss's name; the implementations a
    fused backend registers in kdfast.dispatch."""

    def run(student, teacher, target, difficulty, config: FusedConfig, ranks_only: bool = False):
        if target is not None and target.dtype != torch.long:
            target = target.long()
        if isinstance(teacher, SparseTeacher):
            # The operator rebuilds each teacher row from its k logits and the fill logit
            # (at τ; below the top k for the rank-only Spearman loss).
            values, indices, fill = teacher.kernel_arguments(None if ranks_only else config.temperature)
            return _FusedLoss.apply(student, values, target, difficulty, config, op, indices, fill)
        return _FusedLoss.apply(student, teacher, target, difficulty, config, op)

    def kd_loss(student, teacher, temperature, standardize=False):
        return run(student, teacher, None, None, FusedConfig(temperature, kl=temperature**2, standardize=standardize))

    def pearson_loss(student, teacher, temperature, dim):
        weight = {"pearson": temperature**2} if dim == 1 else {"column": temperature**2}
        return run(student, teacher, None, None, FusedConfig(temperature, **weight))

    def dist_loss(student, teacher, temperature, beta, gamma, standardize=False):
        config = FusedConfig(temperature, pearson=beta * temperature**2, column=gamma * temperature**2,
                             standardize=standardize)
        return run(student, teacher, None, None, config)

    def spearman_loss(student, teacher, regularization_strength):
        config = FusedConfig(spearman=1.0, rank_strength=regularization_strength, difficulty_value=1.0)
        return run(student, teacher, None, None, config, ranks_only=True)

    def cmkd_loss(student, teacher, target, temperature, kl_weight, corr_weight, ce_weight, difficulty,
                  regularization_strength, standardize=False):
        # difficulty: None (entropy weighting), a float (fixed), or a [B] tensor (no gradient).
        per_sample = None
        if difficulty is None:
            mode, value = DIFFICULTY_ENTROPY, 0.0
        elif isinstance(difficulty, torch.Tensor):
            mode, value = DIFFICULTY_PER_SAMPLE, 0.0
            per_sample = difficulty.detach().float().contiguous()
        else:
            mode, value = DIFFICULTY_CONSTANT, float(difficulty)
        tau2 = temperature**2
        config = FusedConfig(temperature, kl=kl_weight * tau2, ce=ce_weight if target is not None else 0.0,
                             pearson=corr_weight * tau2, spearman=corr_weight * tau2,
                             rank_strength=regularization_strength, difficulty_mode=mode, difficulty_value=value,
                             standardize=standardize)
        return run(student, teacher, target, per_sample, config)

    def drkd_loss(student, teacher, target, temperature, ce_weight, standardize=False):
        config = FusedConfig(temperature, kl=temperature**2, ce=ce_weight, rectify=True, standardize=standardize)
        return run(student, teacher, target, None, config)

    def dkd_loss(student, teacher, target, alpha, beta, temperature, standardize=False):
        tau2 = temperature**2
        config = FusedConfig(temperature, tckd=alpha * tau2, nckd=beta * tau2, standardize=standardize)
        return run(student, teacher, target, None, config)

    return {
        "kd_loss": kd_loss,
        "pearson_loss": pearson_loss,
        "dist_loss": dist_loss,
        "spearman_loss": spearman_loss,
        "cmkd_loss": cmkd_loss,
        "drkd_loss": drkd_loss,
        "dkd_loss": dkd_loss,
    }


#: The cpu and cuda backends: torch.ops.kdfast.fused_kd_loss dispatches on the device
#: (looked up at call time, so that it can be observed in tests).
OPS = losses_for(lambda *args: torch.ops.kdfast.fused_kd_loss(*args))

try:  # registers torch.ops.kdfast.fused_kd_loss_triton and gate_compact_triton
    from kdfast.kernels import gate as _triton_gate  # noqa: F401
    from kdfast.kernels import kd_losses as _triton_kernels  # noqa: F401
except ImportError as error:
    #: Why the Triton kernels cannot be used, or None.
    TRITON_IMPORT_ERROR: str | None = f"Triton is not importable ({error})"
else:
    TRITON_IMPORT_ERROR = None

#: The triton backend.
TRITON_OPS = losses_for(lambda *args: torch.ops.kdfast.fused_kd_loss_triton(*args))


def triton_interpreted() -> bool:
    """Whether Triton runs through its CPU interpreter (TRITON_INTERPRET=1, read at import)."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable() -> str | None:
    """Why the Triton kernels cannot run here, or None."""
    if TRITON_IMPORT_ERROR is not None:
        return TRITON_IMPORT_ERROR
    if not torch.cuda.is_available() and not triton_interpreted():
        return "no CUDA GPU: torch.cuda.is_available() is False (set TRITON_INTERPRET=1 to run them on the CPU)"
    return None
