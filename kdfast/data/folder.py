"""Image folders: the list of samples of one split, checked before any loader reads it.

Layout (ImageNet's): ``root/<split>/<class>/<image>.jpg`` — classes are the sorted
sub-folder names, as torchvision's ImageFolder orders them. A split may instead be given
as a file list: one ``relative/path.jpg <class index>`` per line (DALI's file-list
format), paths relative to the list's folder.

Samples are numbered in the list's order (sorted classes, then sorted file names), and
that number is the stable sample index every loader returns with each image (DR-KD's
self-teacher keeps a per-sample logit bank keyed by it).

Every file is checked when the split is indexed (:mod:`kdfast.data.check`: its first and
last bytes, cached per file by size and modification time), so that a truncated, empty,
unreadable or non-image file stops a run right away, with every such file named, instead
of crashing DALI's native decoder mid-epoch. PNG content under a JPEG name is read (both
loaders decode it) and listed in :attr:`SplitIndex.misnamed`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat as stat_module
from pathlib import Path

from kdfast.data.check import JPEG, check_files

LOGGER = logging.getLogger("kdfast.data")

#: Extensions read as JPEG images (case-insensitive). Other files in class folders are
#: skipped, counted and logged.
JPEG_EXTENSIONS = (".jpg", ".jpeg")


#: How to leave bad files out: the end of every message that names one.
EXCLUDE_HINT = ("List every bad file with `kdfast data verify <dataset root> --output bad.txt` and leave them out "
                "with `kdfast train ... --exclude bad.txt` (config key `exclude: bad.txt`; in Python "
                "make_loader(..., exclude='bad.txt')).")

#: How many bad files an error message names (all of them are in ``SplitIndex.bad``).
_NAMED = 10


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
    #: (path, reason) of the files with a JPEG name that the loaders cannot read (left out
    #: of ``files``; indexing with ``strict=True`` raises instead).
    bad: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: (path, format) of the files with a JPEG name and other content that both loaders
    #: decode (PNG); they are in ``files``.
    misnamed: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _read_exclusions(exclude, base: str | os.PathLike | None = None) -> set[str]:
    """Absolute paths from an iterable of paths or a text file of one path per line
    (``#`` comments and blank lines ignored), as ``kdfast data verify --output`` writes it.

    A relative path is taken relative to ``base`` (the dataset root) and, as well, to the
    current directory; a path that names no file under either is logged.
    """
    if not exclude:
        return set()
    if isinstance(exclude, (str, os.PathLike)):
        try:
            with open(exclude) as handle:
                exclude = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
        except OSError as error:
            raise DatasetError(f"cannot read the exclude list {exclude}: {error.strerror or error}") from error
    paths, unknown = set(), []
    for path in exclude:
        path = os.fspath(path)
        candidates = {os.path.abspath(path)}
        if base is not None and not os.path.isabs(path):
            candidates.add(os.path.abspath(os.path.join(base, path)))
        paths |= candidates
        if not any(os.path.lexists(candidate) for candidate in candidates):
            unknown.append(path)
    if unknown:
        LOGGER.warning("%d excluded path(s) name no file (relative ones are looked up under %s and the current "
                       "directory), e.g. %s", len(unknown), base or "the current directory", unknown[0])
    return paths


def _stat(path: str):
    """``os.stat(path)``, or why it failed (a broken or self-referential symbolic link, …)."""
    try:
        return os.stat(path)
    except OSError as error:
        if os.path.islink(path) and isinstance(error, FileNotFoundError):
            return "unreadable (a broken symbolic link: its target does not exist)"
        return f"unreadable ({error.strerror or error})"


def _sort_checked(index: SplitIndex, candidates: list[tuple[str, int]], stats: list, key: str) -> None:
    """Checks the candidate (path, label) pairs; the sound ones become the index's samples."""
    for (path, label), (found, reason) in zip(candidates, check_files([p for p, _ in candidates], stats, key)):
        if reason is not None:
            index.bad.append((path, reason))
            continue
        index.files.append(path)
        index.labels.append(label)
        if found != JPEG:
            index.misnamed.append((path, found))
    if index.misnamed:
        LOGGER.warning("%s: %d file(s) with a JPEG name hold %s content (both loaders decode them; `kdfast data "
                       "verify` lists them), e.g. %s", key, len(index.misnamed),
                       "/".join(sorted({found for _, found in index.misnamed})), index.misnamed[0][0])


def bad_files_error(where, bad: list[tuple[str, str]]) -> DatasetError:
    """The error naming the files no loader can read (the first few, and how many)."""
    named = "".join(f"\n  {path}: {reason}" for path, reason in bad[:_NAMED])
    more = f"\n  … and {len(bad) - _NAMED} more" if len(bad) > _NAMED else ""
    return DatasetError(f"{where}: {len(bad)} image file(s) cannot be read:{named}{more}\n{EXCLUDE_HINT}")


def class_names(split_root: Path) -> list[str]:
    """The sorted sub-folder names of ``split_root`` (hidden ones excluded): its classes."""
    return sorted(entry.name for entry in split_root.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def scan_folder(split_root: str | os.PathLike, exclude=None, *, strict: bool = True,
                exclude_base: str | os.PathLike | None = None) -> SplitIndex:
    """Index ``split_root/<class>/*.jpg``.

    Raises DatasetError for a missing folder, a folder without class sub-folders, a class
    folder without JPEG images, or no images at all. Files that are not JPEGs by their
    extension are skipped, counted and logged; ``exclude`` (paths, or a file listing
    them, e.g. what ``kdfast data verify`` found corrupt; relative ones relative to
    ``exclude_base``, default ``split_root``) are left out. Every other file is checked
    (:mod:`kdfast.data.check`); with ``strict`` a file that fails raises DatasetError
    naming every such file, otherwise it is listed in ``bad`` and left out.
    """
    root = Path(split_root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist (expected {root}/<class>/<image>.jpg)")
    classes = class_names(root)
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders (expected {root}/<class>/<image>.jpg)")
    excluded = _read_exclusions(exclude, root if exclude_base is None else exclude_base)
    candidates, stats, skipped = [], [], []
    for label, name in enumerate(classes):
        images = 0
        for entry in sorted(os.scandir(root / name), key=lambda e: e.name):
            path = os.path.abspath(entry.path)
            try:
                status = entry.stat()  # follows symbolic links
            except OSError:
                if not entry.is_symlink():
                    continue  # gone since it was listed
                status = _stat(path)  # a broken or self-referential link: reported as unreadable
            else:
                if stat_module.S_ISDIR(status.st_mode):
                    continue
            if not entry.name.lower().endswith(JPEG_EXTENSIONS):
                if not isinstance(status, str) and stat_module.S_ISREG(status.st_mode):
                    skipped.append(path)
                continue
            if path in excluded:
                continue
            images += 1
            candidates.append((path, label))
            stats.append(status)
        if images == 0:
            raise DatasetError(f"class folder {root / name} has no JPEG images; remove it or add images "
                               f"(a class without samples would shift every label after it)")
    if skipped:
        LOGGER.warning("%s: skipped %d non-JPEG file(s), e.g. %s", root, len(skipped), skipped[0])
    index = SplitIndex(root=root, classes=classes, files=[], labels=[], skipped=skipped)
    _sort_checked(index, candidates, stats, os.path.abspath(root))
    if strict and index.bad:
        raise bad_files_error(root, index.bad)
    return index


def read_file_list(list_path: str | os.PathLike, classes: list[str] | None = None, exclude=None, *,
                   strict: bool = True, exclude_base: str | os.PathLike | None = None) -> SplitIndex:
    """Index a file list: lines ``relative/path.jpg <label>``, relative to the list's folder.

    ``classes`` names the labels (default: "0", "1", … up to the largest label). The files
    are checked as :func:`scan_folder` checks them (``strict``, ``exclude``; relative
    excluded paths are relative to ``exclude_base``, default the list's folder).
    """
    list_path = Path(list_path)
    if not list_path.is_file():
        raise DatasetError(f"file list {list_path} does not exist")
    excluded = _read_exclusions(exclude, list_path.parent if exclude_base is None else exclude_base)
    candidates, stats, skipped = [], [], []
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
            status = _stat(absolute)
            if isinstance(status, str) and not os.path.lexists(absolute):
                raise DatasetError(f"{list_path}:{number}: {absolute} does not exist")
            if int(label) < 0:
                raise DatasetError(f"{list_path}:{number}: class index must be >= 0, got {label}")
            candidates.append((absolute, int(label)))
            stats.append(status)
    if not candidates:
        raise DatasetError(f"file list {list_path} names no JPEG images")
    if skipped:
        LOGGER.warning("%s: skipped %d non-JPEG file(s), e.g. %s", list_path, len(skipped), skipped[0])
    index = SplitIndex(root=list_path.parent, classes=[], files=[], labels=[], skipped=skipped)
    _sort_checked(index, candidates, stats, os.path.abspath(list_path))
    if strict and index.bad:
        raise bad_files_error(list_path, index.bad)
    count = max(label for _, label in candidates) + 1
    if classes is None:
        classes = [str(i) for i in range(count)]
    elif count > len(classes):
        raise DatasetError(f"{list_path} has class index {count - 1} but only {len(classes)} classes are known")
    index.classes = list(classes)
    return index


def index_split(root: str | os.PathLike, split: str, file_list=None, exclude=None, *,
                strict: bool = True) -> SplitIndex:
    """The samples of ``split`` ("train" or "val") of an ImageNet-style dataset at ``root``.

    With a file list, the classes are those of ``root/train`` when it exists. Otherwise the
    folder ``root/<split>`` is scanned, and a validation split must have exactly the
    training split's classes (DatasetError naming the differences), so that labels agree.
    ``exclude``: paths to leave out, or a file listing them (absolute, or relative to
    ``root`` or the current directory). ``strict``: raise DatasetError naming the files
    no loader can read (otherwise they are listed in ``bad``); see :func:`scan_folder`.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist (expected {root}/train/<class>/*.jpg and {root}/val/...)")
    train_root = root / "train"
    if file_list is not None:
        classes = class_names(train_root) if train_root.is_dir() else None
        return read_file_list(file_list, classes, exclude, strict=strict, exclude_base=root)
    index = scan_folder(root / split, exclude, strict=strict, exclude_base=root)
    if split == "val" and train_root.is_dir():
        train_classes = class_names(train_root)
        if train_classes != index.classes:
            only_train = sorted(set(train_classes) - set(index.classes))
            only_val = sorted(set(index.classes) - set(train_classes))
            raise DatasetError(f"{root}: train and val have different classes (only in train: {only_train[:5]}"
                               f"{'…' if len(only_train) > 5 else ''}; only in val: {only_val[:5]}"
                               f"{'…' if len(only_val) > 5 else ''})")
    return index
