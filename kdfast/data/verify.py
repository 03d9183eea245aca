"""``kdfast data verify``: decode every image of a dataset and list the ones that fail.

Neither loader skips a bad image silently: both stop with an error naming it. Run this
before a long training run; pass the list it writes as ``exclude`` (CLI ``--exclude``) to
leave the bad files out.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from pathlib import Path

from kdfast.data.folder import DatasetError, SplitIndex, index_split, scan_folder


@dataclasses.dataclass
class VerifyReport:
    """What :func:`verify_dataset` found: per split the images checked, and every failure."""

    checked: dict[str, int]
    corrupt: list[tuple[str, str]]  # (absolute path, reason)
    skipped: list[str]  # non-JPEG files the loaders leave out
    classes: int

    @property
    def ok(self) -> bool:
        return not self.corrupt


def decode_error(path: str) -> str | None:
    """Why ``path`` cannot be decoded as an image (Pillow, whole file), or None if it can."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # decodes every scan: a truncated file raises here, not at open
            if image.width < 1 or image.height < 1:
                return "empty image"
    except Exception as error:  # noqa: BLE001 - any failure to decode is what we report
        return f"{type(error).__name__}: {error}"
    return None


def _check(path: str) -> tuple[str, str | None]:
    return path, decode_error(path)


def splits_of(root: str | os.PathLike) -> dict[str, SplitIndex]:
    """The splits under ``root``: its train/ and val/ folders, or ``root`` itself as one split."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    present = [split for split in ("train", "val") if (root / split).is_dir()]
    if not present:
        return {root.name: scan_folder(root)}
    return {split: index_split(root, split) for split in present}


def verify_dataset(root: str | os.PathLike, workers: int | None = None) -> VerifyReport:
    """Decode every JPEG under ``root`` with ``workers`` processes (default: all cores)."""
    splits = splits_of(root)
    files = [path for index in splits.values() for path in index.files]
    workers = workers or len(os.sched_getaffinity(0))
    if workers > 1 and len(files) > 64:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = list(pool.imap_unordered(_check, files, chunksize=64))
    else:
        results = [_check(path) for path in files]
    corrupt = sorted((path, reason) for path, reason in results if reason is not None)
    skipped = sorted(path for index in splits.values() for path in index.skipped)
    classes = max(index.num_classes for index in splits.values())
    return VerifyReport({name: len(index) for name, index in splits.items()}, corrupt, skipped, classes)
