"""How the soft-rank strength ε of the Spearman terms trades fidelity against gradients.

For ε = κ / C and teacher-like logits (a Gaussian background with one confident class,
and a heavy-tailed log-normal variant), prints per κ and C: the share of the soft ranks
that carry a gradient (entries of ẑ with a non-zero gradient through the soft ranks; hard
ranks carry none), and the gap between the soft Spearman correlation and scipy's hard one. This is the measurement behind the default ε = 2 / C
(docs/losses.md, "Choice of ε"; its table is generated from benchmarks/results/spearman_strength.csv).
Usage: python benchmarks/spearman_strength.py
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr

from kdfast import average_ranks, reference, soft_rank


def teacher_like(kind: str, batch: int, classes: int, generator: torch.Generator):
    if kind == "gaussian":
        teacher = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * 2.0
        target = torch.randint(0, classes, (batch,), generator=generator)
        teacher[torch.arange(batch), target] += 10.0
    else:  # log-normal: skewed, heavy-tailed logits
        teacher = torch.exp(torch.randn(batch, classes, generator=generator, dtype=torch.float64)) * 3.0
    noise = torch.randn(batch, classes, generator=generator, dtype=torch.float64)
    return teacher + 0.7 * teacher.std(dim=1, keepdim=True) * noise, teacher


def main(argv=None):
    import argparse
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import append_rows, device_name

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="spearman_strength.csv",
                        help="CSV under benchmarks/results/ ('' to only print)")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'logits':9s} {'C':>6s} " + " ".join(f"{'k=' + str(k):>22s}" for k in (0.5, 1, 2, 3)))
    print(f"{'':16s} " + " ".join(f"{'grad share, |soft-hard|':>22s}" for _ in range(4)))
    for kind in ("gaussian", "lognormal"):
        for classes in (10, 100, 1000, 10000):
            generator = torch.Generator().manual_seed(classes)
            student, teacher = teacher_like(kind, 64, classes, generator)
            hard = np.mean([spearmanr(a, b).statistic for a, b in zip(student.numpy(), teacher.numpy())])
            cells = []
            for kappa in (0.5, 1, 2, 3):
                z = reference.standardize_rows(student).requires_grad_()
                ranks = soft_rank(z, "l2", kappa / classes)
                soft = reference.pearson(ranks, average_ranks(teacher)).mean()
                soft.backward()
                share = (z.grad != 0).double().mean().item()
                cells.append(f"{share:10.2f}, {abs(soft.item() - hard):9.4f}")
                rows.append({"logits": kind, "classes": classes, "kappa": kappa, "gradient_share": round(share, 4),
                             "soft_hard_gap": f"{abs(soft.item() - hard):.6f}", "device": device_name("cpu")})
            print(f"{kind:9s} {classes:6d} " + " ".join(f"{c:>22s}" for c in cells))
    if args.output:
        print("appended to", append_rows(args.output, rows))


if __name__ == "__main__":
    main()
