"""Wall-clock of gated vs full-chain ResKD inference, against what the FLOPs promise.

Reads the seed-0 chain that ``kdfast reskd demo`` trains (``--run``, default runs/reskd; the demo
is run first when it is missing) and times, on the digits validation images (tiled
``--tile`` times into one batch, so that per-layer overheads do not hide the work):

  full     chain(x): every stage on every row (the full chain)
  gated    chain.infer(x, θ): the base on all rows, each res-student on the compacted rows
           the gate lets through (kdfast.gate.gate_compact, --backend)

for the calibrated thresholds of the demo's two folds and a grid of shared thresholds.
Reported per threshold: median and 20/80 % quantiles of both (common.measure_ms), the
FLOPs fraction (torch.utils.flop_counter, per stage, weighted by the rows that ran it),
the promised speed-up 1 / fraction, the measured one (the median of full/gated over
pairs of runs taken alternately), and their ratio (target ≥ 0.7),
with top-1 of both. Also the gate alone on the base's logits. Rows go to
benchmarks/results/reskd.csv.

  python benchmarks/bench_reskd.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import append_rows, device_name, measure_ms  # noqa: E402

from kdfast.data import make_loader  # noqa: E402
from kdfast.gate import gate_compact  # noqa: E402
from kdfast.reskd import load_chain, stage_flops  # noqa: E402
from kdfast.reskd_demo import demo  # noqa: E402


def paired_times(full_fn, gated_fn, reps: int, warmup: int = 5) -> tuple[list[float], list[float]]:
    """Milliseconds of ``full_fn`` and ``gated_fn`` run alternately (CPU), so that both see the
    same machine state: on a shared machine, drift between two separate series would
    otherwise dominate their ratio."""
    for _ in range(warmup):
        full_fn(), gated_fn()
    full, gated = [], []
    for _ in range(reps):
        for fn, out in ((full_fn, full), (gated_fn, gated)):
            begin = time.perf_counter()
            fn()
            out.append((time.perf_counter() - begin) * 1e3)
    return full, gated


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(median, 20 %, 80 %)."""
    q = statistics.quantiles(values, n=5)
    return statistics.median(values), q[0], q[3]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/reskd", help="the folder of kdfast reskd demo")
    parser.add_argument("--tile", type=int, default=8, help="copies of the 540 validation images in the batch")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.9, 0.99, 0.999])
    parser.add_argument("--backend", default="auto", help="gate backend (auto, cpu, torch, triton)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--output", default="reskd.csv", help="CSV under benchmarks/results/ ('' to not write)")
    args = parser.parse_args(argv)

    chain_file = os.path.join(args.run, "seed0-stage2", "chain.pt")  # the chain of the demo's curve
    if not os.path.exists(chain_file):
        print(f"{chain_file} is missing: running kdfast reskd demo first")
        demo(args.run)
    chain, spec = load_chain(chain_file)
    curve = json.load(open(os.path.join(args.run, "curve.json")))
    device = torch.device("cpu")
    images, labels, _ = next(iter(make_loader("digits", "val", batch_size=540)))
    x, y = images.repeat(args.tile, 1, 1, 1), labels.repeat(args.tile)
    flops = stage_flops(chain, images.shape[1:])
    backend = None if args.backend == "auto" else args.backend

    with torch.no_grad():
        full_logits = chain(x)
        base_logits = chain.base(x).float()
    full_top1 = 100 * (full_logits.argmax(1) == y).float().mean().item()
    rows_all = torch.arange(len(x))
    gate = measure_ms(lambda: gate_compact(base_logits, rows_all, 0.9, backend=backend), device, reps=args.reps)
    print(f"{' + '.join(spec['architectures'])}, batch {len(x)}, top-1 {full_top1:.2f}%; the gate alone on "
          f"{len(x)}×{base_logits.shape[1]} logits {1e3 * gate['median_ms']:.0f} µs")

    def run_full():
        with torch.no_grad():
            chain(x)

    settings = [(f"calibrated {fold['folds']}", fold["thresholds"]) for fold in curve.get("two_fold_calibration", [])]
    settings += [(f"shared {t}", t) for t in args.thresholds]
    rows = []
    for name, thresholds in settings:
        logits, stages = chain.infer(x, thresholds, backend=backend)
        reached = [(stages > k).double().mean().item() for k in range(chain.num_stages)]
        fraction = sum(r * f for r, f in zip(reached, flops)) / sum(flops)
        full_ms, gated_ms = paired_times(run_full, lambda t=thresholds: chain.infer(x, t, backend=backend), args.reps)
        full, gated = quantiles(full_ms), quantiles(gated_ms)
        ratios = quantiles([f / g for f, g in zip(full_ms, gated_ms)])
        speedup = ratios[0]
        top1 = 100 * (logits.argmax(1) == y).float().mean().item()
        row = dict(setting=name, thresholds=json.dumps(thresholds), batch=len(x), chain="+".join(spec["architectures"]),
                   gated_ms=round(gated[0], 3), gated_q20_ms=round(gated[1], 3), gated_q80_ms=round(gated[2], 3),
                   full_ms=round(full[0], 3), full_q20_ms=round(full[1], 3), full_q80_ms=round(full[2], 3),
                   flops_fraction=round(fraction, 4), promised_speedup=round(1 / fraction, 3),
                   speedup=round(speedup, 3), speedup_q20=round(ratios[1], 3), speedup_q80=round(ratios[2], 3),
                   speedup_vs_promise=round(speedup * fraction, 3),
                   stage_fractions=json.dumps([round(r, 4) for r in reached]), top1=round(top1, 2),
                   full_top1=round(full_top1, 2), gate_us=round(1e3 * gate["median_ms"], 1),
                   backend=args.backend, device=device_name(device), torch=torch.__version__)
        rows.append(row)
        print(f"{name:22s} full {full[0]:6.2f} ms  gated {gated[0]:6.2f} ms  FLOPs {100 * fraction:5.1f}%  speed-up "
              f"{speedup:4.2f}× of a promised {1 / fraction:4.2f}× ({100 * speedup * fraction:3.0f}%)  top-1 "
              f"{top1:.2f}% (full {full_top1:.2f}%)", flush=True)
    if rows and args.output:
        print("appended to", append_rows(args.output, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
