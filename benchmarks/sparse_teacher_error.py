"""How far a cached top-k teacher moves each loss from the dense teacher, at C = 1000.

    python benchmarks/sparse_teacher_error.py [--batches 5] [--batch-size 256]

For k ∈ {5, 10, 50, 100, 1000} the loss and its student gradient with a
:class:`kdfast.sparse_teacher.SparseTeacher` (the top k logits plus the full rows'
log-sum-exp: the uniform remainder, module doc of kdfast/sparse_teacher.py) are compared with
the same loss on the dense teacher logits: relative loss error ``|L_k − L| / |L|`` and relative
gradient error ``‖g_k − g‖ / ‖g‖``, medians over batches. Writes
``benchmarks/results/sparse_teacher_error.csv`` (device, commit, date on every row);
``benchmarks/readme_tables.py`` puts its table in the README.

The logits are synthetic and ImageNet-like (no model can be downloaded here): 1000 classes
in 100 super-classes of 10 (prototypes = super-class center + a smaller offset), a sample's
feature its class prototype plus noise, logits the scaled prototype similarities. The
teacher's scale and noise are set so that it is right on ~80 % of the samples with a mean
top-1 probability of about 0.65 at τ = 1 (a ResNet-34 on ImageNet val: 73 %, ~0.7); the
mass outside its top 5 is ~10 %, outside its top 100 ~0.4 %. The student is a noisier,
flatter view of the same classes.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kdfast  # noqa: E402
from common import append_rows, device_name  # noqa: E402
from kdfast.sparse_teacher import SparseTeacher  # noqa: E402

CLASSES, GROUPS, DIM = 1000, 100, 64
TOP_K = (5, 10, 50, 100, 1000)
TEMPERATURES = (1.0, 4.0)
LOSSES = {
    "kd_loss (τ=4)": lambda s, t: kdfast.kd_loss(s, t, 4.0, backend="cpu"),
    "kd_loss (τ=1)": lambda s, t: kdfast.kd_loss(s, t, 1.0, backend="cpu"),
    "dist_loss (τ=1)": lambda s, t: kdfast.dist_loss(s, t, 1.0, backend="cpu"),
    "cmkd_loss (τ=4)": lambda s, t: kdfast.cmkd_loss(s, t, None, 4.0, backend="cpu"),
    "spearman_loss": lambda s, t: kdfast.spearman_loss(s, t, backend="cpu"),
}


def imagenet_like(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) logits [batch, 1000] of samples from random classes (module doc)."""
    centers = torch.randn(GROUPS, DIM, generator=generator)
    prototypes = centers.repeat_interleave(CLASSES // GROUPS, 0) + 0.6 * torch.randn(CLASSES, DIM,
                                                                                      generator=generator)
    prototypes = prototypes / prototypes.norm(dim=1, keepdim=True)
    labels = torch.randint(0, CLASSES, (batch,), generator=generator)
    features = prototypes[labels] + 0.2 * torch.randn(batch, DIM, generator=generator)
    similarity = features @ prototypes.T
    teacher = 16.0 * similarity
    student = 10.0 * (similarity + 0.1 * torch.randn(batch, CLASSES, generator=generator))
    return teacher, student


def sparse_of(teacher: torch.Tensor, k: int) -> SparseTeacher:
    top = teacher.topk(k, dim=1)
    lse = torch.stack([torch.logsumexp(teacher.double() / t, dim=1).float() for t in TEMPERATURES], 1)
    return SparseTeacher(top.indices, top.values, lse, TEMPERATURES, teacher.shape[1])


def loss_and_grad(fn, student: torch.Tensor, teacher) -> tuple[float, torch.Tensor]:
    student = student.clone().requires_grad_(True)
    loss = fn(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)
    return float(loss.detach()), grad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--output", default="sparse_teacher_error.csv")
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    batches = [imagenet_like(args.batch_size, generator) for _ in range(args.batches)]
    top1 = torch.cat([(t.softmax(1).max(1).values) for t, _ in batches]).mean()
    errors: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for teacher, student in batches:
        for name, fn in LOSSES.items():
            dense_loss, dense_grad = loss_and_grad(fn, student, teacher)
            for k in TOP_K:
                loss, grad = loss_and_grad(fn, student, sparse_of(teacher, k))
                errors.setdefault((name, k), []).append(
                    (abs(loss - dense_loss) / abs(dense_loss), float((grad - dense_grad).norm() / dense_grad.norm())))
    def tail_mass(k: int, tau: float) -> float:
        """The mean probability mass outside the teacher's top k at temperature tau."""
        return float(torch.cat([1 - (t / tau).softmax(1).topk(k, 1).values.sum(1) for t, _ in batches]).mean())
    rows = []
    for (name, k), pairs in errors.items():
        losses = sorted(p[0] for p in pairs)
        grads = sorted(p[1] for p in pairs)
        rows.append({"loss": name, "k": k, "classes": CLASSES, "batch": args.batch_size, "batches": args.batches,
                     "teacher_top1_probability": f"{float(top1):.3f}", "tail_mass_tau_1": f"{max(0.0, tail_mass(k, 1.0)):.4f}",
                     "tail_mass_tau_4": f"{max(0.0, tail_mass(k, 4.0)):.4f}",
                     "loss_rel_error_median": f"{losses[len(losses) // 2]:.3e}",
                     "grad_rel_error_median": f"{grads[len(grads) // 2]:.3e}",
                     "device": device_name(torch.device("cpu"))})
    path = append_rows(args.output, rows)
    print(f"teacher mean top-1 probability {float(top1):.3f}; wrote {len(rows)} rows to {path}")
    for row in rows:
        print(f"{row['loss']:>16} k={row['k']:>4}: loss {row['loss_rel_error_median']}, "
              f"grad {row['grad_rel_error_median']} (tail mass τ=1 {row['tail_mass_tau_1']}, τ=4 {row['tail_mass_tau_4']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
