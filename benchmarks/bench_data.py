"""Images per second of kdfast's loaders on the same folder of ImageNet-like JPEGs.

The folder is made once (cached under --folder) from the two real photographs that ship
with scikit-learn: random crops (30–100 % of the area) resized to 500×375 and saved as
JPEG at quality 90, spread over 10 classes, so that decoding costs what an ImageNet
image costs (ImageNet's average is about 400×350).

Providers (each where it can run):
  dali-cpu     DALI's CPU-only pipeline (device_id=None), --workers threads
  torch-cpu    the PyTorch fallback (Pillow in --workers DataLoader processes)
  dali-gpu     DALI with nvJPEG ("mixed") decode, batches on the GPU
  torch-gpu    the PyTorch fallback delivering to the GPU (normalized there)

Each provider reads --epochs epochs of the train split (224 px random-resized crop + flip,
normalized fp32 batches); the first is a warm-up and is not counted. An epoch's time runs
from asking for its first batch (DALI builds its pipeline then) to holding its last one.
Reported: the median images/s over the timed epochs with the 20/80 % quantiles. Rows go
to benchmarks/results/data.csv.

Examples:
  python benchmarks/bench_data.py                       # CPU providers, 2 workers each
  python benchmarks/bench_data.py --providers dali-gpu torch-gpu --workers 16 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's idle BLAS threads would spin on a small CPU

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import append_rows, device_name  # noqa: E402

from kdfast.data import dali_version, make_loader  # noqa: E402

PROVIDERS = {  # name: (loader, device)
    "dali-cpu": ("dali", "cpu"),
    "torch-cpu": ("torch", "cpu"),
    "dali-gpu": ("dali", "cuda"),
    "torch-gpu": ("torch", "cuda"),
}
IMAGE_SIZE = (500, 375)


def make_photo_folder(folder: str, images: int, classes: int = 10, seed: int = 0) -> str:
    """``folder/train/<class>/*.jpg``: crops of scikit-learn's sample photographs (cached)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    recipe = {"images": images, "classes": classes, "seed": seed, "size": IMAGE_SIZE, "quality": 90}
    stamp = os.path.join(folder, "recipe.json")
    if os.path.exists(stamp):
        with open(stamp) as handle:
            if json.load(handle) == recipe:
                return folder
    photos = [Image.fromarray(photo) for photo in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for number in range(images):
        photo = photos[number % len(photos)]
        width, height = photo.size
        area = rng.uniform(0.3, 1.0)
        crop_w, crop_h = round(width * np.sqrt(area)), round(height * np.sqrt(area))
        left, top = rng.integers(0, width - crop_w + 1), rng.integers(0, height - crop_h + 1)
        image = photo.resize(IMAGE_SIZE, Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        directory = os.path.join(folder, "train", f"class{number % classes:02d}")
        os.makedirs(directory, exist_ok=True)
        image.save(os.path.join(directory, f"{number:06d}.jpg"), quality=recipe["quality"])
    with open(stamp, "w") as handle:
        json.dump(recipe, handle)
    return folder


def epoch_rates(loader, epochs: int, device: torch.device) -> list[float]:
    """Images/s of each epoch after the first."""
    rates = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        start, images = time.perf_counter(), 0
        for batch in loader:
            images += batch.images.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if epoch > 0:
            rates.append(images / (time.perf_counter() - start))
    return rates


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=None,
                        help="default: the CPU providers, plus the GPU ones when a GPU is present")
    parser.add_argument("--folder", default="/tmp/kdfast-bench-photos", help="where the JPEG folder is cached")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DALI threads / DataLoader worker processes")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per provider, the first one a warm-up")
    parser.add_argument("--output", default="data.csv", help="CSV under benchmarks/results/ ('' to not write)")
    args = parser.parse_args(argv)

    providers = args.providers or [p for p, (_, device) in PROVIDERS.items()
                                   if device == "cpu" or torch.cuda.is_available()]
    folder = make_photo_folder(args.folder, args.images)
    rows = []
    for provider in providers:
        loader_name, device_type = PROVIDERS[provider]
        if loader_name == "dali" and dali_version() is None:
            print(f"{provider}: skipped (DALI is not installed)")
            continue
        if device_type == "cuda" and not torch.cuda.is_available():
            print(f"{provider}: skipped (no GPU)")
            continue
        device = torch.device(device_type)
        loader = make_loader(folder, "train", batch_size=args.batch_size, loader=loader_name, device=device,
                             num_workers=args.workers)
        rates = epoch_rates(loader, args.epochs, device)
        del loader
        q20, q80 = np.quantile(rates, [0.2, 0.8])
        row = dict(provider=provider, split="train", image_size=224, batch_size=args.batch_size,
                   workers=args.workers, images=len(rates) * (args.images // args.batch_size) * args.batch_size,
                   images_per_s=round(statistics.median(rates), 1), q20_images_per_s=round(q20, 1),
                   q80_images_per_s=round(q80, 1), device=device_name(device), cpus=len(os.sched_getaffinity(0)),
                   dali=dali_version() or "", torch=torch.__version__)
        rows.append(row)
        print(f"{provider:10s} {row['images_per_s']:8.1f} images/s  (20-80%: {q20:.1f}-{q80:.1f}, "
              f"{len(rates)} epochs of {args.images // args.batch_size * args.batch_size} images)", flush=True)
    by_provider = {row["provider"]: row["images_per_s"] for row in rows}
    if "dali-cpu" in by_provider and "torch-cpu" in by_provider:
        print(f"DALI CPU / PyTorch CPU: {by_provider['dali-cpu'] / by_provider['torch-cpu']:.2f}×")
    if rows and args.output:
        print("appended to", append_rows(args.output, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
