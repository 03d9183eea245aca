"""kdfast: knowledge-distillation losses with exact gradients, soft ranks and fused kernels.

Functional API (each loss takes ``backend=None`` and ``check_finite=False``):

* :func:`kd_loss`, :func:`pearson_loss`, :func:`dist_loss`, :func:`spearman_loss`,
  :func:`cmkd_loss`, :func:`drkd_loss`, :func:`dkd_loss`, :func:`rectify`;
* :func:`soft_rank`, :func:`soft_sort` (torchsort conventions), :func:`average_ranks`;
* :func:`backends` reports which backends can run and why not;
* :class:`SparseTeacher`: a cached top-k teacher, accepted by every loss in place of the
  teacher logits; :func:`combine_teachers`: several teachers' logits as one.

Modules live in :mod:`kdfast.nn`.
"""

from kdfast import nn
from kdfast.dispatch import BackendUnavailableError, backends
from kdfast.losses import (
    cmkd_loss,
    default_spearman_strength,
    dist_loss,
    dkd_loss,
    drkd_loss,
    kd_loss,
    pearson_loss,
    rectify,
    spearman_loss,
)
from kdfast.softrank import average_ranks, soft_rank, soft_sort
from kdfast.sparse_teacher import SparseTeacher
from kdfast.teachers import combine_teachers

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "SparseTeacher",
    "average_ranks",
    "backends",
    "cmkd_loss",
    "combine_teachers",
    "default_spearman_strength",
    "dist_loss",
    "dkd_loss",
    "drkd_loss",
    "kd_loss",
    "nn",
    "pearson_loss",
    "rectify",
    "soft_rank",
    "soft_sort",
    "spearman_loss",
]
