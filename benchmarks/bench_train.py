"""Images per second of a full KD training step, fed from device memory or by each loader.

The step is the trainer's own (kdfast.train.KDStep): the frozen teacher's forward, the
student's forward, the method's loss (kdfast's fused kernels), backward, optimizer and
learning-rate schedule. Feeds:

  synthetic   one batch already on the device, reused every step (the step's ceiling)
  digits      the embedded digits (in memory; the digits preset)
  dali        kdfast's DALI pipeline (GPU decode on a GPU) on a folder of JPEGs
  torch       the PyTorch fallback loader on the same folder

  synthetic+cache, torch+cache, digits+cache
              the same feeds training from an offline teacher cache (kdfast.cache) instead of
              running the teacher: the torch loader replays the cache's crops, the step reads
              the batch's top-k records (--cache-top-k) and the losses take the SparseTeacher.
              The cache (one epoch, a randomly initialized teacher) is built first, timed:
              its images/s are reported with the teacher's own inference images/s on the same
              loader (build_images_per_s, teacher_inference_images_per_s).

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
import importlib
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
from kdfast.train import KDStep, Runtime, make_loaders, open_teacher_cache  # noqa: E402

PRESETS = {
    "digits": dict(data="digits", student="resnet8", teacher="resnet20", method="cmkd", batch_size=64,
                   feeds=["synthetic", "digits"], amp="none", channels_last=False),
    "digits-jpeg": dict(data="digits-jpeg", student="resnet8", teacher="resnet20", method="cmkd", batch_size=64,
                        image_size=32, feeds=["synthetic", "dali", "torch"], amp="none", channels_last=False),
    "imagenet": dict(data="photos", student="resnet18", teacher="resnet34", method="cmkd", batch_size=256,
                     image_size=224, feeds=["synthetic", "dali", "torch"], amp="bf16", channels_last=True),
}
PARTS = ("teacher forward", "teacher from cache", "student forward", "loss", "backward", "optimizer")


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


def build_teacher_cache(preset: dict, device: torch.device, workers: int, top_k: int, folder: str) -> dict:
    """Build a one-epoch cache of ``preset``'s teacher (random weights) under ``folder``; returns
    the cache folder, the build's images/s and the teacher's plain inference images/s on the
    same loader (decode, crop and forward; nothing stored)."""
    import shutil
    import tempfile

    from kdfast.cache import build_cache
    from kdfast.models import create_model

    config = TrainConfig(**preset, loader="torch", workers=workers, device=device.type, epochs=1, progress="none",
                         tensorboard=False)
    runtime = Runtime(0, 1, 0, device)
    train_loader, _ = make_loaders(config, runtime)
    channels, height, _ = train_loader.image_shape
    torch.manual_seed(0)
    (teacher_name,) = config.teacher  # the presets have one teacher
    teacher = create_model(teacher_name, train_loader.num_classes, channels, height).to(device).eval()
    checkpoint = os.path.join(tempfile.mkdtemp(prefix="kdfast-bench-teacher-"), "teacher.pt")
    torch.save(teacher.state_dict(), checkpoint)
    output = f"{folder}-cache-{teacher_name}-k{top_k}"
    shutil.rmtree(output, ignore_errors=True)
    common = dict(image_size=preset.get("image_size"), amp=config.amp, batch_size=config.batch_size)
    # The build's deterministic mode makes PyTorch import its compiler once (~1 s here): a
    # start-up cost, not a per-image one; imported before the clock starts.
    importlib.import_module("torch._inductor")
    begin = time.perf_counter()
    build_cache(config.data, teacher_name, checkpoint, output, epochs=1, top_k=top_k, loader="torch",
                workers=workers, device=device.type, progress="none", **common)
    build_rate = train_loader.num_samples / (time.perf_counter() - begin)
    # The teacher's own inference over the same loader (the samples the build decoded).
    begin, images = time.perf_counter(), 0
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=config.amp == "bf16"):
        for batch in train_loader.iterate(0):
            teacher(batch[0])
            images += len(batch[0])
    synchronize(device)
    inference_rate = images / (time.perf_counter() - begin)
    return {"folder": output, "build_images_per_s": round(build_rate, 1),
            "teacher_inference_images_per_s": round(inference_rate, 1)}


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
    parser.add_argument("--teacher", default=None, help="default: the preset's")
    parser.add_argument("--cache-top-k", type=int, default=10, help="top-k of the +cache feeds' teacher cache")
    parser.add_argument("--output", default="train.csv", help="CSV under benchmarks/results/ ('' to not write)")
    args = parser.parse_args(argv)

    preset = dict(PRESETS[args.preset])
    feeds = args.feeds or preset.pop("feeds")
    preset.pop("feeds", None)
    if args.method:
        preset["method"] = args.method
    if args.batch_size:
        preset["batch_size"] = args.batch_size
    if args.teacher:
        preset["teacher"] = args.teacher
    if preset["data"] == "photos":
        preset["data"] = make_photo_folder(args.folder, args.images)
    elif preset["data"] == "digits-jpeg":
        preset["data"] = os.path.join(args.folder + "-digits")
        if not os.path.isdir(preset["data"]):
            write_digits_folder(preset["data"], size=32)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    runtime = Runtime(0, 1, 0, device)
    rows, synthetic_rate, cache = [], {}, None
    for feed in feeds:
        base, cached = feed.removesuffix("+cache"), feed.endswith("+cache")
        if base == "dali" and dali_version() is None:
            print(f"{feed}: skipped (DALI is not installed)")
            continue
        if cached and cache is None:
            cache = build_teacher_cache(preset, device, args.workers, args.cache_top_k, args.folder)
            print(f"cache: built at {cache['build_images_per_s']} images/s (the teacher's own inference on the "
                  f"loader: {cache['teacher_inference_images_per_s']} images/s)", flush=True)
        loader_name = base if base in ("dali", "torch") else "torch" if cached else "auto"
        config = TrainConfig(**preset, loader=loader_name, workers=args.workers, compile=args.compile,
                             device=device.type, epochs=100, progress="none", tensorboard=False,
                             teacher_cache=cache["folder"] if cached else None)
        teacher_cache = open_teacher_cache(config)
        train_loader, _ = make_loaders(config, runtime, teacher_cache)
        step = KDStep(config, runtime, train_loader, load_weights=False, teacher_cache=teacher_cache)
        step.wrap()
        batches = forever(train_loader)
        first = next(batches)
        if base == "synthetic":  # one real batch, kept on the device and reused
            batches = itertools.repeat(first)
        rates = time_feed(step, batches, device, args.steps, args.repeats, args.warmup, config.batch_size)
        parts = time_parts(step, first, device, max(5, args.steps // 2)) if base == "synthetic" else {}
        median = statistics.median(rates)
        q20, q80 = np.quantile(rates, [0.2, 0.8])
        if base == "synthetic":
            synthetic_rate[cached] = median
        share = "" if cached not in synthetic_rate else round(median / synthetic_rate[cached], 3)
        total = sum(parts.values())
        row = dict(preset=args.preset, feed=feed, method=config.method, student=config.student,
                   teacher=" + ".join(config.teacher),
                   batch_size=config.batch_size, image_size=train_loader.image_shape[1],
                   amp=config.amp, channels_last=config.channels_last, compile=args.compile, workers=args.workers,
                   images_per_s=round(median, 1), q20_images_per_s=round(q20, 1), q80_images_per_s=round(q80, 1),
                   of_synthetic=share,
                   **{f"{part.replace(' ', '_')}_ms": round(parts.get(part, float("nan")), 3) for part in PARTS},
                   loss_share=round(parts["loss"] / total, 4) if parts else "",
                   cache_top_k=args.cache_top_k if cached else "",
                   build_images_per_s=cache["build_images_per_s"] if cached else "",
                   teacher_inference_images_per_s=cache["teacher_inference_images_per_s"] if cached else "",
                   device=device_name(device), torch=torch.__version__)
        rows.append(row)
        print(f"{feed:16s} {median:9.1f} images/s (20-80%: {q20:.1f}-{q80:.1f})"
              + (f"  {100 * share:.1f}% of synthetic" if base != "synthetic" and share != "" else ""), flush=True)
        for part, ms in parts.items():
            print(f"    {part:16s} {ms:8.3f} ms  {100 * ms / total:5.1f}%")
        del step, train_loader, batches
    if rows and args.output:
        print("appended to", append_rows(args.output, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
