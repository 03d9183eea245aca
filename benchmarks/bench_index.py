"""What indexing a folder costs with kdfast's per-file image check (kdfast.data.check).

The folder: ``--images`` ImageNet-like JPEGs (crops of scikit-learn's photographs at
500×375, quality 90, ~100 KiB each, the folder of bench_data.py) over 100 classes.
Timed, each ``--repeats`` times (median reported):

* ``listing``: what indexing did before the check: list the class folders, no stat, no read
  (``os.scandir`` + ``is_file``);
* ``cold``: ``index_split`` with an empty check cache: stat + check of every file, cache written;
* ``cold-disk``: the same with the files' pages dropped from the OS page cache first
  (``posix_fadvise(DONTNEED)``; what the first indexing after a reboot, or of a folder
  larger than memory, pays on this machine's disk);
* ``warm``: ``index_split`` with the cache in place: stat of every file, no read.

Example: python benchmarks/bench_index.py --images 10000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_data import make_photo_folder  # noqa: E402


def drop_page_cache(paths) -> None:
    for path in paths:
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def listing(split_root: str) -> int:
    count = 0
    for name in sorted(os.listdir(split_root)):
        for entry in os.scandir(os.path.join(split_root, name)):
            count += entry.is_file() and entry.name.lower().endswith((".jpg", ".jpeg"))
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--folder", default=None, help="default: /tmp/kdfast-bench-index-<images>")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    folder = make_photo_folder(args.folder or f"/tmp/kdfast-bench-index-{args.images}", args.images, classes=100)
    cache = tempfile.mkdtemp(prefix="kdfast-check-cache-")
    os.environ["KDFAST_CACHE_DIR"] = cache
    from kdfast.data import index_split

    files = index_split(folder, "train").files
    total = sum(os.path.getsize(path) for path in files)
    print(f"{len(files)} files, {total / len(files) / 1024:.0f} KiB on average, under {folder}")
    times = {"listing": [], "cold": [], "cold-disk": [], "warm": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        listing(os.path.join(folder, "train"))
        times["listing"].append(time.perf_counter() - start)
        for kind in ("cold", "cold-disk"):
            shutil.rmtree(cache, ignore_errors=True)
            if kind == "cold-disk":
                drop_page_cache(files)
            start = time.perf_counter()
            index_split(folder, "train")
            times[kind].append(time.perf_counter() - start)
        start = time.perf_counter()
        index_split(folder, "train")
        times["warm"].append(time.perf_counter() - start)
    for kind, values in times.items():
        median = statistics.median(values)
        print(f"{kind:>10}: {median:7.3f} s ({median / len(files) * 1e6:6.1f} µs per file; runs: "
              f"{', '.join(f'{v:.3f}' for v in values)})")
    shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
