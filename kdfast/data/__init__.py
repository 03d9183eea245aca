"""kdfast's input pipelines: one entry point, :func:`make_loader`, three loaders behind it.

* ``loader="dali"``: NVIDIA DALI (GPU JPEG decode for CUDA devices, DALI's CPU-only mode
  otherwise) — :mod:`kdfast.data.dali_loader`;
* ``loader="torch"``: a PyTorch ``DataLoader`` with Pillow decode, the fallback for
  machines without DALI — :mod:`kdfast.data.torch_loader`;
* ``data="digits"``: the embedded handwritten digits, held in memory —
  :mod:`kdfast.data.digits`.

All of them yield :class:`Batch` ``(images, labels, sample_indices)`` and read the same
samples in the same batches (:mod:`kdfast.data.common` fixes the order, the sharding by
rank and the last-batch rules).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from kdfast.data.common import IMAGENET_MEAN, IMAGENET_STD, Batch, Loader, SampleOrder, per_class_subset
from kdfast.data.dali_loader import dali_version
from kdfast.data.digits import DIGITS_NAME, write_digits_folder
from kdfast.data.folder import DatasetError, SplitIndex, index_split
from kdfast.data.verify import VerifyReport, verify_dataset

LOGGER = logging.getLogger("kdfast.data")
LOADERS = ("auto", "dali", "torch")

__all__ = [
    "Batch", "DatasetError", "IMAGENET_MEAN", "IMAGENET_STD", "LOADERS", "Loader", "SplitIndex", "VerifyReport",
    "dali_version", "index_split", "make_loader", "per_class_subset", "verify_dataset", "write_digits_folder",
]


def _default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


def make_loader(data: str | os.PathLike, split: str = "train", *, batch_size: int, loader: str = "auto",
                device: str | torch.device = "cpu", image_size: int | None = None, resize_size: int | None = None,
                dtype: torch.dtype = torch.float32, channels_last: bool = False, rank: int = 0, world_size: int = 1,
                num_workers: int | None = None, seed: int = 0, file_list: str | os.PathLike | None = None,
                exclude=None, augmentation=None, per_class: int | None = None) -> Loader:
    """An iterable of :class:`Batch` ``(images, labels, sample_indices)`` for one split and rank.

    Args:
        data: an ImageNet-style folder (``data/train/<class>/*.jpg``, ``data/val/...``), or
            ``"digits"`` for the embedded handwritten digits (in memory).
        split: ``"train"`` (shuffled each epoch — call ``loader.set_epoch(epoch)`` — with
            random-resized crop and flip; the last incomplete global batch is dropped) or
            ``"val"`` (fixed order, resize + center crop; every sample read exactly once
            across ranks, the last batch possibly smaller).
        batch_size: images per batch on this rank.
        loader: ``"dali"``, ``"torch"`` or ``"auto"`` (DALI when it is installed). Ignored
            for ``"digits"``.
        device: where batches are delivered. ``"cuda"`` makes DALI decode on the GPU.
        image_size: output height and width (default 224; for digits, their native 8).
        resize_size: validation's shorter-side resize before the center crop (default
            ``round(image_size / 0.875)``, i.e. 256 for 224).
        dtype: torch.float32, torch.float16 or torch.bfloat16 images.
        channels_last: NHWC memory (images keep the NCHW shape, as in
            ``torch.channels_last``).
        rank, world_size: this process's shard (``torch.distributed`` rank and size).
        num_workers: DALI threads or DataLoader worker processes (default: the cores,
            at most 8).
        seed: the shuffling and augmentation seed (the same on every rank).
        file_list: a DALI-style list (``relative/path.jpg <class index>`` per line) to read
            instead of the ``data/<split>`` folder.
        exclude: paths to leave out, or a file listing them, one per line (what ``kdfast
            data verify --output`` writes; ``kdfast train --exclude FILE``, config key
            ``exclude``). Paths are absolute, or relative to ``data`` (or to the current
            directory). Every loader reads the same remaining files, renumbered.
        augmentation: replay recorded training crops instead of drawing them: a callable
            ``(epoch, sample_indices int64 [B]) → (boxes [B, 4], flips [B])``, boxes
            (left, top, right, bottom) in source-image pixels — e.g. a teacher cache's
            :meth:`kdfast.cache.TeacherCache.augmentation`. The torch loader crops, resizes and
            flips them with the code that draws its own (the cache builder's), so the
            images are bit for bit those the cache's teacher saw; DALI decodes exactly the
            recorded windows with ``fn.decoders.image_slice`` and flips them (its own decode
            and resize: pixels within a few levels of those); the digits take the box as
            their one-pixel shift. Train split only; ``"auto"`` picks torch (exact pixels).
        per_class: keep only this many samples of each class (:func:`per_class_subset`, a
            fixed choice: seed 0, whatever ``seed``), renumbered in the split's order; e.g.
            few-label distillation (``kdfast train --train-per-class``).

    Indexing checks every file (:mod:`kdfast.data.check`; cached per file): a truncated,
    empty, unreadable or non-image file raises :class:`DatasetError` naming each such file
    before any batch is read. PNG content under a JPEG name is decoded as PNG.

    Images are normalized with ImageNet's mean and std (the digits with their own).
    ``sample_indices`` are stable positions in the split's sorted file list (for the
    digits, in their split), suitable for per-sample state such as DR-KD's logit bank.
    """
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
    device = torch.device(device)
    if num_workers is None:
        num_workers = _default_workers()
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")

    if augmentation is not None:
        if split != "train":
            raise ValueError(f"augmentation replays training crops; the {split!r} split has none")
        if not callable(augmentation):
            raise ValueError(f"augmentation must be a callable (epoch, sample_indices) -> (boxes, flips), got "
                             f"{type(augmentation).__name__}")
        if loader == "auto" and str(data) != DIGITS_NAME:
            loader = "torch"
    if str(data) == DIGITS_NAME:
        from kdfast.data.digits import DigitsLoader, digits_split

        if exclude:
            raise ValueError("exclude names files of an image folder; data='digits' is held in memory and has none")
        if loader != "auto":
            raise ValueError(
                f"data='digits' is held in memory and read without DALI or a DataLoader (loader must be 'auto', got "
                f"{loader!r}); to read the digits through loader={loader!r}, write them as a JPEG folder with "
                f"`kdfast data demo DIR` and pass data=DIR"
            )
        keep = None if per_class is None else per_class_subset(digits_split(split)[1], per_class)
        order = SampleOrder(len(digits_split(split)[1]) if keep is None else len(keep), batch_size, split, rank,
                            world_size, seed)
        return DigitsLoader(order, image_size=image_size, device=device, dtype=dtype, channels_last=channels_last,
                            augmentation=augmentation, keep=keep)

    index = index_split(data, split, file_list=file_list, exclude=exclude)
    if per_class is not None:
        keep = per_class_subset(index.labels, per_class)
        index = dataclasses.replace(index, files=[index.files[i] for i in keep], labels=[index.labels[i] for i in keep])
    order = SampleOrder(len(index), batch_size, split, rank, world_size, seed)
    image_size = image_size or 224
    resize_size = resize_size or round(image_size / 0.875)
    if resize_size < image_size:
        raise ValueError(f"resize_size must be >= image_size={image_size}, got {resize_size}")
    if loader == "auto":
        loader = "dali" if dali_version() is not None else "torch"
        LOGGER.info("loader='auto' chose %s", loader)
    options = dict(image_size=image_size, resize_size=resize_size, device=device, dtype=dtype,
                   channels_last=channels_last)
    if loader == "dali":
        from kdfast.data.dali_loader import DaliLoader

        return DaliLoader(index, order, num_threads=max(1, num_workers), augmentation=augmentation, **options)
    from kdfast.data.torch_loader import TorchLoader

    return TorchLoader(index, order, num_workers=num_workers, augmentation=augmentation, **options)
