"""The on-disk format of a teacher cache (one folder); see :mod:`kdfast.cache` for the layout.

Everything about file names, the record layout and the manifest lives here, so that the
builder and the reader cannot disagree.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Value dtypes of the stored top-k logits: name → (numpy dtype of the field, bytes).
#: bfloat16 is kept as its raw 16 bits (numpy has no bfloat16).
VALUE_DTYPES = {"float16": "<f2", "bfloat16": "<u2", "float32": "<f4"}
#: Mix kinds of the reserved mixup/cutmix fields (format version 1 records none).
MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2
#: Crop-box coordinates are int16: images up to 32767 pixels a side.
MAX_BOX_COORDINATE = 32767


class CacheError(ValueError):
    """A teacher cache that cannot be used or built as asked; the message says why."""


class CacheMismatchError(CacheError):
    """A cache opened for a dataset, classes, image size, transform or teacher it was not built for."""


def index_dtype(num_classes: int) -> str:
    """int16 class indices when C ≤ 32767, else int32."""
    return "<i2" if num_classes <= 32767 else "<i4"


def record_dtype(num_classes: int, top_k: int, values_dtype: str, num_temperatures: int) -> np.dtype:
    """The packed record of one (epoch, sample); 64 bytes at k = 10, fp16 values, two temperatures.

    Fields: ``box`` int16[4] (left, top, right, bottom in source-image pixels; may reach
    outside the image, e.g. the digits' shifts), ``flip`` uint8 (1: mirrored left-right
    after the crop), ``mix_kind`` uint8 / ``mix_partner`` int32 / ``mix_lambda`` float16
    (reserved for mixup/cutmix: kind 0, partner −1, λ 1 in format version 1), ``indices``
    int16/int32[k] (top-k classes, largest logit first, ties by class index), ``values``
    [k] (their logits: float16, bfloat16 bits as uint16, or float32), ``log_sum_exp``
    float32[T] (the full row's log-sum-exp of logits/τ per temperature).
    """
    if values_dtype not in VALUE_DTYPES:
        raise CacheError(f"values dtype must be one of {sorted(VALUE_DTYPES)}, got {values_dtype!r}")
    return np.dtype([
        ("box", "<i2", (4,)),
        ("flip", "u1"),
        ("mix_kind", "u1"),
        ("mix_partner", "<i4"),
        ("mix_lambda", "<f2"),
        ("indices", index_dtype(num_classes), (top_k,)),
        ("values", VALUE_DTYPES[values_dtype], (top_k,)),
        ("log_sum_exp", "<f4", (num_temperatures,)),
    ])


def record_bytes_by_field(dtype: np.dtype) -> dict[str, int]:
    return {name: dtype.fields[name][0].itemsize for name in dtype.names}


def shard_name(epoch: int, part: int) -> str:
    return f"epoch-{epoch:04d}.part-{part:05d}.npy"


def shard_plan(manifest: dict) -> list[dict]:
    """Every shard of a cache in build order: name, epoch, first sample, sample count.

    Epoch e's samples 0..N−1 are cut into parts of ``shard_samples``; shard number s (in
    this order) is built by rank ``s mod world_size``."""
    num_samples, per_shard = manifest["num_samples"], manifest["shard_samples"]
    parts = max(1, math.ceil(num_samples / per_shard))
    plan = []
    for epoch in range(manifest["epochs"]):
        for part in range(parts):
            begin = part * per_shard
            plan.append({"name": shard_name(epoch, part), "epoch": epoch, "begin": begin,
                         "count": min(per_shard, num_samples - begin)})
    return plan


def manifest_record_dtype(manifest: dict) -> np.dtype:
    return record_dtype(manifest["num_classes"], manifest["top_k"], manifest["values_dtype"],
                        len(manifest["temperatures"]))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_directory(directory: str | os.PathLike) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_shard(path: Path, records: np.ndarray) -> None:
    """``records`` as an .npy file at ``path``: temporary name, flush, fsync, rename, fsync of the folder."""
    _write_atomically(path, lambda handle: np.lib.format.write_array(handle, records, version=(1, 0),
                                                                      allow_pickle=False))


def write_manifest(directory: Path, manifest: dict) -> None:
    _write_atomically(Path(directory) / MANIFEST, lambda handle: handle.write(manifest_bytes(manifest)))


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def remove_temporaries(directory: Path, name: str) -> None:
    """Delete what a killed writer of shard ``name`` left behind (only its own rank writes it)."""
    for leftover in directory.glob(f".{name}.tmp-*"):
        leftover.unlink(missing_ok=True)


def open_shard(path: Path, dtype: np.dtype, count: int) -> np.memmap:
    """The shard's records, memory-mapped read-only; CacheError saying what is wrong with the file."""
    try:
        records = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise CacheError(f"{path.name}: missing") from None
    except Exception as error:  # noqa: BLE001 - a damaged header or a truncated file, whatever numpy says
        raise CacheError(f"{path.name}: damaged ({type(error).__name__}: {error})") from None
    if records.dtype != dtype or records.shape != (count,):
        raise CacheError(f"{path.name}: damaged (holds {records.dtype} {records.shape}, expected {count} records of "
                         f"{dtype.itemsize} bytes)")
    size = path.stat().st_size
    if size != records.offset + records.nbytes:
        raise CacheError(f"{path.name}: damaged ({size} bytes, expected {records.offset + records.nbytes})")
    return records


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{directory} is not a teacher cache: {MANIFEST} is missing (build one with `kdfast cache "
                         f"build`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CacheError(f"{path} cannot be read: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "kdfast-teacher-cache":
        raise CacheError(f"{path} is not a kdfast teacher-cache manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path} has format version {manifest.get('format_version')}; this kdfast reads version "
                         f"{FORMAT_VERSION}")
    return manifest


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def manifest_teachers(manifest: dict) -> list[str]:
    """The architectures of the cache's teachers, in order (one for a single-teacher cache)."""
    architecture = manifest["teacher"]["architecture"]
    return list(architecture) if isinstance(architecture, list) else [architecture]


def describe_manifest_teacher(manifest: dict) -> str:
    """``resnet56`` or, for a combination, ``resnet56 + wrn40_2 (mean of their logits, weights 0.5:0.5)``."""
    from kdfast.teachers import describe_teachers

    teacher = manifest["teacher"]
    return describe_teachers(manifest_teachers(manifest), teacher.get("combine", "logits"), teacher.get("weights"),
                             teacher.get("temperature"))
