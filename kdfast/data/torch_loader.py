"""PyTorch fallback loader: Pillow decode in ``DataLoader`` workers, for machines without DALI.

Same transforms, batches and outputs as the DALI loader (torchvision's ImageNet recipe,
written on Pillow because torchvision is not a dependency):

* train: random-resized crop (area 8–100 %, aspect ratio 3/4–4/3, ten tries then a center
  crop, as torchvision's ``RandomResizedCrop``), bilinear (antialiased) resize to
  ``image_size``, horizontal flip with probability ½;
* val: the central region that "resize the shorter side to ``resize_size``, center crop
  ``image_size``" keeps, resized in one step.

Each sample's random crop and flip come from its own generator, seeded by
``(seed, epoch, sample index)`` (:func:`kdfast.data.augment.train_augmentation`, which the
offline teacher cache records too): the augmentation does not depend on the number of
workers, the batch or the rank, and a resumed run sees the same images.

Given an ``augmentation`` (``(epoch, sample indices) → (boxes, flips)``, e.g. a teacher
cache's :meth:`~kdfast.cache.TeacherCache.augmentation`), the training crops are not drawn
but replayed: each sample's box and flip are looked up and applied by the same
:func:`~kdfast.data.augment.apply_augmentation` (the images are those the cache's teacher saw,
bit for bit).

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
from typing import Iterator

import numpy as np
import torch

from kdfast.data.augment import (  # noqa: F401 - random_resized_crop_box, to_rgb: imported from here too
    apply_augmentation, center_crop_box, decode_rgb, random_resized_crop_box, to_rgb, train_augmentation,
)
from kdfast.data.common import IMAGENET_MEAN, IMAGENET_STD, Batch, Loader, SampleOrder
from kdfast.data.folder import SplitIndex


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
        index, epoch, *recorded = item
        image = decode_rgb(self.files[index])
        if recorded:  # a replayed augmentation (box, flip), e.g. a teacher cache's
            box, flip = recorded
        elif self.train:
            box, flip = train_augmentation(self.seed, epoch, index, *image.size)
        else:
            box, flip = center_crop_box(*image.size, self.image_size, self.resize_size), False
        return apply_augmentation(image, box, flip, self.image_size), index


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
    """The batches of (sample index, epoch) the loader reads next; reset before each epoch.

    With an ``augmentation`` (see :func:`kdfast.data.make_loader`), each item also carries
    its replayed box and flip: (sample index, epoch, box, flip). They are looked up a batch
    at a time in this process, as the DataLoader asks for the batch (its prefetching
    included), so the workers never open what the augmentation reads."""

    def __init__(self, augmentation=None):
        self.augmentation = augmentation
        self.batches: list[np.ndarray] = []
        self.epoch = 0

    def __iter__(self):
        for batch in self.batches:
            if self.augmentation is None:
                yield [(int(i), self.epoch) for i in batch]
            else:
                boxes, flips = self.augmentation(self.epoch, batch)
                yield [(int(i), self.epoch, tuple(int(v) for v in box), bool(flip))
                       for i, box, flip in zip(batch, boxes, flips)]

    def __len__(self):
        return len(self.batches)


class TorchLoader(Loader):
    """Batches of an image folder decoded by Pillow in ``torch.utils.data.DataLoader`` workers."""

    def __init__(self, index: SplitIndex, order: SampleOrder, *, image_size: int, resize_size: int, device,
                 dtype, channels_last: bool, num_workers: int, augmentation=None):
        super().__init__(order, index.labels, device, dtype, channels_last)
        self.index, self.classes = index, index.classes
        self.image_shape = (3, image_size, image_size)
        self._on_gpu = self.device.type == "cuda"
        self._batches = _EpochBatches(augmentation)
        dataset = _FolderImages(index.files, order.split == "train", image_size, resize_size, order.seed)
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self._batches, num_workers=num_workers,
            collate_fn=_Collate(None if self._on_gpu else (self.dtype, self.memory_format)),
            pin_memory=self._on_gpu, persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
        )

    def _read(self, indices: np.ndarray, epoch: int, start_batch: int) -> Iterator[Batch]:
        size = self.batch_size
        self._batches.batches = [indices[b:b + size] for b in range(0, len(indices), size)]
        self._batches.epoch = epoch
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
