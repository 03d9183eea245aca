"""Images per second of a full KD training step, fed from device memory or by each loader.

The step is the trainer's own (kdfast.train.KDStep): the frozen teacher's forward, the
student's forward, the method's loss (kdfast's fused kernels), backward, optimizer and
learning-rate schedule. Feeds:

  synthetic   one batch already on the device, reused every step (the step's ceiling)
  digits      the embedded digits (in memory; the digits preset)
  dali        kdfast's DALI pipeline (GPU decode on a GPU) on a folder of JPEGs
  torch       the PyTorch fallback loader on the same folder

The JPEG folder is bench_data.py's (500×375 crops of scikit-learn's photographs).
Each feed runs --warmup steps, then --repeats timed blocks of --steps steps (the device is
synchronized at block ends); reported: the median images/s over blocks with the 20/80 %
quantiles. A separate pass times each part of the step with a synchronization after it
(teacher forward, student forward, loss, backward, optimizer) and reports its share.
Rows go to benchmarks/results/train.csv.

Presets:
  digits       resnet20 → resnet8 on the 8×8 digits, CMKD, batch 64 (the CPU demo's models)
  digits-jpeg  the same at 32 px from the digits written as JPEGs (`kdfast data demo`)
  imagenet     resnet34 → resnet18, CMKD, 224 px, bf16 autocast, channels_last, batch 256
               (the GPU target: DALI-fed ≥ 90 % of synthetic)

Examples:
  python benchmarks/bench_train.py --preset digits
  python benchmarks/bench_train.py --preset imagenet --workers 16       # on a GPU
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_data import make_photo_folder  # noqa: E402
from common import append_rows, device_name  # noqa: E402

from kdfast.config import TrainConfig  # noqa: E402
from kdfast.data import dali_version, write_digits_folder  # noqa: E402
from kdfast.train import KDStep, Runtime, make_loaders  # noqa: E402

PRESETS = {
    "digits": dict(data="digits", student="resnet8", teacher="resnet20", method="cmkd", batch_size=64,
                   feeds=["synthetic", "digits"], amp="none", channels_last=False),
    "digits-jpeg": dict(data="digits-jpeg", student="resnet8", teacher="resnet20", method="cmkd", batch_size=64,
                        image_size=32, feeds=["synthetic", "dali", "torch"], amp="none", channels_last=False),
    "imagenet": dict(data="photos", student="resnet18", teacher="resnet34", method="cmkd", batch_size=256,
                     image_size=224, feeds=["synthetic", "dali", "torch"], amp="bf16", channels_last=True),
}
PARTS = ("teacher forward", "student forward", "loss", "backward", "optimizer")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forever(loader):
    for epoch in itertools.count():
        yield from loader.iterate(epoch)


def time_feed(step: KDStep, batches, device, steps: int, repeats: int, warmup: int, batch_size: int) -> list[float]:
    """Images/s of each of ``repeats`` blocks of ``steps`` steps."""
    for _ in range(warmup):
        step(*next(batches), epoch=1)
    rates = []
    for _ in range(repeats):
        synchronize(device)
        begin = time.perf_counter()
        for _ in range(steps):
            step(*next(batches), epoch=1)
        synchronize(device)
        rates.append(steps * batch_size / (time.perf_counter() - begin))
    return rates


def time_parts(step: KDStep, batch, device, steps: int) -> dict[str, float]:
    """Median milliseconds of each part of the step, synchronizing after each."""
    times: dict[str, list[float]] = {part: [] for part in PARTS}
    for _ in range(steps):
        synchronize(device)
        last = [time.perf_counter()]

        def mark(part):
            synchronize(device)
            now = time.perf_counter()
            times[part].append((now - last[0]) * 1e3)
            last[0] = now

        step(*batch, epoch=1, mark=mark)
    return {part: statistics.median(values) for part, values in times.items() if values}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="digits")
    parser.add_argument("--feeds", nargs="+", default=None, help="default: the preset's")
    parser.add_argument("--method", default=None, help="default: the preset's (cmkd)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2, help="DALI threads / DataLoader workers")
    parser.add_argument("--folder", default="/tmp/kdfast-bench-photos",
                        help="bench_data.py's JPEG folder cache (the digits JPEGs go to FOLDER-digits)")
    parser.add_argument("--images", type=int, default=2048, help="JPEGs in the folder")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per feed")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--compile", action="store_true", help="torch.compile student and teacher")
    parser.add_argument("--output", default="train.csv", help="CSV under benchmarks/results/ ('' to not write)")
    args = parser.parse_args(argv)

    preset = dict(PRESETS[args.preset])
    feeds = args.feeds or preset.pop("feeds")
    preset.pop("feeds", None)
    if args.method:
        preset["method"] = args.method
    if args.batch_size:
        preset["batch_size"] = args.batch_size
    if preset["data"] == "photos":
        preset["data"] = make_photo_folder(args.folder, args.images)
    elif preset["data"] == "digits-jpeg":
        preset["data"] = os.path.join(args.folder + "-digits")
        if not os.path.isdir(preset["data"]):
            write_digits_folder(preset["data"], size=32)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    runtime = Runtime(0, 1, 0, device)
    rows, synthetic_rate = [], None
    for feed in feeds:
        if feed == "dali" and dali_version() is None:
            print(f"{feed}: skipped (DALI is not installed)")
            continue
        loader_name = feed if feed in ("dali", "torch") else "auto"
        config = TrainConfig(**preset, loader=loader_name, workers=args.workers, compile=args.compile,
                             device=device.type, epochs=100, progress="none", tensorboard=False)
        train_loader, _ = make_loaders(config, runtime)
        step = KDStep(config, runtime, train_loader, load_weights=False)
        step.wrap()
        batches = forever(train_loader)
        first = next(batches)
        if feed == "synthetic":  # one real batch, kept on the device and reused
            batches = itertools.repeat(first)
        rates = time_feed(step, batches, device, args.steps, args.repeats, args.warmup, config.batch_size)
        parts = time_parts(step, first, device, max(5, args.steps // 2)) if feed == "synthetic" else {}
        median = statistics.median(rates)
        q20, q80 = np.quantile(rates, [0.2, 0.8])
        synthetic_rate = median if feed == "synthetic" else synthetic_rate
        share = "" if synthetic_rate is None else round(median / synthetic_rate, 3)
        total = sum(parts.values())
        row = dict(preset=args.preset, feed=feed, method=config.method, student=config.student,
                   teacher=config.teacher, batch_size=config.batch_size, image_size=train_loader.image_shape[1],
                   amp=config.amp, channels_last=config.channels_last, compile=args.compile, workers=args.workers,
                   images_per_s=round(median, 1), q20_images_per_s=round(q20, 1), q80_images_per_s=round(q80, 1),
                   of_synthetic=share,
                   **{f"{part.replace(' ', '_')}_ms": round(parts.get(part, float("nan")), 3) for part in PARTS},
                   loss_share=round(parts["loss"] / total, 4) if parts else "",
                   device=device_name(device), torch=torch.__version__)
        rows.append(row)
        print(f"{feed:10s} {median:9.1f} images/s (20-80%: {q20:.1f}-{q80:.1f})"
              + (f"  {100 * share:.1f}% of synthetic" if feed != "synthetic" and share != "" else ""), flush=True)
        for part, ms in parts.items():
            print(f"    {part:16s} {ms:8.3f} ms  {100 * ms / total:5.1f}%")
        del step, train_loader, batches
    if rows and args.output:
        print("appended to", append_rows(args.output, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
