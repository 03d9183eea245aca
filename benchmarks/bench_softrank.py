"""Soft rank / soft sort: kdfast (C++ PAV, parallel over rows) against torchsort.

Times forward and forward+backward for a sweep of row lengths, and the row sort alone
that both start with, and appends the rows to benchmarks/results/softrank.csv. Usage:

    python benchmarks/bench_softrank.py [--batch 256] [--sizes 100 1000 10000] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch
from common import append_rows, device_name, measure_ms

import kdfast


def providers():
    found = {"kdfast": {"rank": kdfast.soft_rank, "sort": kdfast.soft_sort}}
    try:
        import torchsort

        found["torchsort"] = {"rank": torchsort.soft_rank, "sort": torchsort.soft_sort}
    except ImportError:
        print("torchsort is not installed: timing kdfast alone")
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for n in args.sizes:
        x = torch.randn(args.batch, n, device=device)
        # The sort every soft rank/sort starts with: the floor of a sort-based reference.
        timing = measure_ms(lambda: x.sort(dim=1, descending=True, stable=True), device, reps=args.reps)
        rows.append({"op": "sort", "provider": "torch", "regularization": "", "mode": "forward", "B": args.batch,
                     "n": n, "dtype": "float32", **timing, "device": device_name(device)})
        print(f"torch.sort (stable)              n={n:6d} median {timing['median_ms']:8.3f} ms")
        for provider, ops in providers().items():
            for op, fn in ops.items():
                for regularization in ("l2", "kl"):
                    leaf = x.clone().requires_grad_()
                    grad = torch.randn_like(x)

                    def forward():
                        with torch.no_grad():
                            fn(x, regularization, 0.1)

                    def forward_backward():
                        fn(leaf, regularization, 0.1).backward(grad)

                    for mode, run in (("forward", forward), ("forward+backward", forward_backward)):
                        timing = measure_ms(run, device, reps=args.reps)
                        rows.append({"op": f"soft_{op}", "provider": provider, "regularization": regularization,
                                     "mode": mode, "B": args.batch, "n": n, "dtype": "float32", **timing,
                                     "device": device_name(device)})
                        print(f"soft_{op:4s} {regularization} {provider:9s} {mode:16s} n={n:6d} "
                              f"median {timing['median_ms']:8.3f} ms  [{timing['q20_ms']:.3f}, {timing['q80_ms']:.3f}]")
    print("appended to", append_rows("softrank.csv", rows))


if __name__ == "__main__":
    main()
