"""NVIDIA DALI loader: JPEG decode and augmentation in DALI's C++ thread pool, or on the GPU.

``device="cuda"``: files are read on the CPU and decoded by nvJPEG ("mixed" decoders, the
hardware JPEG decoder where the GPU has one), then cropped, resized, flipped and
normalized on the GPU; the batch arrives as a CUDA tensor. ``device="cpu"``: the same
pipeline in DALI's CPU-only mode (``device_id=None``, libjpeg-turbo); this is what runs
on machines without a GPU and in CI.

Transforms (torchvision's ImageNet recipe):

* train: random-resized crop (area 8–100 %, aspect ratio 3/4–4/3, decoded region of
  interest only), resize to ``image_size`` × ``image_size``, horizontal flip with
  probability ½, normalization;
* val: resize the shorter side to ``resize_size``, center crop ``image_size``, normalization;
* replay (``augmentation``, e.g. a teacher cache's): each sample's recorded crop box and
  flip come through the external source with its path; ``fn.decoders.image_slice``
  decodes just that window (anchor and shape in source pixels, EXIF orientation ignored as
  Pillow does), then resize, flip and normalization as in training. The window and flip are
  exactly the recorded ones; the pixels are DALI's decode and resize of them, within a few
  levels of the torch loader's Pillow pixels that the cache's teacher saw.

An external source hands the pipeline this rank's batches of sample indices in the order
:class:`~kdfast.data.common.SampleOrder` fixes (DALI reads the files, ``fn.io.file.read``),
so the DALI loader reads exactly the batches of the PyTorch loader; the last validation
batch is simply smaller (no padding to remove).

DALI's decoder reads the format from the bytes: PNG content under a JPEG name is decoded
as PNG. Truncated, empty, unreadable and non-image files never reach DALI — indexing the
folder finds them first (:mod:`kdfast.data.check`), because DALI's native parser can crash
the process on them. A file that passes that check and still fails to decode stops the
pipeline (DALI cannot skip a sample): whatever DALI's message (``Failed to decode sample
#k``, ``nvImageCodec failure: '#3'``, …), the loader raises
:class:`~kdfast.data.folder.DatasetError` naming the file — the files of the batches DALI
was reading are checked again, and decoded with Pillow, to find it — and how to exclude it.
Random augmentation is reproducible for a given seed and rank, from the epoch and batch a
run starts at (a resumed run draws other crops than the uninterrupted one would have).
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np
import torch

from kdfast.data.common import IMAGENET_MEAN, IMAGENET_STD, Batch, Loader, SampleOrder, epoch_seed
from kdfast.data.check import check_file
from kdfast.data.folder import EXCLUDE_HINT, DatasetError, SplitIndex

_DECODE_FAILURE = re.compile(r"Failed to decode sample #(\d+)")
# What DALI's errors about reading or decoding a file look like, when no file is named.
_READ_FAILURE = re.compile(r"decod|nvImageCodec|nvjpeg|jpeg|png|image|File mapping|file", re.IGNORECASE)

# nvJPEG's buffer sizes for ImageNet-sized images (DALI's ResNet-50 example): allocated
# once up front instead of grown while the first batches are decoded.
_DEVICE_MEMORY_PADDING = 211_025_920
_HOST_MEMORY_PADDING = 140_544_512


def dali_version() -> str | None:
    """The installed DALI's version, or None when DALI cannot be imported."""
    try:
        import nvidia.dali
    except ImportError:
        return None
    return nvidia.dali.__version__


class _BatchFeed:
    """The pipeline's external source: (encoded paths, sample indices) of the batches to read.

    DALI pulls batches ahead of the consumer; :meth:`start` hands it the next epoch's list,
    and ``fed`` remembers every batch handed out, so that a decode failure reported for the
    k-th batch can be traced to its file."""

    def __init__(self, paths: list[np.ndarray], augmentation=None):
        self.paths = paths
        self.augmentation = augmentation
        self.fed: list[np.ndarray] = []
        self._pending = iter(())
        self._epoch = 0

    def start(self, batches: list[np.ndarray], epoch: int) -> None:
        self.fed = []
        self._pending = iter(batches)
        self._epoch = epoch

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._pending)  # StopIteration ends the epoch
        self.fed.append(batch)
        outputs = [self.paths[i] for i in batch], [np.array([i], dtype=np.int64) for i in batch]
        if self.augmentation is None:
            return outputs
        # A replayed augmentation: each sample's recorded box (left, top, right, bottom, in
        # source pixels) as the decoder's region anchor (x, y) and shape (w, h), and its flip.
        boxes, flips = self.augmentation(self._epoch, batch)
        boxes = np.asarray(boxes, dtype=np.float32).reshape(len(batch), 4)
        anchors = [box[:2].copy() for box in boxes]
        shapes = [box[2:] - box[:2] for box in boxes]
        mirrors = [np.array(bool(flip), dtype=np.int32) for flip in np.asarray(flips).reshape(len(batch))]
        return (*outputs, anchors, shapes, mirrors)


def _build_pipeline(feed: _BatchFeed, *, train, image_size, resize_size, device_id, batch_size, num_threads, seed,
                    channels_last, half):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    decoder_options = dict(device="mixed", device_memory_padding=_DEVICE_MEMORY_PADDING,
                           host_memory_padding=_HOST_MEMORY_PADDING, hw_decoder_load=0.65) if gpu else dict(device="cpu")

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def pipeline():
        # Batches may be smaller than batch_size (validation's last one): DALI takes
        # variable-sized batches from an external source.
        replay = feed.augmentation is not None
        outputs = fn.external_source(source=feed, num_outputs=5 if replay else 2, batch=True, cycle="raise",
                                     dtype=[types.UINT8, types.INT64] + ([types.FLOAT, types.FLOAT, types.INT32]
                                                                         if replay else []))
        paths, indices = outputs[:2]
        jpegs = fn.io.file.read(paths)
        if replay:
            # The recorded crop window, decoded alone (region of interest), in the stored image's
            # own orientation: Pillow, which drew the boxes and fed the teacher, ignores EXIF.
            anchors, shapes, mirror = outputs[2:]
            images = fn.decoders.image_slice(jpegs, anchors, shapes, axis_names="WH", normalized_anchor=False,
                                             normalized_shape=False, adjust_orientation=False,
                                             output_type=types.RGB, **decoder_options)
            images = fn.resize(images, resize_x=image_size, resize_y=image_size)
        elif train:
            images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=[0.08, 1.0],
                                                   random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
                                                   **decoder_options)
            images = fn.resize(images, resize_x=image_size, resize_y=image_size)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder_options)
            images = fn.resize(images, resize_shorter=resize_size)
            mirror = 0
        images = fn.crop_mirror_normalize(
            images, crop=(image_size, image_size), mirror=mirror,
            mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD],
            dtype=types.FLOAT16 if half else types.FLOAT, output_layout="HWC" if channels_last else "CHW",
        )
        return images, indices

    return pipeline()


class DaliLoader(Loader):
    """Batches of an image folder decoded by DALI; see the module documentation.

    One pipeline serves every epoch: an external source hands it each epoch's list of
    batches. It is built on the first read, and again only after an error or when an
    epoch was left unfinished (its read-ahead batches belong to that epoch).
    """

    def __init__(self, index: SplitIndex, order: SampleOrder, *, image_size: int, resize_size: int, device,
                 dtype, channels_last: bool, num_threads: int, augmentation=None):
        if dali_version() is None:
            raise ImportError("loader='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                              "(or use loader='torch')")
        super().__init__(order, index.labels, device, dtype, channels_last)
        self.index, self.classes = index, index.classes
        self.image_size, self.resize_size, self.num_threads = image_size, resize_size, num_threads
        self.image_shape = (3, image_size, image_size)
        self._feed = _BatchFeed([np.frombuffer(path.encode(), dtype=np.uint8) for path in index.files], augmentation)
        if self.device.type == "cuda":
            self._device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            self._device_id = None  # DALI's CPU-only mode
        self._iterator = None
        self._reading = False  # an epoch was started and not read to its end

    def _start(self, batches: list[np.ndarray], epoch: int, start_batch: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._feed.start(batches, epoch)
        if self._iterator is not None and not self._reading:
            self._iterator.reset()  # pulls the new epoch's first batches from the feed
            return
        self._iterator = None  # frees a pipeline that still holds another epoch's batches
        order = self.order
        pipeline = _build_pipeline(
            self._feed, train=order.split == "train", image_size=self.image_size, resize_size=self.resize_size,
            device_id=self._device_id, batch_size=order.batch_size, num_threads=self.num_threads,
            seed=epoch_seed(order.seed, order.rank, epoch, start_batch), channels_last=self.channels_last,
            half=self.dtype == torch.float16,
        )
        self._iterator = DALIGenericIterator(pipeline, ["images", "indices"],
                                             last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)

    def _read(self, indices: np.ndarray, epoch: int, start_batch: int) -> Iterator[Batch]:
        size = self.batch_size
        batches = [indices[begin:begin + size] for begin in range(0, len(indices), size)]
        delivered = 0
        try:
            self._start(batches, epoch, start_batch)
            self._reading = True
            for outputs in self._iterator:
                images, sample_indices = outputs[0]["images"], outputs[0]["indices"]
                if self.channels_last:  # NHWC memory seen as NCHW: torch's channels_last
                    images = images.permute(0, 3, 1, 2)
                delivered += 1
                yield self._finish(images, sample_indices.reshape(-1).cpu())
            self._reading = False
        except RuntimeError as error:
            self._iterator = None  # DALI invalidates a pipeline that failed
            self._reading = False
            mapped = self._decode_error(error, delivered)
            if mapped is None:
                raise
            raise mapped from error

    def _decode_error(self, error: RuntimeError, delivered: int) -> DatasetError | None:
        """The DatasetError naming the file behind a DALI failure, or None when the failure
        is not about a file (then the original error propagates).

        "Failed to decode sample #k" names the k-th sample of the batch DALI was producing,
        the next one the consumer would have received. Other messages (DALI 2.4's
        ``nvImageCodec failure: '#3'``, a read error) name no sample: then every file of the
        batches handed to DALI and not delivered is checked again (structure, then a
        Pillow decode) to find the culprits."""
        message = str(error)
        summary = _summary(message)
        failed = _DECODE_FAILURE.search(message)
        pending = self._feed.fed[delivered:]
        files = [self.index.files[i] for batch in pending for i in batch]
        if failed is not None and pending and int(failed.group(1)) < len(pending[0]):
            path = self.index.files[pending[0][int(failed.group(1))]]
            culprits = [(path, _unreadable(path))]
        else:
            culprits = [(path, reason) for path in dict.fromkeys(files) if (reason := _unreadable(path))]
        if culprits:
            named = "; ".join(f"{path} ({reason + '; ' if reason else ''}DALI: {summary})"
                              for path, reason in culprits[:10])
            more = f" and {len(culprits) - 10} more" if len(culprits) > 10 else ""
            return DatasetError(f"DALI cannot decode {named}{more}; the pipeline stops at the first such file. "
                                f"{EXCLUDE_HINT}")
        if not files or (failed is None and _READ_FAILURE.search(message) is None):
            return None
        shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        return DatasetError(f"DALI failed reading a batch of {shown} (DALI: {summary}), yet kdfast's checks and "
                            f"Pillow find nothing wrong with these files; read them with loader='torch' (CLI: "
                            f"--loader torch), or list the culprit in a file and leave it out with `kdfast train ... "
                            f"--exclude FILE` (config key `exclude`).")


def _summary(message: str) -> str:
    """DALI's error without the pipeline's traceback: what it says it "encountered"."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", message)
    if "encountered:" in message:
        message = message.split("encountered:", 1)[1]
    lines = []
    for line in message.splitlines():
        line = line.split(" C++ context")[0].strip().rstrip(":").strip()
        if line and not line.startswith(("Critical error in pipeline", "Current pipeline object is no longer valid",
                                         "Stacktrace", "[/", "File \"")):
            lines.append(line)
    return " ".join(lines[:2])[:300] or "no message"


def _unreadable(path: str) -> str | None:
    """Why ``path`` fails the structural check or does not decode with Pillow, or None."""
    from kdfast.data.verify import decode_error

    return check_file(path)[1] or decode_error(path)
