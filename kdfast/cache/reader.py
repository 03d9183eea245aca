"""The reading side of a teacher cache: open (with checks), read batches, verify, describe."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from kdfast.cache.format import (
    CacheError, CacheMismatchError, describe_manifest_teacher, manifest_record_dtype, manifest_teachers, open_shard,
    read_manifest, record_bytes_by_field, sha256_file, shard_plan,
)
from kdfast.sparse_teacher import SparseTeacher


class CachedBatch(NamedTuple):
    """What a cache holds for a batch of samples in one epoch.

    ``boxes`` [B, 4] int64 crop boxes (left, top, right, bottom) in source-image pixels,
    ``flips`` [B] bool (mirrored left-right after the crop), ``teacher`` the
    :class:`SparseTeacher`, ``epoch`` the recorded epoch these came from (the requested one
    modulo the cache's epochs)."""

    boxes: torch.Tensor
    flips: torch.Tensor
    teacher: SparseTeacher
    epoch: int


class TeacherCache:
    """A finished teacher cache, its shards memory-mapped on first use.

    Open it with :meth:`open`; :meth:`read` gives a batch's augmentation and sparse teacher.
    """

    def __init__(self, directory: Path, manifest: dict):
        self.directory, self.manifest = directory, manifest
        self.dtype = manifest_record_dtype(manifest)
        self._plan = shard_plan(manifest)
        self._shards: dict[str, np.ndarray] = {}
        self._parts = len(self._plan) // manifest["epochs"]

    @classmethod
    def open(cls, directory: str | os.PathLike, *, dataset: str | os.PathLike | dict | None = None,
             exclude=None, num_classes: int | None = None, image_size: int | None = None,
             transform: dict | None = None, teacher: str | list[str] | None = None,
             checksums: bool = False) -> "TeacherCache":
        """Open the finished cache at ``directory``, checked against what training will use.

        Args:
            dataset: the training data (a folder or ``"digits"``, fingerprinted as the builder
                does, with ``exclude``) or a fingerprint dict from
                :func:`kdfast.cache.dataset_fingerprint`.
            num_classes, image_size, transform: the expected values (None: not checked).
            teacher: the expected teacher architecture, or the list of a combination's (None: not checked).
            checksums: also verify every shard's SHA-256 (reads the whole cache).

        Raises :class:`CacheMismatchError` naming every difference, and :class:`CacheError`
        for an unfinished or damaged cache.
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        if not manifest.get("complete"):
            raise CacheError(f"{directory} is an unfinished cache (its build was interrupted or is still running): "
                             f"rerun the same `kdfast cache build` to finish it")
        differences = []
        if dataset is not None:
            if not isinstance(dataset, dict):
                from kdfast.cache.build import dataset_fingerprint

                dataset = dataset_fingerprint(dataset, exclude)
            recorded = manifest["dataset"]
            for key in ("kind", "samples", "sha256"):
                if key in dataset and dataset[key] != recorded.get(key):
                    differences.append(f"dataset {key}: cache {recorded.get(key)!r}, expected {dataset[key]!r}")
        for name, wanted, found in (("num_classes", num_classes, manifest["num_classes"]),
                                    ("image_size", image_size, manifest["image_size"]),
                                    ("teacher", None if teacher is None else
                                     [teacher] if isinstance(teacher, str) else list(teacher),
                                     manifest_teachers(manifest))):
            if wanted is not None and wanted != found:
                if name == "teacher" and len(wanted) == len(found) == 1:  # one teacher: its name, not a list
                    wanted, found = wanted[0], found[0]
                differences.append(f"{name}: cache {found!r}, expected {wanted!r}")
        if transform is not None:
            recorded = manifest["transform"]
            for key in sorted(set(transform) | set(recorded)):
                if transform.get(key) != recorded.get(key):
                    differences.append(f"transform {key}: cache {recorded.get(key)!r}, expected {transform.get(key)!r}")
        if differences:
            raise CacheMismatchError(f"teacher cache {directory} does not match this run: " + "; ".join(differences))
        if checksums:
            report = verify_cache(directory)
            if not report.ok:
                raise CacheError("\n".join(report.lines()))
        return cls(directory, manifest)

    @property
    def teacher_description(self) -> str:
        """The teacher (or the teachers and their combination) in words."""
        return describe_manifest_teacher(self.manifest)

    @property
    def epochs(self) -> int:
        return self.manifest["epochs"]

    @property
    def num_samples(self) -> int:
        return self.manifest["num_samples"]

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    @property
    def temperatures(self) -> tuple[float, ...]:
        return tuple(self.manifest["temperatures"])

    def _shard(self, number: int) -> np.ndarray:
        shard = self._plan[number]
        records = self._shards.get(shard["name"])
        if records is None:
            records = self._shards[shard["name"]] = open_shard(self.directory / shard["name"], self.dtype,
                                                               shard["count"])
        return records

    def check_shards(self) -> None:
        """Open every shard (header and size, not the checksums: ``kdfast cache verify`` reads
        those); CacheError naming each missing, truncated or damaged one. A trainer calls it
        before its first step, so that a damaged cache stops the run before it starts."""
        problems = []
        for number, shard in enumerate(self._plan):
            try:
                self._shard(number)
            except CacheError as error:
                problems.append(str(error))
        if problems:
            raise CacheError(f"teacher cache {self.directory}: {len(problems)} damaged or missing shard(s): "
                             + "; ".join(problems[:5]) + (" …" if len(problems) > 5 else "")
                             + f" (`kdfast cache verify {self.directory}` lists them; rerun the same `kdfast cache "
                             f"build` to rebuild them)")

    def _records(self, epoch: int, indices) -> tuple[np.ndarray, int]:
        """(the records of samples ``indices`` in recorded epoch ``epoch mod E``, that epoch)."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        rows = torch.as_tensor(indices).to("cpu", torch.int64).numpy().reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_samples):
            raise ValueError(f"indices must be sample indices in [0, {self.num_samples}), got "
                             f"{int(rows[(rows < 0) | (rows >= self.num_samples)][0])}")
        recorded = int(epoch) % self.epochs
        per_shard = self.manifest["shard_samples"]
        out = np.empty(len(rows), dtype=self.dtype)
        parts = rows // per_shard
        for part in np.unique(parts):
            where = parts == part
            out[where] = self._shard(recorded * self._parts + int(part))[rows[where] - part * per_shard]
        return out, recorded

    def augmentation(self, epoch: int, indices) -> tuple[np.ndarray, np.ndarray]:
        """(boxes int64 [B, 4], flips bool [B]) recorded for samples ``indices`` in ``epoch``
        (``e mod E``): what a loader replays (``make_loader(..., augmentation=cache.augmentation)``)."""
        out, _ = self._records(epoch, indices)
        return out["box"].astype(np.int64), out["flip"].astype(bool)

    def read(self, epoch: int, indices: torch.Tensor, device: torch.device | str = "cpu") -> CachedBatch:
        """The crop boxes, flips and sparse teacher of samples ``indices`` [B] in ``epoch``.

        A cache records epochs 0 … E − 1; epoch e ≥ E reads the recorded epoch ``e mod E``
        (the same crops and teacher outputs again: say so in a training log)."""
        out, recorded = self._records(epoch, indices)
        values = torch.from_numpy(np.ascontiguousarray(out["values"]))
        if self.manifest["values_dtype"] == "bfloat16":
            values = values.view(torch.int16).view(torch.bfloat16)
        teacher = SparseTeacher(torch.from_numpy(out["indices"].astype(np.int64)), values.float(),
                                torch.from_numpy(np.ascontiguousarray(out["log_sum_exp"])), self.temperatures,
                                self.num_classes)
        boxes = torch.from_numpy(out["box"].astype(np.int64))
        flips = torch.from_numpy(out["flip"].astype(bool))
        if torch.device(device).type != "cpu":
            boxes, flips, teacher = boxes.to(device), flips.to(device), teacher.to(device)
        return CachedBatch(boxes, flips, teacher, recorded)


@dataclass
class CacheReport:
    """What :func:`verify_cache` found: ``problems`` (each naming a shard or the manifest)."""

    directory: Path
    shards: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        if self.ok:
            return [f"{self.directory}: ok ({self.shards} shards, checksums match)", *self.notes]
        return [f"{self.directory}: {len(self.problems)} problem(s)", *(f"  {p}" for p in self.problems), *self.notes]


def verify_cache(directory: str | os.PathLike) -> CacheReport:
    """Check that the cache is finished and every shard is present, well-formed and matches its SHA-256."""
    directory = Path(directory)
    report = CacheReport(directory)
    try:
        manifest = read_manifest(directory)
    except CacheError as error:
        report.problems.append(str(error))
        return report
    dtype = manifest_record_dtype(manifest)
    plan = shard_plan(manifest)
    report.shards = len(plan)
    recorded = {shard["name"]: shard for shard in manifest.get("shards", [])}
    if not manifest.get("complete"):
        report.problems.append("unfinished: the build was interrupted or is still running (rerun the same `kdfast "
                               "cache build` to finish it)")
    for shard in plan:
        path = directory / shard["name"]
        try:
            open_shard(path, dtype, shard["count"])
        except CacheError as error:
            report.problems.append(str(error))
            continue
        if manifest.get("complete"):
            entry = recorded.get(shard["name"])
            if entry is None:
                report.problems.append(f"{shard['name']}: not in the manifest's shard list")
            elif sha256_file(path) != entry["sha256"]:
                report.problems.append(f"{shard['name']}: damaged (SHA-256 differs from the manifest's)")
    leftovers = sorted(path.name for path in directory.glob(".*.tmp-*"))
    if leftovers:
        report.notes.append(f"  {len(leftovers)} temporary file(s) of an interrupted build, e.g. {leftovers[0]} "
                            f"(the next build removes them)")
    return report


def cache_info(directory: str | os.PathLike) -> list[str]:
    """The manifest in words, with the bytes each sample takes per epoch."""
    manifest = read_manifest(directory)
    dtype = manifest_record_dtype(manifest)
    fields = record_bytes_by_field(dtype)
    teacher, dataset = manifest["teacher"], manifest["dataset"]
    samples, epochs = manifest["num_samples"], manifest["epochs"]
    total = samples * epochs * dtype.itemsize
    lines = [
        f"teacher cache {directory} (format {manifest['format_version']}, "
        f"{'complete' if manifest.get('complete') else 'UNFINISHED'})",
        *(f"teacher: {name} from {file} (SHA-256 {digest})" for name, file, digest in zip(
            *([value] if isinstance(value, str) else value
              for value in (teacher["architecture"], teacher["checkpoint"], teacher["checkpoint_sha256"])))),
        *([f"teachers combined: {describe_manifest_teacher(manifest)}"] if len(manifest_teachers(manifest)) > 1
          else []),
        f"dataset: {dataset.get('root')} ({dataset['kind']}, {dataset['split']} split, {samples} samples, "
        f"SHA-256 {dataset['sha256']}), {manifest['num_classes']} classes, {manifest['in_channels']}×"
        f"{manifest['image_size']}×{manifest['image_size']} images",
        f"augmentation: {manifest['transform']['kind']}, seed {manifest['seed']}, {epochs} epochs recorded "
        f"(epoch e reads e mod {epochs})",
        f"teacher output: top-{manifest['top_k']} {manifest['index_dtype']} indices, {manifest['values_dtype']} "
        f"logits, log-sum-exp at τ = {', '.join(f'{t:g}' for t in manifest['temperatures'])} (float32); amp "
        f"{manifest['amp']}, teacher batch {manifest['batch_size']}",
        f"bytes per sample per epoch: {dtype.itemsize} ("
        + ", ".join(f"{name} {size}" for name, size in fields.items()) + ")",
        f"total: {total:,} bytes in {len(shard_plan(manifest))} shard(s) of up to {manifest['shard_samples']} samples",
    ]
    compute = manifest.get("compute")
    if compute:
        lines.append("built on: " + ", ".join(f"{key} {value}" for key, value in compute.items()))
    return lines
