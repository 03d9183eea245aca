"""Accuracy of KD from an offline teacher cache against online KD, on the digits as JPEGs.

    python benchmarks/cache_accuracy.py [--seeds 3] [--epochs 20] [--folder /tmp/kdfast-cache-accuracy]

The digits are written as a 32 px JPEG folder (``kdfast data demo``); a ResNet-20 teacher
is trained on it with cross-entropy (torch loader, random-resized crops and flips); then,
for each seed, a ResNet-8 student is trained with KD (τ = 4) three ways: online (the teacher
runs on every crop), and from caches of that seed's crops built with k = 5 and with
k = C = 10 classes (fp16 values, one recorded epoch per training epoch, so nothing is
cycled). Same seed → same crops, sample order and initialization in all three.
Rows (one per run: validation top-1, seconds) go to ``benchmarks/results/cache_accuracy.csv``;
``benchmarks/readme_tables.py`` puts their table in the README.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from common import append_rows, device_name  # noqa: E402

from kdfast.cache import build_cache  # noqa: E402
from kdfast.config import resolve_config  # noqa: E402
from kdfast.data import write_digits_folder  # noqa: E402
from kdfast.train import train  # noqa: E402

TEACHER, STUDENT, IMAGE_SIZE, CLASSES = "resnet20", "resnet8", 32, 10


def quiet(*_):
    pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20, help="student epochs (= recorded cache epochs)")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--folder", default="/tmp/kdfast-cache-accuracy")
    parser.add_argument("--output", default="cache_accuracy.csv")
    args = parser.parse_args(argv)
    data = os.path.join(args.folder, "digits-jpeg")
    if not os.path.isdir(data):
        write_digits_folder(data, size=IMAGE_SIZE)
    common = dict(data=data, image_size=IMAGE_SIZE, loader="torch", workers=2, batch_size=64, lr=0.1,
                  progress="none", eval_every=0, tensorboard=False, deterministic=True)
    teacher_dir = os.path.join(args.folder, "teacher")
    teacher_file = os.path.join(teacher_dir, "model.pt")
    if not os.path.isfile(teacher_file):
        teacher = train(resolve_config(student=TEACHER, method="ce", epochs=args.teacher_epochs, output=teacher_dir,
                                       **common), print_fn=quiet)
        print(f"teacher {TEACHER}: val top-1 {teacher['top1']:.2f}%", flush=True)
    rows = []
    for seed in range(args.seeds):
        runs = {"online": {}}
        for k in (5, CLASSES):
            cache = os.path.join(args.folder, f"cache-seed{seed}-k{k}")
            shutil.rmtree(cache, ignore_errors=True)
            begin = time.perf_counter()
            build_cache(data, TEACHER, teacher_file, cache, epochs=args.epochs, top_k=k, image_size=IMAGE_SIZE,
                        loader="torch", workers=2, seed=seed, batch_size=64, progress="none")
            runs[f"cache k={k}"] = {"teacher_cache": cache, "build_seconds": time.perf_counter() - begin}
        for name, extra in runs.items():
            build_seconds = extra.pop("build_seconds", 0.0)
            options = dict(teacher=TEACHER, **({"teacher_checkpoint": teacher_file} if name == "online" else extra))
            begin = time.perf_counter()
            summary = train(resolve_config(student=STUDENT, method="kd", epochs=args.epochs, seed=seed,
                                           output=os.path.join(args.folder, f"{name.replace(' ', '-')}-seed{seed}"),
                                           **options, **common), print_fn=quiet)
            seconds = time.perf_counter() - begin
            rows.append({"run": name, "seed": seed, "top1": f"{summary['top1']:.2f}", "epochs": args.epochs,
                         "teacher": TEACHER, "student": STUDENT, "train_seconds": f"{seconds:.1f}",
                         "build_seconds": f"{build_seconds:.1f}", "device": device_name(torch.device("cpu"))})
            print(f"seed {seed} {name:10s} top-1 {summary['top1']:.2f}% ({seconds:.1f} s"
                  + (f", build {build_seconds:.1f} s)" if build_seconds else ")"), flush=True)
    print("appended to", append_rows(args.output, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
