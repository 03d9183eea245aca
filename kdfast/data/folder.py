"""Image folders: the list of samples of one split, checked before any loader reads it.

Layout (ImageNet's): ``root/<split>/<class>/<image>.jpg`` — classes are the sorted
sub-folder names, as torchvision's ImageFolder orders them. A split may instead be given
as a file list: one ``relative/path.jpg <class index>`` per line (DALI's file-list
format), paths relative to the list's folder.

Samples are numbered in the list's order (sorted classes, then sorted file names), and
that number is the stable sample index every loader returns with each image (DR-KD's
self-teacher keeps a per-sample logit bank keyed by it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

LOGGER = logging.getLogger("kdfast.data")

#: Extensions read as JPEG images (case-insensitive). Other files in class folders are
#: skipped, counted and logged.
JPEG_EXTENSIONS = (".jpg", ".jpeg")


class DatasetError(ValueError):
    """A dataset folder or file list that cannot be used as it is; the message says why."""


@dataclasses.dataclass
class SplitIndex:
    """The samples of one split: ``files[i]`` has class ``labels[i]``; i is the sample index."""

    root: Path
    classes: list[str]
    files: list[str]  # absolute paths
    labels: list[int]
    skipped: list[str] = dataclasses.field(default_factory=list)  # non-JPEG files passed over

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _read_exclusions(exclude) -> set[str]:
    """Absolute paths from an iterable of paths or a text file of one path per line."""
    if exclude is None:
        return set()
    if isinstance(exclude, (str, os.PathLike)):
        with open(exclude) as handle:
            exclude = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    return {os.path.abspath(p) for p in exclude}


def class_names(split_root: Path) -> list[str]:
    """The sorted sub-folder names of ``split_root`` (hidden ones excluded): its classes."""
    return sorted(entry.name for entry in split_root.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def scan_folder(split_root: str | os.PathLike, exclude=None) -> SplitIndex:
    """Index ``split_root/<class>/*.jpg``.

    Raises DatasetError for a missing folder, a folder without class sub-folders, a class
    folder without JPEG images, or no images at all. Files that are not JPEGs by their
    extension are skipped, counted and logged; ``exclude`` (paths, or a file listing
    them, e.g. what ``kdfast data verify`` found corrupt) are left out.
    """
    root = Path(split_root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist (expected {root}/<class>/<image>.jpg)")
    classes = class_names(root)
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders (expected {root}/<class>/<image>.jpg)")
    excluded = _read_exclusions(exclude)
    files, labels, skipped = [], [], []
    for label, name in enumerate(classes):
        images = 0
        for entry in sorted(os.scandir(root / name), key=lambda e: e.name):
            if not entry.is_file():
                continue
            path = os.path.abspath(entry.path)
            if not entry.name.lower().endswith(JPEG_EXTENSIONS):
                skipped.append(path)
                continue
            if path in excluded:
                continue
            files.append(path)
            labels.append(label)
            images += 1
        if images == 0:
            raise DatasetError(f"class folder {root / name} has no JPEG images; remove it or add images "
                               f"(a class without samples would shift every label after it)")
    if skipped:
        LOGGER.warning("%s: skipped %d non-JPEG file(s), e.g. %s", root, len(skipped), skipped[0])
    return SplitIndex(root=root, classes=classes, files=files, labels=labels, skipped=skipped)


def read_file_list(list_path: str | os.PathLike, classes: list[str] | None = None, exclude=None) -> SplitIndex:
    """Index a file list: lines ``relative/path.jpg <label>``, relative to the list's folder.

    ``classes`` names the labels (default: "0", "1", … up to the largest label).
    """
    list_path = Path(list_path)
    if not list_path.is_file():
        raise DatasetError(f"file list {list_path} does not exist")
    excluded = _read_exclusions(exclude)
    files, labels, skipped = [], [], []
    with open(list_path) as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path, _, label = line.rpartition(" ")
            if not path or not label.lstrip("-").isdigit():
                raise DatasetError(f"{list_path}:{number}: expected '<relative path> <class index>', got {line!r}")
            absolute = os.path.abspath(list_path.parent / path)
            if not absolute.lower().endswith(JPEG_EXTENSIONS):
                skipped.append(absolute)
                continue
            if absolute in excluded:
                continue
            if not os.path.isfile(absolute):
                raise DatasetError(f"{list_path}:{number}: {absolute} does not exist")
            if int(label) < 0:
                raise DatasetError(f"{list_path}:{number}: class index must be >= 0, got {label}")
            files.append(absolute)
            labels.append(int(label))
    if not files:
        raise DatasetError(f"file list {list_path} names no JPEG images")
    if skipped:
        LOGGER.warning("%s: skipped %d non-JPEG file(s), e.g. %s", list_path, len(skipped), skipped[0])
    count = max(labels) + 1
    if classes is None:
        classes = [str(i) for i in range(count)]
    elif count > len(classes):
        raise DatasetError(f"{list_path} has class index {count - 1} but only {len(classes)} classes are known")
    return SplitIndex(root=list_path.parent, classes=list(classes), files=files, labels=labels, skipped=skipped)


def index_split(root: str | os.PathLike, split: str, file_list=None, exclude=None) -> SplitIndex:
    """The samples of ``split`` ("train" or "val") of an ImageNet-style dataset at ``root``.

    With a file list, the classes are those of ``root/train`` when it exists. Otherwise the
    folder ``root/<split>`` is scanned, and a validation split must have exactly the
    training split's classes (DatasetError naming the differences), so that labels agree.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist (expected {root}/train/<class>/*.jpg and {root}/val/...)")
    train_root = root / "train"
    if file_list is not None:
        classes = class_names(train_root) if train_root.is_dir() else None
        return read_file_list(file_list, classes, exclude)
    index = scan_folder(root / split, exclude)
    if split == "val" and train_root.is_dir():
        train_classes = class_names(train_root)
        if train_classes != index.classes:
            only_train = sorted(set(train_classes) - set(index.classes))
            only_val = sorted(set(index.classes) - set(train_classes))
            raise DatasetError(f"{root}: train and val have different classes (only in train: {only_train[:5]}"
                               f"{'…' if len(only_train) > 5 else ''}; only in val: {only_val[:5]}"
                               f"{'…' if len(only_val) > 5 else ''})")
    return index
