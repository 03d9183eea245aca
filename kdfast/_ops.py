"""Access to the compiled operators of ``kdfast._C`` (registered as ``torch.ops.kdfast.*``).

Importing this module loads the extension and registers a fake (meta) implementation for
each operator, so that ``torch.compile`` can trace through them without graph breaks.
If the extension is missing (kdfast was not built), the import of kdfast still works and
:data:`EXTENSION_ERROR` says why; functions that need it raise with that reason.
"""

from __future__ import annotations

import torch

try:
    from kdfast import _C  # noqa: F401  (registers torch.ops.kdfast.*)

    EXTENSION_ERROR: str | None = None
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    EXTENSION_ERROR = (
        f"the compiled extension kdfast._C could not be imported ({error}); "
        "rebuild it with `pip install --no-build-isolation -e .` (or `make test`)"
    )


def require_extension() -> None:
    if EXTENSION_ERROR is not None:
        raise RuntimeError(EXTENSION_ERROR)


if EXTENSION_ERROR is None:

    @torch.library.register_fake("kdfast::isotonic")
    def _isotonic_fake(y, w, regularization):
        return torch.empty_like(y)

    @torch.library.register_fake("kdfast::isotonic_vjp")
    def _isotonic_vjp_fake(sol, s, grad, regularization):
        return torch.empty_like(sol)


def _on_cpu(op, *tensors, regularization: str) -> torch.Tensor:
    # The isotonic operators are CPU kernels. The torch reference backend still accepts
    # tensors on other devices by a round trip through host memory: correct, but slow;
    # the fused GPU backends do not go through here.
    device = tensors[0].device
    if device.type == "cpu":
        return op(*tensors, regularization)
    return op(*(t.cpu() for t in tensors), regularization).to(device)


def isotonic(y: torch.Tensor, w: torch.Tensor, regularization: str) -> torch.Tensor:
    """Row-wise decreasing isotonic regression ([B, n] float32/float64), see csrc/isotonic.cpp.

    ``l2``: argmin over v_1 >= ... >= v_n of 1/2 ||v - (y - w)||^2;
    ``kl``: argmin of <exp(y - v), 1> + <exp(w), v>.
    """
    require_extension()
    return _on_cpu(torch.ops.kdfast.isotonic, y, w, regularization=regularization)


def isotonic_vjp(sol: torch.Tensor, s: torch.Tensor, grad: torch.Tensor, regularization: str) -> torch.Tensor:
    """Vector-Jacobian product of :func:`isotonic` with respect to its first argument.

    ``l2``: block means of ``grad``; ``kl``: ``softmax(s_B) * sum(grad_B)`` on each block,
    where ``s`` is the argument whose block log-sum-exp the solution depends on.
    """
    require_extension()
    return _on_cpu(torch.ops.kdfast.isotonic_vjp, sol, s, grad, regularization=regularization)
