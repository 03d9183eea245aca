"""What every kdfast loader shares: the batch type, the per-rank sample order, the base class.

The order of samples is decided here, once, for every loader (DALI, PyTorch, in-memory),
so that all of them read the same samples in the same batches for a given
``(seed, epoch, rank, world_size)``:

* **train**: a fresh permutation of the whole dataset each epoch
  (``numpy.random.default_rng([seed, epoch])``); global step ``s`` takes the samples
  ``perm[s*G:(s+1)*G]`` with ``G = batch_size * world_size``, and rank ``r`` its ``r``-th
  slice of ``batch_size``. So a global batch holds the same samples whatever the number
  of processes it is split over, and every rank runs the same number of steps (the last,
  incomplete global batch is dropped; a different one every epoch).
* **val**: no shuffling; rank ``r`` reads the contiguous block
  ``[N*r // W, N*(r+1) // W)`` in batches, the last one possibly smaller. Across ranks
  every sample is read exactly once: none is dropped, none is duplicated.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import numpy as np
import torch

SPLITS = ("train", "val")
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: ImageNet's per-channel statistics (RGB, on the 0..1 scale), which torchvision-trained
#: teachers expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Batch(NamedTuple):
    """One batch: ``images`` [B, C, H, W] (channels_last memory when asked), ``labels`` [B]
    int64 class indices, ``sample_indices`` [B] int64 stable dataset indices."""

    images: torch.Tensor
    labels: torch.Tensor
    sample_indices: torch.Tensor


def epoch_seed(*parts: int) -> int:
    """A 31-bit seed derived from integers (seed, epoch, rank, …), the same on every run."""
    return int(np.random.default_rng([int(p) for p in parts]).integers(0, 2**31 - 1))


class SampleOrder:
    """Which sample indices rank ``rank`` reads, in order, in each epoch (see module doc)."""

    def __init__(self, num_samples: int, batch_size: int, split: str, rank: int, world_size: int, seed: int):
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
        self.num_samples, self.batch_size, self.split = num_samples, batch_size, split
        self.rank, self.world_size, self.seed = rank, world_size, seed
        if split == "train":
            global_batch = batch_size * world_size
            self.num_batches = num_samples // global_batch
            if self.num_batches == 0:
                raise ValueError(
                    f"batch_size * world_size = {global_batch} is larger than the {num_samples} training samples: "
                    f"not even one training step fits; use a smaller batch_size"
                )
        else:
            self.begin = num_samples * rank // world_size
            self.end = num_samples * (rank + 1) // world_size
            self.num_batches = math.ceil((self.end - self.begin) / batch_size)

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for ``epoch``, in reading order (int64)."""
        if self.split == "val":
            return np.arange(self.begin, self.end, dtype=np.int64)
        permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        steps = permutation[: self.num_batches * self.batch_size * self.world_size]
        steps = steps.reshape(self.num_batches, self.world_size, self.batch_size)
        return np.ascontiguousarray(steps[:, self.rank, :].reshape(-1)).astype(np.int64)


def per_class_subset(labels, per_class: int, seed: int = 0) -> np.ndarray:
    """The sorted positions of ``per_class`` samples of each class of ``labels``: the first
    ``per_class`` of each class's permutation by ``numpy.random.default_rng(seed)`` (all of a
    class that has fewer). The choice depends on the labels and the seed only, so every run,
    rank and loader of a dataset keeps the same samples."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(np.flatnonzero(labels == label))[:per_class] for label in np.unique(labels)]
    return np.sort(np.concatenate(kept))


def check_output_dtype(dtype) -> torch.dtype:
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of torch.float32, torch.float16, torch.bfloat16, got {dtype!r}")
    return dtype


class Loader:
    """Base of every kdfast loader: an iterable of :class:`Batch` for one split and rank.

    ``len(loader)`` is the number of batches this rank reads per epoch. Iterating reads the
    epoch set by :meth:`set_epoch` (0 at first; like ``DistributedSampler``, call it at the
    start of every epoch so that training shuffles differently). :meth:`iterate` reads a
    given epoch from a given batch on, which is how a resumed run skips what it has seen.
    """

    classes: list[str]
    image_shape: tuple[int, int, int]  # (channels, height, width) of each image

    def __init__(self, order: SampleOrder, labels: np.ndarray, device: torch.device, dtype: torch.dtype,
                 channels_last: bool):
        self.order = order
        self.sample_labels = np.asarray(labels, dtype=np.int64)
        self.device = torch.device(device)
        self.dtype = check_output_dtype(dtype)
        self.channels_last = bool(channels_last)
        self.epoch = 0

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_samples(self) -> int:
        """Number of samples in the split (all ranks together)."""
        return self.order.num_samples

    @property
    def batch_size(self) -> int:
        return self.order.batch_size

    def __len__(self) -> int:
        return self.order.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate(self.epoch)

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from batch number ``start_batch`` on."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        indices = self.order.indices(epoch)[start_batch * self.batch_size:]
        if len(indices) == 0:
            return iter(())
        return self._read(indices, epoch, start_batch)

    def _read(self, indices: np.ndarray, epoch: int, start_batch: int) -> Iterator[Batch]:
        raise NotImplementedError

    def _finish(self, images: torch.Tensor, indices: torch.Tensor) -> Batch:
        """Final layout and dtype of a normalized NCHW (or channels_last) batch, plus its labels."""
        images = images.to(device=self.device, dtype=self.dtype, non_blocking=True)
        images = images.contiguous(memory_format=self.memory_format)
        indices = indices.to(dtype=torch.int64)  # on the CPU: every loader reads its indices there
        labels = torch.from_numpy(self.sample_labels[indices.numpy()])
        return Batch(images, labels.to(self.device, non_blocking=True), indices.to(self.device, non_blocking=True))
