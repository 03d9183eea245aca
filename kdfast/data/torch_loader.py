"""PyTorch fallback loader: Pillow decode in ``DataLoader`` workers, for machines without DALI.

Same transforms, batches and outputs as the DALI loader (torchvision's ImageNet recipe,
written on Pillow because torchvision is not a dependency):

* train: random-resized crop (area 8–100 %, aspect ratio 3/4–4/3, ten tries then a center
  crop, as torchvision's ``RandomResizedCrop``), bilinear (antialiased) resize to
  ``image_size``, horizontal flip with probability ½;
* val: the central region that "resize the shorter side to ``resize_size``, center crop
  ``image_size``" keeps, resized in one step.

Each sample's random crop and flip come from its own generator, seeded by
``(seed, epoch, sample index)``: the augmentation does not depend on the number of
workers, the batch or the rank, and a resumed run sees the same images.

Workers return uint8 HWC images. For a CUDA device the uint8 batch is copied (pinned,
asynchronously) and normalized on the GPU; for the CPU the workers normalize it.

Pillow reads the format from the bytes, so PNG content under a JPEG name (which indexing
lets through, see :mod:`kdfast.data.check`) is decoded as PNG, 16-bit PNGs scaled to 8
bits as DALI scales them. A file that does not decode raises
:class:`~kdfast.data.folder.DatasetError` naming the file (the run stops; nothing is
skipped silently).
"""

from __future__ import annotations

import gc
import math
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from kdfast.data.common import IMAGENET_MEAN, IMAGENET_STD, Batch, Loader, SampleOrder
from kdfast.data.folder import EXCLUDE_HINT, DatasetError, SplitIndex


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, area=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop covering ``area`` of the image at an
    aspect ratio drawn log-uniformly from ``ratio``; after ten misses, the largest central
    crop whose aspect ratio is within ``ratio``."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = width * height * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    image_ratio = width / height
    if image_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif image_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int, image_size: int, resize_size: int) -> tuple[float, float, float, float]:
    """The region of the original image that resize-shorter-side + center-crop keeps."""
    side = image_size * min(width, height) / resize_size
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a decoded image. Pillow's own conversion clips 16-bit and 32-bit
    grayscale (PNG) to 255; these are scaled by 255/65535 instead, as DALI does."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        wide = np.asarray(image, dtype=np.int64).clip(0, 65535)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    return image.convert("RGB")


def normalize(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [B, H, W, 3] → ``dtype`` [B, 3, H, W] (channels_last memory), ImageNet-normalized."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).mul_(255).view(1, 3, 1, 1)
    scale = torch.tensor(IMAGENET_STD, device=images.device).mul_(255).reciprocal_().view(1, 3, 1, 1)
    return images.permute(0, 3, 1, 2).float().sub_(mean).mul_(scale).to(dtype)


class _FolderImages(torch.utils.data.Dataset):
    """Decodes and transforms one sample; items are (sample index, epoch) pairs."""

    def __init__(self, files, train: bool, image_size: int, resize_size: int, seed: int):
        self.files, self.train, self.seed = files, train, seed
        self.image_size, self.resize_size = image_size, resize_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        index, epoch = item
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image = to_rgb(image)  # decodes the whole file: a truncated one raises here
        except Exception as error:  # noqa: BLE001 - whatever Pillow raises, the file is what to report
            raise DatasetError(f"cannot decode {path} ({type(error).__name__}: {error}). {EXCLUDE_HINT}") from error
        size = (self.image_size, self.image_size)
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, index])
            image = image.resize(size, Image.BILINEAR, box=random_resized_crop_box(*image.size, rng))
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            box = center_crop_box(*image.size, self.image_size, self.resize_size)
            image = image.resize(size, Image.BILINEAR, box=box)
        return np.asarray(image), index


class _Collate:
    """Stacks a batch in the worker; for a CPU run also normalizes it there, in its final
    dtype and memory format (``layout`` = (dtype, memory format), or None for a GPU run)."""

    def __init__(self, layout: tuple[torch.dtype, torch.memory_format] | None):
        self.layout = layout

    def __call__(self, samples):
        images = torch.from_numpy(np.stack([image for image, _ in samples]))
        indices = torch.tensor([index for _, index in samples], dtype=torch.int64)
        if self.layout is not None:
            dtype, memory_format = self.layout
            images = normalize(images, dtype).contiguous(memory_format=memory_format)
        return images, indices


class _EpochBatches(torch.utils.data.Sampler):
    """The batches of (sample index, epoch) the loader reads next; reset before each epoch."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class TorchLoader(Loader):
    """Batches of an image folder decoded by Pillow in ``torch.utils.data.DataLoader`` workers."""

    def __init__(self, index: SplitIndex, order: SampleOrder, *, image_size: int, resize_size: int, device,
                 dtype, channels_last: bool, num_workers: int):
        super().__init__(order, index.labels, device, dtype, channels_last)
        self.index, self.classes = index, index.classes
        self.image_shape = (3, image_size, image_size)
        self._on_gpu = self.device.type == "cuda"
        self._batches = _EpochBatches()
        dataset = _FolderImages(index.files, order.split == "train", image_size, resize_size, order.seed)
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self._batches, num_workers=num_workers,
            collate_fn=_Collate(None if self._on_gpu else (self.dtype, self.memory_format)),
            pin_memory=self._on_gpu, persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
        )

    def _read(self, indices: np.ndarray, epoch: int, start_batch: int) -> Iterator[Batch]:
        size = self.batch_size
        self._batches.batches = [[(int(i), epoch) for i in indices[b:b + size]] for b in range(0, len(indices), size)]
        for images, sample_indices in self._epoch_iterator():
            if self._on_gpu:  # uint8 over the bus (4× fewer bytes), normalized on the GPU
                images = normalize(images.to(self.device, non_blocking=True), torch.float32)
            yield self._finish(images, sample_indices)

    def _epoch_iterator(self):
        """The DataLoader's iterator for the epoch set up in ``self._batches``.

        Its first call forks the worker processes. The garbage collector is frozen across
        the fork: a worker inherits the parent's heap, and collecting a garbage object there
        whose destructor waits for the parent's threads — a DALI pipeline of an earlier
        loader, whose threads do not exist in the child — would hang the worker forever."""
        if self._loader.num_workers == 0:
            return iter(self._loader)
        gc.freeze()  # the workers never collect what they inherit
        try:
            return iter(self._loader)
        finally:
            gc.unfreeze()
