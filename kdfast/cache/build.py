"""``kdfast cache build``: record each (epoch, sample)'s augmentation and the teacher's top-k output.

What is recorded is what online training draws (:mod:`kdfast.data.augment` for image
folders, the digits' one-pixel shifts for ``data="digits"``): each sample's crop box and
flip for every augmentation epoch, and the teacher's output on exactly that crop, decoded
and resized by the PyTorch loader's own code.

**Determinism.** The teacher runs in eval mode under ``torch.use_deterministic_algorithms``,
without gradients, on blocks of ``batch_size`` samples cut from each shard's first sample
on (the shard is the unit of work: a shard's blocks are the same whichever rank builds
it). A row's logits then depend only on its own image, the teacher and its block's
shape — not on which rank builds the shard, how many ranks there are, how many loader
workers decode, or whether the build was killed and resumed. So the shards' bytes are identical for 1 or many processes and for a resumed or
an uninterrupted build, on the same device type and PyTorch build (and, on CPUs, the same
number of threads per process: pass ``--threads``, since torchrun sets
``OMP_NUM_THREADS=1``). They do depend on ``batch_size``: PyTorch's kernels pick their
blocking by the batch shape, so a row's logits differ by about one float32 rounding
(measured: up to 1e-6 for resnet8 between batches of 1 and 100) between batch sizes.
``batch_size`` is therefore part of the cache's settings, and resuming with another one
is refused.

**Processes.** Shard number s is built by rank ``s mod world_size`` (``RANK`` and
``WORLD_SIZE`` from torchrun); no process talks to another. Rank 0 then waits for every
shard file to appear, checksums them and writes the finished manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kdfast.cache.format import (
    FORMAT_VERSION, MANIFEST, MAX_BOX_COORDINATE, MIX_NONE, VALUE_DTYPES, CacheError, index_dtype,
    manifest_bytes,
    open_shard, read_manifest, record_dtype, remove_temporaries, sha256_file, shard_plan, write_manifest,
    write_shard,
)
from kdfast.data.common import IMAGENET_MEAN, IMAGENET_STD, SampleOrder
from kdfast.data.digits import DIGITS_NAME, NATIVE_SIZE
from kdfast.execution import execution_settings
from kdfast.teachers import MODES, TeacherEnsemble

LOGGER = logging.getLogger("kdfast.cache")

DEFAULT_TEMPERATURES = (1.0, 4.0)
DEFAULT_SHARD_SAMPLES = 65536
_AMP_DTYPES = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Manifest keys that are not the cache's identity: a resumed build may differ in them.
_NOT_IDENTITY = ("complete", "shards", "compute")
#: What a cache folder may hold besides its manifest: shards and the temporaries of their writers.
_SHARD_FILE = re.compile(r"\.?epoch-\d{4,}\.part-\d{5,}\.npy(\.tmp-\d+)?|\.manifest\.json\.tmp-\d+")


# --------------------------------------------------------------------------- datasets

def _digest_lines(lines) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode())
    return digest.hexdigest()


def dataset_fingerprint(data: str | os.PathLike, exclude=None) -> dict:
    """The training split's identity: for a folder, the SHA-256 of its classes and of its sorted
    file list (relative path, size in bytes, class of every sample, after ``exclude``); for the
    digits, of the split's images and labels."""
    return _open_source(str(data), image_size=None, seed=0, exclude=exclude, fingerprint_only=True).fingerprint


def training_transform(data: str | os.PathLike) -> dict:
    """The training augmentation of ``data`` as a cache's manifest records it (``transform``):
    the digits' one-pixel shifts, or an image folder's random-resized crop and flip
    (:data:`kdfast.data.augment.TRAIN_TRANSFORM`). A reader compares it with the manifest's."""
    if os.fspath(data) == DIGITS_NAME:
        return {
            "kind": "digits_shift",
            "rng": "numpy.random.default_rng([seed, epoch]).integers(-1, 2, size=(N, 2)): (dy, dx) of sample i in row i",
            "box": "(dx, dy, dx + 8, dy + 8) in the 8x8 source pixels (background outside); no flip",
            "resize": "torch bilinear (antialiased) from 8 to image_size",
            "normalization": "the training split's pixel mean and standard deviation",
        }
    from kdfast.data.augment import TRAIN_TRANSFORM

    return dict(TRAIN_TRANSFORM, normalization=f"ImageNet mean {list(IMAGENET_MEAN)}, std {list(IMAGENET_STD)}")


class _DigitsSource:
    """The digits' training split in memory; each sample's shift is its crop box, never a flip."""

    def __init__(self, image_size: int | None, seed: int):
        from kdfast.data.digits import DigitsLoader, digits_split

        images, labels, numbers = digits_split("train")
        self.num_samples = len(labels)
        self.classes = [str(digit) for digit in range(10)]
        self.in_channels = 1
        self.seed = seed
        digest = hashlib.sha256(numbers.astype("<i8").tobytes() + labels.astype("<i8").tobytes()
                                + images.astype("<f4").tobytes())
        self.fingerprint = {"kind": "digits", "split": "train", "samples": self.num_samples,
                            "sha256": digest.hexdigest()}
        self._loader = None
        if image_size is not False:
            order = SampleOrder(self.num_samples, 1, "train", 0, 1, seed)
            self._loader = DigitsLoader(order, image_size=image_size, device="cpu", dtype=torch.float32,
                                        channels_last=False)
            self.image_size = self._loader.image_size
        self.transform = training_transform(DIGITS_NAME)
        self._shifts: dict[int, np.ndarray] = {}

    def batches(self, blocks):
        """Normalized float32 images, boxes [n, 4], flips [n] of each block (epoch, indices)."""
        from kdfast.data.digits import digits_shifts

        for epoch, indices in blocks:
            if epoch not in self._shifts:
                self._shifts = {epoch: digits_shifts(self.seed, epoch, self.num_samples)}
            shifts = self._shifts[epoch][indices]
            images = self._loader.render(torch.from_numpy(indices), shifts)
            boxes = np.stack([shifts[:, 1], shifts[:, 0], shifts[:, 1] + NATIVE_SIZE, shifts[:, 0] + NATIVE_SIZE], 1)
            yield images, boxes, np.zeros(len(indices), dtype=bool)

    def close(self):
        pass


class _FolderItems(torch.utils.data.Dataset):
    """One sample's training crop (uint8 HWC), box and flip; items are (sample index, epoch)."""

    def __init__(self, files, image_size: int, seed: int):
        self.files, self.image_size, self.seed = files, image_size, seed

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        from kdfast.data.augment import apply_augmentation, decode_rgb, train_augmentation

        index, epoch = item
        image = decode_rgb(self.files[index])
        box, flip = train_augmentation(self.seed, epoch, index, *image.size)
        return apply_augmentation(image, box, flip, self.image_size), box, flip


def _collate(samples):
    images = torch.from_numpy(np.stack([image for image, _, _ in samples]))
    boxes = np.array([box for _, box, _ in samples], dtype=np.int64)
    return images, boxes, np.array([flip for _, _, flip in samples], dtype=bool)


class _FolderSource:
    """An image folder's training split, decoded by Pillow in DataLoader workers (the torch loader's code)."""

    def __init__(self, data: str, image_size: int | None, seed: int, exclude, workers: int = 0,
                 fingerprint_only: bool = False):
        from kdfast.data.folder import index_split

        index = index_split(data, "train", exclude=exclude)
        self.files, self.num_samples, self.classes = index.files, len(index), index.classes
        self.in_channels, self.image_size, self.seed, self.workers = 3, image_size or 224, seed, workers
        root = Path(index.root)
        lines = [f"class\t{name}\n" for name in index.classes]
        lines += [f"{os.path.relpath(path, root)}\t{os.stat(path).st_size}\t{label}\n"
                  for path, label in zip(index.files, index.labels)]
        self.fingerprint = {"kind": "folder", "split": "train", "samples": len(index), "sha256": _digest_lines(lines)}
        self.transform = training_transform(data)
        self._loader = None

    def batches(self, blocks):
        from kdfast.data.torch_loader import normalize

        batches = [[(int(i), epoch) for i in indices] for epoch, indices in blocks]
        if not batches:
            return
        self._loader = torch.utils.data.DataLoader(
            _FolderItems(self.files, self.image_size, self.seed), batch_sampler=batches,
            num_workers=self.workers, collate_fn=_collate, prefetch_factor=4 if self.workers > 0 else None)
        for images, boxes, flips in self._loader:
            yield normalize(images, torch.float32), boxes, flips

    def close(self):
        self._loader = None


def _open_source(data: str, image_size, seed: int, exclude=None, workers: int = 0, fingerprint_only: bool = False):
    if data == DIGITS_NAME:
        if exclude:
            raise CacheError("exclude names files of an image folder; data='digits' is held in memory and has none")
        return _DigitsSource(False if fingerprint_only else image_size, seed)
    return _FolderSource(data, image_size, seed, exclude, workers, fingerprint_only)


# --------------------------------------------------------------------------- building

def _check(name: str, value, kind, low=None, choices=None):
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind is not bool else isinstance(value, bool)
    if ok and low is not None:
        ok = value >= low
    if ok and choices is not None:
        ok = value in choices
    if not ok:
        allowed = f"one of {list(choices)}" if choices is not None else (
            f"an integer >= {low}" if kind is int else f"a {getattr(kind, '__name__', kind)}")
        raise CacheError(f"{name} must be {allowed}, got {value!r}")
    return value


def _checkpoint_sha256(path) -> str:
    if not Path(path).is_file():
        raise CacheError(f"teacher checkpoint {path} does not exist")
    return sha256_file(path)


def _pick_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise CacheError("device='cuda' was asked for but PyTorch sees no CUDA GPU")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


class _Progress:
    """One throttled progress line on stderr (rank 0): images done, images/s, ETA."""

    def __init__(self, mode: str, total: int, world_size: int, enabled: bool):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.total, self.world_size = total, world_size
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, images: int, final: bool = False) -> None:
        self.done += images
        now = time.monotonic()
        interval = 0.5 if self.mode == "bar" else 10.0
        if self.mode == "none" or (not final and now - self.last < interval):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if math.isfinite(left) else "?"
        ranks = f" (this rank's share, {self.world_size} ranks)" if self.world_size > 1 else ""
        text = f"cache build: {self.done}/{self.total} images{ranks} | {rate:,.0f} images/s | ETA {eta}"
        if self.mode == "bar":
            print("\r" + text, end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)


def _identity_differences(found: dict, wanted: dict, prefix: str = "") -> list[str]:
    differences = []
    for key in sorted(set(found) | set(wanted)):
        if not prefix and key in _NOT_IDENTITY or (prefix == "dataset." and key == "root"):
            continue
        a, b = found.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += _identity_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            show = (lambda v: f"{len(v)} names" if isinstance(v, list) and len(v) > 8 else repr(v))
            differences.append(f"{prefix}{key}: cache {show(a)}, requested {show(b)}")
    return differences


def _check_teachers(teacher, teacher_checkpoint, combine, weights, temperatures):
    """(architectures, checkpoint paths, TeacherEnsemble's combination keywords), checked."""
    def as_list(value):
        return [value] if isinstance(value, (str, os.PathLike)) else list(value)

    teachers, checkpoints = as_list(teacher), [os.fspath(c) for c in as_list(teacher_checkpoint)]
    if not teachers or not all(isinstance(name, str) and name for name in teachers):
        raise CacheError(f"teacher must be an architecture name or a non-empty list of them, got {teacher!r}")
    if len(checkpoints) != len(teachers):
        raise CacheError(f"teacher_checkpoint must give one file per teacher ({len(teachers)}: {teachers}), got "
                         f"{len(checkpoints)}: {checkpoints}")
    _check("teacher_combine", combine or "logits", str, choices=MODES)
    if weights is not None:
        weights = list(weights)
        if len(weights) != len(teachers) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                for w in weights) or not any(w > 0 for w in weights):
            raise CacheError(f"teacher_weights must be {len(teachers)} non-negative numbers, not all 0 (one per "
                             f"teacher), got {weights!r}")
    if len(teachers) > 1 and combine == "probabilities" and len(temperatures) != 1:
        raise CacheError(f"teacher_combine 'probabilities' combines the teachers' softmax at one τ, which the "
                         f"loss must then use: give exactly one temperature (the training τ), got "
                         f"{list(temperatures)}")
    weights = [1.0] * len(teachers) if weights is None else [float(w) for w in weights]
    total = math.fsum(weights)
    combination = {"weights": [w / total for w in weights], "mode": combine or "logits",
                   "temperature": float(temperatures[0])}
    return teachers, checkpoints, combination


def _teacher_manifest(teachers: list[str], checkpoints: list[str], combination: dict) -> dict:
    """The manifest's ``teacher``: one teacher's architecture, file and SHA-256 (as in every
    cache so far); several: lists of each, and the combination (mode, normalized weights,
    and τ for ``probabilities``)."""
    digests = [_checkpoint_sha256(path) for path in checkpoints]
    names = [Path(path).name for path in checkpoints]
    if len(teachers) == 1:
        return {"architecture": teachers[0], "checkpoint": names[0], "checkpoint_sha256": digests[0]}
    entry = {"architecture": teachers, "checkpoint": names, "checkpoint_sha256": digests,
             "combine": combination["mode"], "weights": combination["weights"]}
    if combination["mode"] == "probabilities":
        entry["temperature"] = combination["temperature"]
    return entry


def build_cache(data: str | os.PathLike, teacher: str | list[str], teacher_checkpoint: str | os.PathLike | list,
                output: str | os.PathLike, *, epochs: int, top_k: int, teacher_combine: str | None = None,
                teacher_weights=None, image_size: int | None = None,
                loader: str = "auto", workers: int | None = 0, seed: int = 0, amp: str = "none",
                batch_size: int = 64, temperatures=DEFAULT_TEMPERATURES, values_dtype: str = "float16",
                shard_samples: int = DEFAULT_SHARD_SAMPLES, exclude=None, threads: int | None = None,
                device: str = "auto", progress: str = "auto", rank: int | None = None,
                world_size: int | None = None, wait_timeout: float = 3600.0) -> dict:
    """Build (or finish, or repair) the teacher cache at ``output``; returns its manifest.

    Args:
        data: an image folder (its ``train`` split) or ``"digits"``.
        teacher, teacher_checkpoint: the teacher's architecture (:func:`kdfast.models.create_model`)
            and weights (:func:`kdfast.models.load_weights`); or lists of K of each, pairwise:
            the cache then records their combination (:func:`kdfast.combine_teachers`).
        teacher_combine, teacher_weights: the combination of several teachers: ``"logits"``
            (default) or ``"probabilities"`` (which needs exactly one temperature, the
            combination's τ: a loss reads it only at that τ), and one weight per teacher
            (default uniform; recorded normalized).
        output: the cache folder (created; an existing cache of the same settings is resumed).
        epochs: augmentation epochs to record (0 … epochs − 1; a reader cycles through them).
        top_k: logits kept per sample (1 ≤ k ≤ C; k = C keeps the whole row).
        image_size, seed, exclude: as ``kdfast train``'s; the crops are those its torch loader
            draws (``data="digits"``: the digits loader's shifts).
        loader: ``"auto"`` or ``"torch"`` (the teacher's input is decoded and resized by the
            torch loader's code; ``"dali"`` is refused: DALI's random crops are drawn inside
            DALI and cannot be recorded).
        workers: DataLoader decode processes (0: in this process).
        amp: the trainer's ``--amp``: the teacher runs on images of that dtype under autocast.
        batch_size: rows of every teacher forward (part of the cache's settings, see the module doc).
        temperatures: the temperatures whose full-row log-sum-exp is stored.
        values_dtype: ``"float16"`` (default), ``"bfloat16"`` or ``"float32"`` top-k logits.
        shard_samples: samples per shard file (each epoch is cut into shards of this many).
        threads: CPU threads of this process (default: PyTorch's).
        device: ``"auto"`` (``cuda:LOCAL_RANK`` when a GPU is present), ``"cpu"`` or ``"cuda"``.
        progress: ``"auto"``, ``"bar"``, ``"lines"`` or ``"none"`` (rank 0 prints, on stderr).
        rank, world_size: this process among the builders (default: torchrun's RANK, WORLD_SIZE).
        wait_timeout: rank 0 gives up waiting for the other ranks' shards when none has
            appeared for this many seconds (CacheError naming the missing shards).
    """
    from kdfast.models import create_model, load_weights

    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    _check("epochs", epochs, int, 1)
    _check("top_k", top_k, int, 1)
    _check("batch_size", batch_size, int, 1)
    _check("shard_samples", shard_samples, int, 1)
    _check("seed", seed, int, 0)
    _check("world_size", world_size, int, 1)
    _check("rank", rank, int, 0, choices=range(world_size))
    _check("amp", amp, str, choices=tuple(_AMP_DTYPES))
    _check("values_dtype", values_dtype, str, choices=tuple(VALUE_DTYPES))
    _check("loader", loader, str, choices=("auto", "torch", "dali"))
    _check("progress", progress, str, choices=("auto", "bar", "lines", "none"))
    _check("device", device, str, choices=("auto", "cpu", "cuda"))
    if workers is not None:
        _check("workers", workers, int, 0)
    if image_size is not None:
        _check("image_size", image_size, int, 1)
    if threads is not None:
        _check("threads", threads, int, 1)
    temperatures = tuple(temperatures)
    if not temperatures or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
                                   and t > 0 for t in temperatures):
        raise CacheError(f"temperatures must be positive numbers, got {list(temperatures)!r}")
    temperatures = tuple(float(t) for t in temperatures)
    if len(set(temperatures)) != len(temperatures):
        raise CacheError(f"temperatures must be distinct, got {list(temperatures)}")
    teachers, checkpoints, combination = _check_teachers(teacher, teacher_checkpoint, teacher_combine,
                                                         teacher_weights, temperatures)
    data = os.fspath(data)
    if loader == "dali":
        raise CacheError("loader 'dali' cannot build a cache: DALI draws its random crops inside the pipeline, where "
                         "they cannot be recorded; the cache records the torch loader's crops (loader 'torch' or "
                         "'auto'), which training replays")
    if data == DIGITS_NAME and loader != "auto":
        raise CacheError(f"data='digits' is held in memory (loader must be 'auto', got {loader!r})")

    source = _open_source(data, image_size, seed, exclude, workers or 0)
    num_classes = len(source.classes)
    if top_k > num_classes:
        raise CacheError(f"top_k must be at most the number of classes {num_classes}, got {top_k}")
    dtype = record_dtype(num_classes, top_k, values_dtype, len(temperatures))
    manifest = {
        "format": "kdfast-teacher-cache", "format_version": FORMAT_VERSION,
        "teacher": _teacher_manifest(teachers, checkpoints, combination),
        "dataset": dict(source.fingerprint, root=data),
        "classes": list(source.classes), "num_classes": num_classes, "num_samples": source.num_samples,
        "in_channels": source.in_channels, "image_size": source.image_size, "transform": source.transform,
        "seed": seed, "epochs": epochs, "top_k": top_k, "values_dtype": values_dtype,
        "index_dtype": "int16" if index_dtype(num_classes) == "<i2" else "int32",
        "temperatures": list(temperatures), "amp": amp, "batch_size": batch_size, "shard_samples": shard_samples,
        "record": {"bytes": dtype.itemsize, "dtype": np.lib.format.dtype_to_descr(dtype)},
        "complete": False, "shards": [],
    }
    manifest = json.loads(manifest_bytes(manifest))  # as a reader sees it (lists, not tuples)
    folder = Path(output)
    existing = None
    if (folder / MANIFEST).is_file():
        existing = read_manifest(folder)
        differences = _identity_differences(existing, manifest)
        if differences:
            raise CacheError(f"{folder} holds a cache built with other settings; not resuming it ("
                             + "; ".join(differences) + "). Use another --output, or delete the folder")
    elif folder.is_dir():
        strangers = [entry.name for entry in folder.iterdir() if not _SHARD_FILE.fullmatch(entry.name)]
        if strangers:
            raise CacheError(f"{folder} holds no {MANIFEST} and other files ({strangers[0]} …): not building a cache "
                             f"into it")
    folder.mkdir(parents=True, exist_ok=True)

    device_ = _pick_device(device)
    with execution_settings(threads, deterministic=True):
        # Not the number of ranks: it changes no byte, and the manifest is the same for any.
        manifest["compute"] = {"device": device_.type, "torch": torch.__version__, "threads": torch.get_num_threads()}
        before = (existing or {}).get("compute") or {}
        if any(before.get(key) != manifest["compute"][key] for key in ("device", "torch", "threads") if before):
            LOGGER.warning("%s was started with %s; this build runs with %s: the shards built now may differ in the "
                           "last bits from those the first settings would have given", folder, before,
                           manifest["compute"])
        if existing is None:  # every rank writes the same bytes: whichever comes first, shards follow it
            write_manifest(folder, manifest)
        plan = shard_plan(manifest)
        recorded = {shard["name"]: shard["sha256"] for shard in (existing or {}).get("shards", [])}
        mine = [shard for number, shard in enumerate(plan) if number % world_size == rank]
        todo = []
        for shard in mine:
            path = folder / shard["name"]
            remove_temporaries(folder, shard["name"])
            try:
                open_shard(path, dtype, shard["count"])
                if shard["name"] in recorded and sha256_file(path) != recorded[shard["name"]]:
                    raise CacheError(f"{shard['name']}: damaged (its SHA-256 differs from the manifest's)")
            except CacheError as error:
                if path.exists():
                    LOGGER.warning("rebuilding %s", error)
                    path.unlink()
                todo.append(shard)
        if len(todo) < len(mine) and rank == 0:
            LOGGER.info("%s: %d of this rank's %d shards are already built; building the other %d", folder,
                        len(mine) - len(todo), len(mine), len(todo))
        models = []
        for number, (name, checkpoint) in enumerate(zip(teachers, checkpoints), 1):
            model = create_model(name, num_classes, in_channels=source.in_channels, image_size=source.image_size)
            load_weights(model, checkpoint, what="teacher checkpoint" if len(teachers) == 1
                         else f"teacher checkpoint {number} ({name})")
            models.append(model)
        model = TeacherEnsemble(models, **combination).to(device_)
        _record(model, source, todo, folder, dtype, manifest, device_, _Progress(
            progress, sum(shard["count"] for shard in todo), world_size, rank == 0))
    source.close()
    if rank != 0:
        return manifest
    manifest["shards"] = _collect(folder, plan, dtype, world_size, wait_timeout)
    manifest["complete"] = True
    write_manifest(folder, manifest)
    return manifest


def _record(model, source, todo: list[dict], folder: Path, dtype: np.dtype, manifest: dict, device: torch.device,
            progress: _Progress) -> None:
    """Run the teacher over the blocks of the shards ``todo`` and write each shard when it is full."""
    batch_size, top_k = manifest["batch_size"], manifest["top_k"]
    temperatures = manifest["temperatures"]
    image_dtype = _AMP_DTYPES[manifest["amp"]]
    blocks, owners = [], []
    for shard in todo:
        for offset in range(0, shard["count"], batch_size):
            begin = shard["begin"] + offset
            blocks.append((shard["epoch"], np.arange(begin, min(begin + batch_size, shard["begin"] + shard["count"]),
                                                     dtype=np.int64)))
            owners.append((shard, offset))
    pending: dict[str, np.ndarray] = {}
    filled: dict[str, int] = {}
    autocast = (contextlib.nullcontext() if manifest["amp"] == "none"
                else torch.autocast(device.type, dtype=image_dtype))
    for (shard, offset), (epoch, indices), (images, boxes, flips) in zip(owners, blocks, source.batches(blocks)):
        count = len(indices)
        # NCHW-contiguous, as the loaders deliver a training batch (without --channels-last): the
        # memory format picks the convolution kernels, whose float32 results differ in the last bit.
        images = images.to(device=device, dtype=image_dtype).contiguous()
        with torch.no_grad(), autocast:
            logits, _ = model(images)
        logits = logits.float().cpu()
        if not torch.isfinite(logits).all():
            row = int((~torch.isfinite(logits)).any(dim=1).nonzero()[0, 0])
            raise CacheError(f"the teacher's logits of epoch {epoch} sample {int(indices[row])} are not finite")
        if np.abs(boxes).max(initial=0) > MAX_BOX_COORDINATE:
            row = int(np.abs(boxes).max(axis=1).argmax())
            raise CacheError(f"sample {int(indices[row])}'s crop box {boxes[row].tolist()} does not fit the cache's "
                             f"int16 coordinates (images up to {MAX_BOX_COORDINATE} pixels a side)")
        ordered = torch.sort(logits, dim=1, descending=True, stable=True)
        values = ordered.values[:, :top_k]
        if manifest["values_dtype"] == "float16":
            stored = values.half()
            if not torch.isfinite(stored).all():
                raise CacheError(f"a top-k logit of epoch {epoch} overflows float16 (|logit| > 65504): build with "
                                 f"--values-dtype bfloat16 or float32")
            stored = stored.numpy()
        elif manifest["values_dtype"] == "bfloat16":
            stored = values.bfloat16().view(torch.int16).numpy().view("<u2")
        else:
            stored = values.numpy()
        records = pending.get(shard["name"])
        if records is None:
            records = pending[shard["name"]] = np.zeros(shard["count"], dtype=dtype)
            filled[shard["name"]] = 0
        rows = records[offset:offset + count]
        rows["box"] = boxes
        rows["flip"] = flips
        rows["mix_kind"] = MIX_NONE
        rows["mix_partner"] = -1
        rows["mix_lambda"] = 1.0
        rows["indices"] = ordered.indices[:, :top_k].numpy()
        rows["values"] = stored
        rows["log_sum_exp"] = torch.stack([torch.logsumexp(logits / t, dim=1) for t in temperatures], 1).numpy()
        filled[shard["name"]] += count
        if filled[shard["name"]] == shard["count"]:
            write_shard(folder / shard["name"], pending.pop(shard["name"]))
        progress.update(count)
    progress.update(0, final=True)


def _collect(folder: Path, plan: list[dict], dtype: np.dtype, world_size: int, wait_timeout: float,
             poll: float = 0.2) -> list[dict]:
    """Rank 0: wait until every shard is written (by any rank), then checksum each."""
    missing = list(plan)
    progress_at = told = time.monotonic()
    while missing:
        still = []
        for shard in missing:
            try:
                open_shard(folder / shard["name"], dtype, shard["count"])
            except CacheError as error:
                if world_size == 1:
                    raise CacheError(f"{folder}: {error} after the build (was it changed meanwhile?)") from None
                still.append(shard)
        now = time.monotonic()
        if len(still) < len(missing):
            progress_at = now
        missing = still
        if not missing:
            break
        if now - progress_at > wait_timeout:
            names = ", ".join(shard["name"] for shard in missing[:5]) + (" …" if len(missing) > 5 else "")
            raise CacheError(f"rank 0 waited for the other ranks' shards, but no shard appeared for {wait_timeout:g} s "
                             f"({len(missing)} missing: {names}); did a rank fail? Rerun the same build to finish")
        if now - told > 60:
            told = now
            LOGGER.info("waiting for %d shard(s) of the other ranks, e.g. %s", len(missing), missing[0]["name"])
        time.sleep(poll)
    return [dict(shard, bytes=(folder / shard["name"]).stat().st_size, sha256=sha256_file(folder / shard["name"]))
            for shard in plan]
