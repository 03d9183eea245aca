"""``kdfast data verify``: check and decode every image of a dataset and list the ones that fail.

Neither loader skips a bad image silently: indexing a split stops with an error naming
every file that fails the structural check (:mod:`kdfast.data.check`), and a file that
passes it but does not decode stops the loader with an error naming it. Run this before a
long training run: it reports both kinds (every file is decoded in full with Pillow), and
lists the files with a JPEG name and PNG content (read correctly by both loaders, but
worth knowing about). Pass the list it writes (``--output bad.txt``) to ``kdfast train
--exclude bad.txt`` (config key ``exclude``; ``make_loader(..., exclude=...)``) to leave the
bad files out.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
from pathlib import Path

from kdfast.data.folder import EXCLUDE_HINT, DatasetError, SplitIndex, index_split, scan_folder

LOGGER = logging.getLogger("kdfast.data")


@dataclasses.dataclass
class VerifyReport:
    """What :func:`verify_dataset` found: per split the images checked, and every failure."""

    checked: dict[str, int]
    corrupt: list[tuple[str, str]]  # (absolute path, reason): what the loaders cannot read
    skipped: list[str]  # non-JPEG files the loaders leave out
    classes: int
    #: (absolute path, format): files with a JPEG name and other content the loaders decode (PNG)
    misnamed: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.corrupt

    def lines(self, output: str | os.PathLike | None = None) -> list[str]:
        """The report as ``kdfast data verify`` prints it (``output``: where the list of
        unreadable paths was written)."""
        checked = ", ".join(f"{split}: {count}" for split, count in self.checked.items())
        lines = [f"decoded {sum(self.checked.values())} images ({checked}), {self.classes} classes"]
        if self.skipped:
            lines.append(f"{len(self.skipped)} non-JPEG file(s) are not read by the loaders, e.g. {self.skipped[0]}")
        lines += [f"NOT JPEG {path}: {found} content with a JPEG name (both loaders decode it as {found})"
                  for path, found in self.misnamed]
        lines += [f"CORRUPT {path}: {reason}" for path, reason in self.corrupt]
        if output:
            lines.append(f"wrote the {len(self.corrupt)} unreadable path(s) to {output}; leave them out with "
                         f"`kdfast train ... --exclude {output}` (config key `exclude: {output}`)")
        if self.ok:
            lines.append("all images decode")
        else:
            lines.append(f"{len(self.corrupt)} image(s) cannot be decoded; the loaders stop with an error on them. "
                         + ("" if output else EXCLUDE_HINT))
        return lines


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


def splits_of(root: str | os.PathLike, strict: bool = False) -> dict[str, SplitIndex]:
    """The splits under ``root``: its train/ and val/ folders, or ``root`` itself as one split.

    With ``strict=False`` the files that fail the structural check are listed in each
    index's ``bad`` instead of raising."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    present = [split for split in ("train", "val") if (root / split).is_dir()]
    if not present:
        return {root.name: scan_folder(root, strict=strict)}
    return {split: index_split(root, split, strict=strict) for split in present}


def verify_dataset(root: str | os.PathLike, workers: int | None = None) -> VerifyReport:
    """Check and decode every JPEG-named file under ``root`` with ``workers`` processes
    (default: all cores). Files that fail the structural check are reported with its
    reason (and not decoded); the others are decoded in full with Pillow."""
    splits = splits_of(root)
    files = [path for index in splits.values() for path in index.files]
    workers = workers or len(os.sched_getaffinity(0))
    if workers > 1 and len(files) > 64:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = list(pool.imap_unordered(_check, files, chunksize=64))
    else:
        results = [_check(path) for path in files]
    corrupt = [(path, reason) for path, reason in results if reason is not None]
    corrupt = sorted(corrupt + [item for index in splits.values() for item in index.bad])
    skipped = sorted(path for index in splits.values() for path in index.skipped)
    misnamed = sorted(item for index in splits.values() for item in index.misnamed)
    for path, found in misnamed:
        LOGGER.warning("NOT JPEG %s: %s content with a JPEG name (both loaders decode it as %s)", path, found, found)
    classes = max(index.num_classes for index in splits.values())
    checked = {name: len(index) + len(index.bad) for name, index in splits.items()}
    return VerifyReport(checked, corrupt, skipped, classes, misnamed)
