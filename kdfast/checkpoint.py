"""Checkpoints that survive a kill: atomic writes, a checksum, and fallback to the previous one.

A training checkpoint is the file ``checkpoint-<step>.pt`` in the run folder:
``MAGIC`` (8 bytes), the SHA-256 of the payload (32 bytes), then the payload (``torch.save``
of a dict of tensors and plain Python values, loadable with ``weights_only=True``). It is
written to a temporary file in the same folder, flushed to disk, and renamed over its final
name, so a kill at any moment leaves either the old set of files or the new one, never a
half-written checkpoint under a final name. Reading verifies the magic and the checksum, so
a truncated or damaged file is reported as such (never unpickled), and
:func:`latest_checkpoint` falls back to the newest one that verifies (and passes the
caller's check: the trainer checks that a checkpoint is of this run's model and options).
The temporary file of a write that was killed is an orphan, ``.<name>.<random>.tmp``;
:func:`remove_orphaned_temporaries` deletes them when a run starts.

:class:`RunLock` is the run folder's exclusive lock: one run at a time per folder.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import logging
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import torch

LOGGER = logging.getLogger("kdfast.checkpoint")
MAGIC = b"KDFCKPT1"
_NAME = re.compile(r"checkpoint-(\d+)\.pt$")

__all__ = ["CheckpointError", "RunFolderBusy", "RunLock", "atomic_write_bytes", "latest_checkpoint",
           "list_checkpoints", "read_checkpoint_file", "remove_orphaned_temporaries", "save_state_dict",
           "write_checkpoint"]


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

    Always ``weights_only=True`` and onto the CPU; ``argparse.Namespace`` (a holder of plain
    values) is allowed besides, since RepDistiller's training scripts save their options with
    the model (``{'opt': …, 'model': …}``, their ``<model>_last.pth``). Raises
    :class:`CheckpointError` naming the file and what is wrong with it.
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
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, pickle errors, EOFError … for a bad file
        raise CheckpointError(f"{what} {path} is not a readable PyTorch file ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''})") from None


def latest_checkpoint(directory: str | os.PathLike, check=None,
                      problems: list | None = None) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``directory`` that verifies, as (path, state); None if there is none.

    ``check(path, state)``, when given, may reject a checkpoint that verifies by raising
    :class:`CheckpointError` (the trainer's: not a training checkpoint, another model, other
    options). A rejected or damaged newer checkpoint is reported (logged as a warning) and
    skipped; each one is appended to ``problems`` as ``(path, reason)`` when it is a list.
    """
    paths = list_checkpoints(directory)
    for position, path in enumerate(paths):
        try:
            state = read_checkpoint_file(path)
            if check is not None:
                check(path, state)
            return path, state
        except CheckpointError as error:
            if problems is not None:
                problems.append((path, str(error)))
            LOGGER.warning("%s; %s", error, "using the previous checkpoint" if position + 1 < len(paths)
                           else "no older checkpoint")
    return None


#: The temporary files of :func:`atomic_write_bytes` for the files a run writes.
_TEMPORARY = re.compile(r"\.(checkpoint-\d+\.pt|model\.pt|adapter\.pt|chain\.pt|config\.yaml|summary\.json|"
                        r"metrics\.jsonl)\.[^.]+\.tmp$")


def remove_orphaned_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writes left in a run folder; returns them.

    Only safe while the folder's :class:`RunLock` is held (another run's write in progress
    has a temporary file too)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        if _TEMPORARY.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class RunFolderBusy(ValueError):
    """Another run holds the run folder's lock."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder: the file ``.kdfast.lock`` in it, locked with ``flock``.

    The lock belongs to the open file, so it goes away with the process however that ends
    (a SIGKILL included): there is no stale lock to clean up. The file holds the holder's
    PID, host and start time, for the message a second run gets. Processes forked by the
    holder (DataLoader workers) inherit the lock; when the holder is dead but its orphaned
    children still hold it, :meth:`acquire` waits for them up to ``stale_wait`` seconds.
    A holder on another host cannot be checked: :meth:`acquire` waits up to ``remote_wait``
    seconds for its lock to go (a network filesystem keeps the lock of a crashed node until
    its lease expires, 90 s by default on NFSv4: a requeued job must not fail on it).

    Where ``flock`` is not supported (some Lustre mounts), the file's contents are the lock:
    a live process of this host named in it blocks, anything else is taken over. On network
    filesystems ``flock`` reaches other hosts only where the filesystem forwards it (NFS
    does, as byte-range locks, unless mounted with ``local_lock=flock``/``all``); elsewhere
    two runs on different hosts are not kept apart.
    """

    NAME = ".kdfast.lock"

    def __init__(self, directory: str | os.PathLike, stale_wait: float = 30.0, remote_wait: float = 120.0):
        self.path = Path(directory) / self.NAME
        self.stale_wait = stale_wait
        self.remote_wait = remote_wait
        self._handle = None

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text() or "{}")
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _describe(self, holder: dict) -> str:
        if not holder:
            return "a process that did not record itself"
        return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
                + (f": {holder['command']}" if holder.get("command") else ""))

    def _busy(self, holder: dict, extra: str = "") -> RunFolderBusy:
        return RunFolderBusy(f"run folder {self.path.parent} is in use by another kdfast run ({self._describe(holder)})"
                             f"{extra}; two runs in one folder would mix their config, metrics, checkpoints and "
                             f"weights. Wait for it to end, or pass another --output (the lock is {self.path})")

    def acquire(self, command: str = "") -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        handle = open(self.path, "a+")
        deadline = None
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                holder = self._holder()
                pid = holder.get("pid")
                local = holder.get("host") == host
                if local and isinstance(pid, int) and not _process_alive(pid):
                    # The recorded holder is dead, but processes it forked still hold the lock.
                    wait, extra = self.stale_wait, (f"; that process is dead but processes it started still hold "
                                                    f"the lock after {self.stale_wait:.0f} s (end them)")
                elif holder.get("host") and not local:
                    wait, extra = self.remote_wait, (f"; still locked after {self.remote_wait:.0f} s (if that run "
                                                     f"is over, its host's lock has not been released yet)")
                else:
                    handle.close()
                    raise self._busy(holder) from None
                if deadline is None:
                    deadline = time.monotonic() + wait
                    LOGGER.warning("run folder %s is locked by %s; waiting up to %.0f s for the lock", self.path.parent,
                                   self._describe(holder), wait)
                if time.monotonic() > deadline:
                    handle.close()
                    raise self._busy(holder, extra) from None
                time.sleep(0.5)
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    handle.close()
                    raise
                LOGGER.warning("the filesystem of %s does not support flock (%s); the run folder is guarded by the "
                               "PID recorded in %s only", self.path.parent, error, self.path)
                holder = self._holder()
                pid = holder.get("pid")
                if (holder.get("host") == host and isinstance(pid, int) and pid != os.getpid()
                        and _process_alive(pid)):
                    handle.close()
                    raise self._busy(holder) from None
                locked = False
                break
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": command, "flock": locked}) + "\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Unlock (the file stays: removing it would race with a run about to lock it)."""
        if self._handle is not None:
            try:
                self._handle.seek(0)
                self._handle.truncate()  # no holder recorded: nothing looks like a live run
                self._handle.flush()
            except OSError:
                pass
            self._handle.close()
            self._handle = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *_):
        self.release()
