"""Triton kernels of kdfast, installed as ``kdfast.kernels`` (one module per op family).

* :mod:`kdfast.kernels.kd_losses`: the fused KD loss (every loss of kdfast) and its
  operator ``torch.ops.kdfast.fused_kd_loss_triton``;
* :mod:`kdfast.kernels.gate`: ResKD's gate-and-compact (``torch.ops.kdfast.gate_compact_triton``).
"""
