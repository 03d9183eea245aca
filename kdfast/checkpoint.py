"""Checkpoints that survive a kill: atomic writes, a checksum, and fallback to the previous one.

A training checkpoint is the file ``checkpoint-<step>.pt`` in the run folder:
``MAGIC`` (8 bytes), the SHA-256 of the payload (32 bytes), then the payload (``torch.save``
of a dict of tensors and plain Python values, loadable with ``weights_only=True``). It is
written to a temporary file in the same folder, flushed to disk, and renamed over its final
name, so a kill at any moment leaves either the old set of files or the new one, never a
half-written checkpoint under a final name. Reading verifies the magic and the checksum, so
a truncated or damaged file is reported as such (never unpickled), and
:func:`latest_checkpoint` falls back to the newest one that verifies.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
from pathlib import Path

import torch

LOGGER = logging.getLogger("kdfast.checkpoint")
MAGIC = b"KDFCKPT1"
_NAME = re.compile(r"checkpoint-(\d+)\.pt$")

__all__ = ["CheckpointError", "atomic_write_bytes", "latest_checkpoint", "list_checkpoints", "read_checkpoint_file",
           "save_state_dict", "write_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, damaged or not a checkpoint."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, fsync, rename, fsync of the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself reaches the disk
    finally:
        os.close(directory)


def _serialize(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_state_dict(path: str | os.PathLike, state_dict: dict) -> None:
    """Atomically save a plain state dict (``torch.load``-able, like torchvision's files)."""
    atomic_write_bytes(path, _serialize(state_dict))


def write_checkpoint(directory: str | os.PathLike, state: dict, step: int, keep: int = 2) -> Path:
    """Write ``state`` as ``directory/checkpoint-<step>.pt`` and delete all but the ``keep`` newest."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    payload = _serialize(state)
    path = Path(directory) / f"checkpoint-{step:09d}.pt"
    atomic_write_bytes(path, MAGIC + hashlib.sha256(payload).digest() + payload)
    for old in list_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The training checkpoints in ``directory``, newest (highest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in directory.iterdir() if (match := _NAME.match(path.name))]
    return [path for _, path in sorted(found, reverse=True)]


def read_checkpoint_file(path: str | os.PathLike, *, what: str = "checkpoint"):
    """Load a kdfast checkpoint (verifying its checksum) or a plain ``torch.save`` file.

    Always ``weights_only=True`` and onto the CPU. Raises :class:`CheckpointError` naming
    the file and what is wrong with it.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} does not exist") from None
    except OSError as error:
        raise CheckpointError(f"{what} {path} cannot be read: {error}") from None
    if data.startswith(MAGIC):
        digest, payload = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
        if len(digest) < 32 or hashlib.sha256(payload).digest() != digest:
            raise CheckpointError(f"{what} {path} is truncated or damaged (its SHA-256 does not match; "
                                  f"{len(data)} bytes)")
        data = payload
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, pickle errors, EOFError … for a bad file
        raise CheckpointError(f"{what} {path} is not a readable PyTorch file ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''})") from None


def latest_checkpoint(directory: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``directory`` that verifies, as (path, state); None if there is none.

    A damaged newer checkpoint is reported (logged as a warning) and skipped.
    """
    for path in list_checkpoints(directory):
        try:
            return path, read_checkpoint_file(path)
        except CheckpointError as error:
            LOGGER.warning("%s; using the previous checkpoint", error)
    return None
