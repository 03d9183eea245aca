"""The embedded dataset: scikit-learn's bundled handwritten digits (1,797 8×8 images, 10 classes).

Nothing is downloaded: the digits ship inside scikit-learn. The split is fixed (stratified,
30 % validation, ``random_state=0``), so every run and :func:`write_digits_folder` agree on
it. In memory, images are one channel, 8×8 (or resized to ``image_size``), normalized by
the training split's mean and standard deviation; training shifts each image by up to one
pixel (a seeded, per-sample draw: the same for a given seed, epoch and sample index;
:func:`digits_shifts`). A shift is the digits' whole augmentation: as a crop box in source
pixels it is ``(dx, dy, dx + 8, dy + 8)``, never flipped (what :mod:`kdfast.cache` records).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from kdfast.data.common import Batch, Loader, SampleOrder

DIGITS_NAME = "digits"
VAL_FRACTION = 0.3
NATIVE_SIZE = 8


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images [N, 8, 8] float in [0, 1], labels [N], indices into sklearn's digits) of a split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    everything = np.arange(len(data.target))
    train, val = train_test_split(everything, test_size=VAL_FRACTION, random_state=0, stratify=data.target)
    chosen = np.sort(train if split == "train" else val)
    return data.images[chosen].astype(np.float32) / 16.0, data.target[chosen].astype(np.int64), chosen


class DigitsLoader(Loader):
    """The digits split held as one tensor; batches are slices of it (no worker, no decode)."""

    def __init__(self, order: SampleOrder, *, image_size: int | None, device, dtype, channels_last: bool,
                 augmentation=None, keep: np.ndarray | None = None):
        images, labels, _ = digits_split(order.split)
        if keep is not None:  # a subset of the split (positions), renumbered 0 … len(keep) − 1
            images, labels = images[keep], labels[keep]
        self.augmentation = augmentation
        super().__init__(order, labels, device, dtype, channels_last)
        self.classes = [str(digit) for digit in range(10)]
        train_images = digits_split("train")[0]
        mean, std = float(train_images.mean()), float(train_images.std())
        images = (torch.from_numpy(images).unsqueeze(1) - mean) / std
        self.image_size = image_size or NATIVE_SIZE
        self.image_shape = (1, self.image_size, self.image_size)
        self.background = -mean / std  # value of an empty (0) pixel after normalization
        # Kept at 8×8 plus a one-pixel border of background, for the random shifts.
        self._padded = F.pad(images, (1, 1, 1, 1), value=self.background)

    def render(self, indices: torch.Tensor, shifts: np.ndarray | None) -> torch.Tensor:
        """Normalized float32 images [B, 1, S, S] of the samples ``indices``, each shifted by
        its row (dy, dx) of ``shifts`` [B, 2] (None: unshifted), then resized to ``image_size``.

        A shift (dy, dx) shows the source pixels ``[dy, dy + 8) × [dx, dx + 8)`` (background
        outside the 8×8 image): the crop box (left, top, right, bottom) = (dx, dy, dx + 8, dy + 8)."""
        padded = self._padded[indices]
        if shifts is not None:
            rows = torch.from_numpy(1 + shifts[:, 0])[:, None] + torch.arange(NATIVE_SIZE)
            cols = torch.from_numpy(1 + shifts[:, 1])[:, None] + torch.arange(NATIVE_SIZE)
            images = padded[torch.arange(len(indices))[:, None, None], 0, rows[:, :, None], cols[:, None, :]]
        else:
            images = padded[:, 0, 1:-1, 1:-1]
        images = images.unsqueeze(1)
        if self.image_size != NATIVE_SIZE:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return images

    def _read(self, indices: np.ndarray, epoch: int, start_batch: int) -> Iterator[Batch]:
        train = self.order.split == "train"
        drawn = train and self.augmentation is None
        shifts = digits_shifts(self.order.seed, epoch, self.num_samples) if drawn else None
        for begin in range(0, len(indices), self.batch_size):
            batch = torch.from_numpy(indices[begin:begin + self.batch_size])
            if train and not drawn:
                batch_shifts = shifts_of_boxes(*self.augmentation(epoch, batch.numpy()))
            else:
                batch_shifts = None if shifts is None else shifts[batch.numpy()]
            yield self._finish(self.render(batch, batch_shifts), batch)


def shifts_of_boxes(boxes: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """The shifts (dy, dx) [B, 2] of recorded digits crop boxes ``(dx, dy, dx + 8, dy + 8)``
    (what :mod:`kdfast.cache` records for the digits); ValueError for a box that is not a
    one-pixel shift or a flip (the digits are never flipped)."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    dx, dy = boxes[:, 0], boxes[:, 1]
    bad = ((boxes[:, 2] - dx != NATIVE_SIZE) | (boxes[:, 3] - dy != NATIVE_SIZE) | (np.abs(dx) > 1)
           | (np.abs(dy) > 1) | np.asarray(flips, dtype=bool).reshape(-1))
    if bad.any():
        row = int(bad.nonzero()[0][0])
        raise ValueError(f"a replayed digits augmentation must be a one-pixel shift (dx, dy, dx + 8, dy + 8) with "
                         f"|dx|, |dy| <= 1 and no flip; row {row} has box {boxes[row].tolist()}, flip "
                         f"{bool(np.asarray(flips).reshape(-1)[row])}")
    return np.stack([dy, dx], axis=1)


def digits_shifts(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """Every training sample's shift (dy, dx) in {-1, 0, 1}² for ``epoch``: int64 [num_samples, 2],
    drawn per (seed, epoch) for the whole split (row i is sample i's)."""
    return np.random.default_rng([seed, epoch]).integers(-1, 2, size=(num_samples, 2))


def write_digits_folder(directory: str | os.PathLike, size: int = 32, quality: int = 95) -> dict[str, int]:
    """Write the digits as an ImageNet-style JPEG folder: ``directory/{train,val}/<digit>/<n>.jpg``.

    Each 8×8 image becomes an RGB ``size`` × ``size`` JPEG (white ink on black, bicubic
    upscaling), named by its index in scikit-learn's digits. Returns the number of images
    written per split. Existing files of the same names are overwritten.
    """
    from PIL import Image

    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8 (pixels), got {size!r}")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer in [1, 100], got {quality!r}")
    counts = {}
    for split in ("train", "val"):
        images, labels, numbers = digits_split(split)
        for digit in range(10):
            (Path(directory) / split / str(digit)).mkdir(parents=True, exist_ok=True)
        for image, label, number in zip(images, labels, numbers):
            pixels = Image.fromarray(np.round(image * 255).astype(np.uint8))
            pixels = pixels.resize((size, size), Image.BICUBIC).convert("RGB")
            pixels.save(Path(directory) / split / str(label) / f"{number:04d}.jpg", quality=quality)
        counts[split] = len(labels)
    return counts
