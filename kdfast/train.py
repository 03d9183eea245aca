"""The trainer behind ``kdfast train`` and ``kdfast eval``: thin on purpose.

One process per device (``torchrun`` starts several; DDP with NCCL on GPUs, gloo on CPUs).
Each step: the frozen teacher's forward (no grad, autocast), the student's forward, the
method's loss terms (kdfast's fused losses), backward, optimizer and schedule. With
``--teacher-cache`` (:mod:`kdfast.cache`) no teacher is built: the loader replays the
cache's recorded crops and the step reads the teacher's logits of its samples from it. The run
folder holds ``config.yaml``, ``metrics.jsonl``, ``checkpoint-<step>.pt`` (atomic, with a
checksum; see :mod:`kdfast.checkpoint`), ``model.pt`` and ``summary.json``; only rank 0
writes them, under the folder's lock (:class:`kdfast.checkpoint.RunLock`: one run per folder).

Before a run writes anything, rank 0 decides and tells the other ranks: the lock, on
``--resume`` the comparison of the requested options with the folder's ``config.yaml``
(:data:`kdfast.config.RESUME_MAY_CHANGE` lists the options that may change), and the
newest checkpoint that can continue the run (it verifies, is a training checkpoint of this
model, options, dataset size and world size); when there are checkpoints but none usable,
the run stops (``--allow-restart`` sets them aside and starts over). Every collective runs
under ``--dist-timeout``, and a timed-out or broken one is a :class:`DistributedError`
naming it.

Methods (``--method``), each with a cross-entropy term of weight ``--ce-weight``:

* ``ce``: cross-entropy alone (teachers, baselines);
* ``kd``: + Hinton KD, :func:`kdfast.kd_loss`;
* ``dist``: + DIST, :func:`kdfast.dist_loss` (the intra-class term is over each process's
  batch, as in DIST's own multi-GPU code);
* ``cmkd``: + CMKD, :func:`kdfast.cmkd_loss`;
* ``drkd``: + DR-KD self-distillation, :func:`kdfast.drkd_loss` against the student's own
  logits for each sample from the previous epoch (a per-sample bank indexed by the
  loader's sample indices; the first epoch is plain CE);
* ``pesf``: + KD from a PESF-KD teacher adapter (:class:`kdfast.nn.TeacherAdapter`) that
  trains at the same time on the teacher's pooled feature, in its own parameter group.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import kdfast
from kdfast.checkpoint import (CheckpointError, RunLock, atomic_write_bytes, latest_checkpoint, list_checkpoints,
                               read_checkpoint_file, remove_orphaned_temporaries, save_state_dict, write_checkpoint)
from kdfast.config import (RESUME_MAY_CHANGE, TEACHER_METHODS, TrainConfig, describe_changes, read_config_file,
                           resume_changes, save_config, validate)
from kdfast.execution import execution_settings
from kdfast.models import create_model, load_weights, upgrade_old_keys
from kdfast.nn import TeacherAdapter
from kdfast.teachers import TeacherEnsemble, describe_teachers

LOGGER = logging.getLogger("kdfast.train")

__all__ = ["DistributedError", "Runtime", "evaluate", "run_eval", "train"]


# --------------------------------------------------------------------------- processes

@dataclass
class Runtime:
    """Where this process runs: its rank among ``world_size`` and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool = False
    timeout: float | None = None  # --dist-timeout, seconds (for messages)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_runtime(device: str = "auto", timeout: float | None = None) -> Runtime:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), pick the device, join the group.

    ``timeout`` (seconds, ``--dist-timeout``) is the process group's: how long a collective
    waits for the other processes before it fails (gloo raises in the waiting process; NCCL's
    watchdog aborts it, logging the collective that timed out)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but PyTorch sees no CUDA GPU")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        target = torch.device("cuda", torch.cuda.current_device())
    else:
        target = torch.device("cpu")
    runtime = Runtime(rank, world_size, local_rank, target, timeout=timeout)
    if world_size > 1 and not dist.is_initialized():
        options = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        with _collective(runtime, "joining the process group (rendezvous of all processes)"):
            dist.init_process_group("nccl" if use_cuda else "gloo", device_id=target if use_cuda else None,
                                    **options)
        runtime.owns_process_group = True
    return runtime


class DistributedError(RuntimeError):
    """A collective of a multi-process run timed out or lost a peer; the message names the collective."""


_COLLECTIVE_FAILURE = re.compile(r"timed? ?out|timeout|connection (closed|reset|refused)|closed by peer|pair closure|"
                                 r"gloo|nccl|process ?group|broken pipe|socket", re.IGNORECASE)


@contextlib.contextmanager
def _collective(runtime: Runtime, what: str):
    """Turn a failure of the collective(s) inside into a :class:`DistributedError` naming ``what``."""
    try:
        yield
    except RuntimeError as error:
        text = str(error)
        if (not runtime.distributed or isinstance(error, DistributedError)
                or not (isinstance(error, getattr(dist, "DistError", ())) or _COLLECTIVE_FAILURE.search(text))):
            raise
        detail = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
        where = f"rank {runtime.rank} of {runtime.world_size}"
        if re.search(r"timed? ?out|timeout", text, re.IGNORECASE):
            limit = f" within --dist-timeout {runtime.timeout:g} s" if runtime.timeout else ""
            message = (f"{where}: the collective '{what}' did not complete{limit}: another process stopped, hung, "
                       f"died or is far behind (check the other ranks' logs; raise --dist-timeout if a rank is "
                       f"legitimately slow)")
        else:
            message = (f"{where}: the collective '{what}' failed: another process crashed, was killed or left "
                       f"(check the other ranks' logs)")
        raise DistributedError(f"{message}. PyTorch: {detail}") from error


def close_runtime(runtime: Runtime, finished: bool) -> None:
    """Leave the process group that :func:`init_runtime` joined (nothing for a single process).

    After a finished run every rank first meets the others at a barrier: rank 0 is still writing
    the model while the other ranks return, and a gloo group torn down by one rank while a peer
    is still busy has aborted the process ("terminate called without an active exception",
    seen once in CI). After a failure there is no barrier (a peer may be gone): the group is
    destroyed at once."""
    if not runtime.owns_process_group:
        return
    try:
        if finished:
            with _collective(runtime, "end-of-run barrier (every rank done)"):
                dist.barrier()
    finally:
        dist.destroy_process_group()
        runtime.owns_process_group = False


def _all_reduce_sum(runtime: Runtime, values: torch.Tensor, what: str = "all-reduce") -> torch.Tensor:
    if runtime.distributed:
        with _collective(runtime, what):
            dist.all_reduce(values)
    return values


def _from_rank0(runtime: Runtime, action, what: str):
    """Run ``action()`` on rank 0 only and give every rank its result, or the same error.

    The run folder's decisions (its lock, the resume check, the checkpoint to resume from)
    are rank 0's; the other ranks then fail with rank 0's message instead of waiting in the
    next collective."""
    result = failure = None
    if runtime.main:
        try:
            result = action()
        except Exception as error:  # noqa: BLE001 - shared with the other ranks, then re-raised
            failure = error
    if runtime.distributed:
        box = [None if failure is None else str(failure), result]
        with _collective(runtime, f"broadcast of rank 0's {what}"):
            dist.broadcast_object_list(box, src=0)
        if not runtime.main and box[0] is not None:
            raise ValueError(f"rank 0: {box[0]}")
        result = box[1]
    if failure is not None:
        raise failure
    return result


@contextlib.contextmanager
def _session(config: TrainConfig):
    """The runtime of one run (the process group joined when launched by torchrun), inside the
    run's threads and determinism settings (restored afterwards: the demo runs many in one
    process); the group is left at the end (:func:`close_runtime`)."""
    runtime = init_runtime(config.device, config.dist_timeout)
    finished = False
    try:
        with execution_settings(config.threads, config.deterministic):
            yield runtime
        finished = True
    finally:
        close_runtime(runtime, finished)


# --------------------------------------------------------------------------- data and models

_IMAGE_DTYPES = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_loaders(config: TrainConfig, runtime: Runtime, teacher_cache=None):
    """(train loader, val loader) of this process's shard (without the images listed in ``--exclude``).

    With a ``teacher_cache`` (:class:`kdfast.cache.TeacherCache`) the training loader replays
    the cache's recorded crops instead of drawing its own (``loader="auto"`` is then the
    torch loader, for both splits)."""
    from kdfast.data import make_loader

    options = _loader_options(config, runtime, teacher_cache)
    replay = {} if teacher_cache is None else {"augmentation": teacher_cache.augmentation}
    return (make_loader(config.data, "train", file_list=config.train_file_list, per_class=config.train_per_class,
                        **options, **replay),
            make_loader(config.data, "val", file_list=config.val_file_list, **options))


def _loader_options(config: TrainConfig, runtime: Runtime, teacher_cache=None) -> dict:
    options = dict(batch_size=config.batch_size, device=runtime.device, image_size=config.image_size,
                   dtype=_IMAGE_DTYPES[config.amp], channels_last=config.channels_last, rank=runtime.rank,
                   world_size=runtime.world_size, num_workers=config.workers, seed=config.seed)
    if config.data != "digits":
        options["loader"] = "torch" if teacher_cache is not None and config.loader == "auto" else config.loader
    if config.exclude is not None:
        options["exclude"] = config.exclude
    return options


def open_teacher_cache(config: TrainConfig):
    """The run's :class:`kdfast.cache.TeacherCache` (None without ``--teacher-cache``), checked
    before anything trains: built for this dataset (its files after ``--exclude``, classes),
    image size and transform (and ``--teacher`` when given); every shard present and whole;
    the loss temperature stored when the cache keeps fewer logits than classes.
    CacheMismatchError / CacheError / ValueError naming what is wrong."""
    if config.teacher_cache is None:
        return None
    from kdfast.cache import CacheError, TeacherCache, dataset_fingerprint
    from kdfast.cache.build import training_transform
    from kdfast.data.digits import DIGITS_NAME, NATIVE_SIZE
    from kdfast.data.folder import class_names

    digits = config.data == DIGITS_NAME
    if not Path(config.teacher_cache).is_dir():
        raise CacheError(f"teacher cache {config.teacher_cache} does not exist (build one with `kdfast cache build`)")
    fingerprint = dataset_fingerprint(config.data, config.exclude)  # indexes the split: DatasetError first
    num_classes = 10 if digits else len(class_names(Path(config.data) / "train"))
    cache = TeacherCache.open(config.teacher_cache, dataset=fingerprint,
                              num_classes=num_classes, image_size=config.image_size or (NATIVE_SIZE if digits else 224),
                              transform=training_transform(config.data), teacher=config.teacher)
    cache.check_shards()
    tau = config.resolved_temperature()
    if cache.top_k < cache.num_classes and not any(math.isclose(tau, t, rel_tol=1e-6) for t in cache.temperatures):
        raise ValueError(f"temperature {tau:g} is not stored in teacher cache {config.teacher_cache} (stored: "
                         f"{', '.join(f'{t:g}' for t in cache.temperatures)}): with top-{cache.top_k} of "
                         f"{cache.num_classes} classes the teacher's remaining mass is only known at those; train with "
                         f"--temperature set to one of them, or build the cache with --temperatures including "
                         f"{tau:g}")
    combined_at = cache.manifest["teacher"].get("temperature")  # a combination of probabilities
    if combined_at is not None and not math.isclose(tau, combined_at, rel_tol=1e-6):
        raise ValueError(f"teacher cache {config.teacher_cache} holds its teachers' probabilities combined at "
                         f"τ = {combined_at:g}, which a loss reads only at that temperature: train with --temperature "
                         f"{combined_at:g} (got {tau:g}), or build a cache at {tau:g}")
    return cache


def build_model(name: str, loader, config: TrainConfig, runtime: Runtime, weights: str | None = None,
                what: str = "checkpoint") -> nn.Module:
    channels, height, _ = loader.image_shape
    model = create_model(name, loader.num_classes, in_channels=channels, image_size=height)
    if weights:
        load_weights(model, weights, what=what)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    return model.to(device=runtime.device, memory_format=memory_format)


def build_teachers(config: TrainConfig, loader, runtime: Runtime, load_weights: bool = True) -> TeacherEnsemble:
    """The run's frozen teachers (``--teacher``/``--teacher-checkpoint``, one or more) as one
    :class:`~kdfast.teachers.TeacherEnsemble` combining them by ``--teacher-combine`` and
    ``--teacher-weights`` at the method's temperature."""
    names = config.teacher
    checkpoints = (config.teacher_checkpoint if load_weights else None) or [None] * len(names)
    several = len(names) > 1
    teachers = [build_model(name, loader, config, runtime, checkpoint,
                            f"teacher_checkpoint {number} ({name})" if several else "teacher_checkpoint")
                for number, (name, checkpoint) in enumerate(zip(names, checkpoints), 1)]
    return TeacherEnsemble(teachers, config.teacher_weights, config.teacher_combine or "logits",
                           config.resolved_temperature())


class Schedule:
    """The learning-rate factor at a step: linear warm-up, then cosine to 0, step decay or constant.

    A plain object (not a closure), so that ``LambdaLR.state_dict`` saves it with the checkpoint.
    """

    def __init__(self, config: TrainConfig, steps_per_epoch: int):
        self.kind = config.schedule
        self.total = config.epochs * steps_per_epoch
        self.warmup = round(config.warmup_epochs * steps_per_epoch)
        self.boundaries = [m * steps_per_epoch for m in config.milestones]
        self.decay = config.lr_decay

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "cosine":
            progress = (step - self.warmup) / max(1, self.total - self.warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if self.kind == "step":
            return self.decay ** sum(step >= boundary for boundary in self.boundaries)
        return 1.0


def make_optimizer(config: TrainConfig, student: nn.Module, adapter: nn.Module | None) -> torch.optim.Optimizer:
    """Weight decay on weights only (not on BatchNorm or biases); the adapter in its own group."""
    def groups(module, lr):
        decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
        plain = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
        return [{"params": decay, "weight_decay": config.weight_decay, "lr": lr},
                {"params": plain, "weight_decay": 0.0, "lr": lr}]

    param_groups = groups(student, config.lr)
    if adapter is not None:
        param_groups += groups(adapter, config.adapter_lr or config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(param_groups, lr=config.lr)


class StudentStep(nn.Module):
    """What trains, as one module for DDP: the student and, for PESF-KD, the teacher adapter."""

    def __init__(self, student: nn.Module, adapter: TeacherAdapter | None):
        super().__init__()
        self.student = student
        self.adapter = adapter

    def forward(self, images, teacher_logits=None, teacher_features=None):
        student_logits = self.student(images)
        adapted = None if self.adapter is None else self.adapter(teacher_logits, teacher_features)
        return student_logits, adapted


# --------------------------------------------------------------------------- the method's loss

NEVER = -(2**62)  # the bank's epoch of a sample not seen yet (never "the previous epoch")


class LogitBank:
    """DR-KD's per-sample memory: each training sample's student logits and the epoch they are from.

    Kept on the training device, so that a step reads it (a gather) and writes it (an
    ``index_copy_``) with device indices on the current stream and never waits for the GPU.
    Under DDP every process holds the whole bank: each step's logits are gathered from all
    ranks, because the next epoch's shuffle sends a sample to any rank. It takes
    ``num_samples × num_classes`` entries, in fp32 up to 64 M entries (256 MB) and bf16
    beyond, plus 8 bytes per sample for the epochs: ImageNet's 1.28 M × 1000 logits are
    about 2.6 GB of bf16 on every GPU. :meth:`state_dict` holds CPU copies, so that a
    checkpoint written on a GPU loads anywhere; :meth:`load_state_dict` copies into the
    bank's device tensors.
    """

    def __init__(self, num_samples: int, num_classes: int, device: torch.device | str = "cpu"):
        dtype = torch.float32 if num_samples * num_classes <= 64 * 2**20 else torch.bfloat16
        self.logits = torch.zeros(num_samples, num_classes, dtype=dtype, device=device)
        # epoch of each row's logits
        self.epoch = torch.full((num_samples,), NEVER, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.logits.device

    def read(self, indices: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 logits from ``epoch - 1`` [B, C], mask [B] of the rows that have them), on the bank's device.

        Rows without logits from ``epoch - 1`` hold whatever the bank has (zeros or older logits).
        """
        indices = indices.to(self.device)  # a no-op: the loaders deliver the indices on the training device
        valid = self.epoch.index_select(0, indices) == epoch - 1
        return self.logits.index_select(0, indices).float(), valid

    def write(self, indices: torch.Tensor, logits: torch.Tensor, epoch: int, runtime: Runtime) -> None:
        logits = logits.detach().float()
        if runtime.distributed:
            gathered_indices = [torch.empty_like(indices) for _ in range(runtime.world_size)]
            gathered_logits = [torch.empty_like(logits) for _ in range(runtime.world_size)]
            with _collective(runtime, "all-gather of the DR-KD bank's logits"):
                dist.all_gather(gathered_indices, indices)
                dist.all_gather(gathered_logits, logits)
            indices, logits = torch.cat(gathered_indices), torch.cat(gathered_logits)
        # A step's indices are distinct (the loaders drop the last incomplete global batch
        # instead of padding it with repeats), so the copy's order does not matter.
        indices = indices.to(self.device)
        self.logits.index_copy_(0, indices, logits.to(self.device, self.logits.dtype))
        self.epoch.index_fill_(0, indices, epoch)

    def state_dict(self) -> dict:
        """CPU tensors (copies of a GPU bank; on the CPU the bank's own tensors, like a module's state dict)."""
        return {"logits": self.logits.cpu(), "epoch": self.epoch.cpu()}

    def load_state_dict(self, state: dict) -> None:
        for name in ("logits", "epoch"):
            mine, theirs = getattr(self, name), state[name]
            if tuple(theirs.shape) != tuple(mine.shape):
                raise ValueError(f"the checkpoint's DR-KD bank {name} has shape {tuple(theirs.shape)}, this run's "
                                 f"{tuple(mine.shape)} (a different dataset or number of classes?)")
            mine.copy_(theirs)


def drkd_bank_loss(student: torch.Tensor, previous: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor,
                   temperature: float, backend: str | None = None, standardize: bool = False) -> torch.Tensor:
    """DR-KD against the bank, over the rows with a previous-epoch logit, with no data-dependent shape.

    Equals ``(n_valid / B) · drkd_loss(student[valid], previous[valid], labels[valid])`` (0
    when no row is valid), in value and in the student's gradient, without selecting rows
    (``nonzero``, whose size the host would have to wait for): a row without a previous
    logit gets the student's own detached logits as its teacher and their argmax as its
    target, so rectification leaves it as is (a tie swaps equal values) and its
    ``KL(p ‖ p)`` is 0; the loss's mean over all B rows is then the sum over the valid rows
    divided by B. Those rows also enter the loss detached, so that their gradient is
    exactly zero whatever the backend's rounding (autograd through the reference's
    log-softmax leaves ``p·Σq − q``, about 1e-9, where a fused kernel's ``p − q`` is 0).
    """
    own = student.detach()
    rows = valid[:, None]
    teacher = torch.where(rows, previous.float(), own.float())
    target = torch.where(valid, labels, teacher.argmax(dim=1))
    return kdfast.drkd_loss(torch.where(rows, student, own), teacher, target, temperature, standardize=standardize,
                            backend=backend)


class MethodLoss:
    """The loss terms of a method for one batch: a dict of named scalars whose sum is optimized."""

    def __init__(self, config: TrainConfig, num_classes: int, num_samples: int, device: torch.device | str = "cpu"):
        self.config = config
        self.method = config.method
        self.temperature = config.resolved_temperature()
        self.backend = None if config.backend == "auto" else config.backend
        self.bank = LogitBank(num_samples, num_classes, device) if config.method == "drkd" else None

    def __call__(self, student_logits, teacher_logits, adapted, adapter, labels, indices, epoch, runtime):
        c, tau, backend = self.config, self.temperature, self.backend
        s = student_logits
        terms = {"ce": c.ce_weight * F.cross_entropy(s.float(), labels)}
        standardize = c.logit_standardization
        if self.method in ("kd", "reskd"):  # reskd: s is the stage's logits (frozen chain + new res-student)
            terms["kd"] = c.kd_weight * kdfast.kd_loss(s, teacher_logits, tau, standardize=standardize,
                                                       backend=backend)
        elif self.method == "dist":
            terms["dist"] = c.kd_weight * kdfast.dist_loss(s, teacher_logits, tau, c.dist_beta, c.dist_gamma,
                                                           standardize=standardize, backend=backend)
        elif self.method == "cmkd":
            terms["cmkd"] = c.kd_weight * kdfast.cmkd_loss(
                s, teacher_logits, None, tau, c.cmkd_kl_weight, c.cmkd_corr_weight, 0.0, c.cmkd_weighting,
                c.spearman_strength, standardize=standardize, backend=backend)
        elif self.method == "dkd":
            # The authors' ramp: the term times min(e / warm-up, 1) in (1-based) epoch e.
            ramp = 1.0 if c.dkd_warmup_epochs == 0 else min(1.0, (epoch + 1) / c.dkd_warmup_epochs)
            terms["dkd"] = ramp * c.kd_weight * kdfast.dkd_loss(s, teacher_logits, labels, c.dkd_alpha, c.dkd_beta,
                                                                tau, standardize=standardize, backend=backend)
        elif self.method == "drkd":
            # Rows without a previous-epoch logit get CE only (all of them in the first epoch).
            if epoch == 0:  # nothing in the bank is from epoch -1
                terms["drkd"] = s.new_zeros((), dtype=torch.float32)
            else:
                previous, valid = self.bank.read(indices, epoch)
                terms["drkd"] = c.kd_weight * drkd_bank_loss(s, previous, valid, labels, tau, backend, standardize)
            self.bank.write(indices, s, epoch, runtime)
        elif self.method == "pesf":
            targets = adapter.student_targets(adapted, labels)
            terms["kd"] = c.kd_weight * kdfast.kd_loss(s, targets, tau, backend=backend)
            terms["adapter"] = adapter.adapter_loss(adapted, s, labels)
        return terms


def _reskd_stage(config: TrainConfig, runtime: Runtime, res_student: nn.Module):
    """ResKD: the frozen chain so far plus the new res-student (or the base, without a chain)."""
    from kdfast.reskd import ChainStage, load_chain

    if not config.reskd_chain:
        return ChainStage(None, res_student)
    chain, spec = load_chain(config.reskd_chain, runtime.device)
    if config.channels_last:
        chain = chain.to(memory_format=torch.channels_last)
    if not config.init_checkpoint:  # start as the chain: the new correction is zero at first
        nn.init.zeros_(res_student.fc.weight)
        nn.init.zeros_(res_student.fc.bias)
    return ChainStage(chain, res_student, spec["architectures"])


def _save_reskd_chain(config: TrainConfig, stage, loader, folder: Path) -> None:
    """``chain.pt``: the chain so far plus this run's res-student (the next stage's --reskd-chain)."""
    from kdfast.reskd import save_chain

    modules = [] if stage.chain is None else [stage.chain.base, *stage.chain.res_students]
    channels, height, _ = loader.image_shape
    save_chain(folder / "chain.pt", [*stage.chain_architectures, config.student], [*modules, stage.student],
               num_classes=loader.num_classes, in_channels=channels, image_size=height)


class KDStep:
    """One training step of a method, and everything it updates.

    Builds the student (seeded: the same initialization on every rank and for every
    method), the frozen teacher, the PESF-KD adapter, the optimizer, the schedule, the AMP
    scaler and the method's loss. Calling it runs teacher forward (no grad), student
    forward, loss, backward, optimizer and schedule on one batch and returns the loss
    terms. ``mark(part)``, when given, is called after each part (the training benchmark
    times them).

    On CUDA a step of every method queues its work without waiting for the GPU (the GPU
    test in tests/test_train_sync.py runs one under ``torch.cuda.set_sync_debug_mode("error")``):
    the returned terms stay device tensors, DR-KD's bank lives on the device, and no row
    selection depends on the data. Exceptions are PyTorch's own: fp16's ``GradScaler`` reads its inf/NaN flag on the
    host in ``step`` (bf16 and fp32 need no scaler), and a step's first call may wait while
    kernels are compiled, autotuned or first allocated. (The test runs without
    ``--deterministic``, under which PyTorch swaps in its deterministic kernels, e.g. a
    sorting index-put for the bank's ``index_copy_``.)
    """

    def __init__(self, config: TrainConfig, runtime: Runtime, train_loader, load_weights: bool = True,
                 teacher_cache=None):
        self.config, self.runtime = config, runtime
        self.teacher_cache = teacher_cache
        torch.manual_seed(config.seed)
        student = build_model(config.student, train_loader, config, runtime,
                              config.init_checkpoint if load_weights else None, "init_checkpoint")
        if config.method == "reskd":
            student = _reskd_stage(config, runtime, student)
        self.teacher = adapter = None
        if config.method in TEACHER_METHODS and teacher_cache is None:
            self.teacher = build_teachers(config, train_loader, runtime, load_weights)
        if config.method == "pesf":
            adapter = TeacherAdapter(self.teacher.feature_dim, train_loader.num_classes, config.adapter_hidden,
                                     config.resolved_temperature(), config.rectify,
                                     backend=None if config.backend == "auto" else config.backend).to(runtime.device)
        self.model = StudentStep(student, adapter)
        if config.sync_bn and runtime.distributed and runtime.device.type == "cuda":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.optimizer = make_optimizer(config, self.model.student, self.model.adapter)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, Schedule(config, len(train_loader)))
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=config.amp == "fp16")
        self.loss_fn = MethodLoss(config, train_loader.num_classes, train_loader.num_samples, runtime.device)
        self.step_model = self.model

    def wrap(self) -> None:
        """DDP (when distributed) and torch.compile (when asked); after any checkpoint is loaded."""
        model = self.model
        if self.runtime.distributed:
            device_ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
            with _collective(self.runtime, "DDP's start-up broadcast of the parameters"):
                model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.step_model = torch.compile(model) if self.config.compile else model
        if self.teacher is not None and self.config.compile:
            self.teacher.compile_features()

    def __call__(self, images, labels, indices, epoch: int, mark=None) -> dict[str, torch.Tensor]:
        mark = mark or (lambda part: None)
        teacher_logits = teacher_features = None
        loss_teacher = None
        if self.teacher_cache is not None:
            # The recorded teacher of these samples in this epoch (e mod E): a SparseTeacher, whose
            # rows the losses rebuild where they read them (no dense B×C teacher on the fused backends).
            loss_teacher = self.teacher_cache.read(epoch, indices, self.runtime.device).teacher
            mark("teacher from cache")
        with _autocast(self.config, self.runtime.device):
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits, teacher_features = self.teacher(images)
                mark("teacher forward")
            with _collective(self.runtime, "DDP's broadcast of the BatchNorm buffers (forward)"):
                student_logits, adapted = self.step_model(images, teacher_logits, teacher_features)
        mark("student forward")
        terms = self.loss_fn(student_logits, teacher_logits if loss_teacher is None else loss_teacher, adapted,
                             self.model.adapter, labels, indices, epoch, self.runtime)
        loss = sum(terms.values())
        mark("loss")
        self.optimizer.zero_grad(set_to_none=True)
        with _collective(self.runtime, "DDP's gradient all-reduce (backward)"):
            self.scaler.scale(loss).backward()
        mark("backward")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        mark("optimizer")
        return terms


# --------------------------------------------------------------------------- progress and metrics

class Progress:
    """A one-line progress bar (``bar``) or a line per log interval (``lines``) on stderr."""

    def __init__(self, mode: str, total_steps: int, enabled: bool):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.total = total_steps

    def update(self, step: int, epoch: int, epochs: int, record: dict, seconds_left: float) -> None:
        if self.mode == "none":
            return
        terms = " ".join(f"{name} {value:.4f}" for name, value in record["terms"].items())
        eta = time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds_left)))
        text = (f"epoch {epoch + 1}/{epochs} step {step}/{self.total} {record['images_per_s']:.0f} img/s "
                f"loss {record['loss']:.4f} ({terms}) lr {record['lr']:.4g} ETA {eta}")
        if self.mode == "bar":
            width = 20
            done = int(width * step / max(1, self.total))
            sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {text}\033[K")
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        if self.mode == "bar":
            sys.stderr.write("\r\033[K")
        if self.mode != "none":
            sys.stderr.write(text + "\n")
            sys.stderr.flush()


class MetricsWriter:
    """Appends JSON records to ``metrics.jsonl`` (and TensorBoard scalars when available); rank 0 only."""

    def __init__(self, folder: Path | None, tensorboard: bool):
        self.path = None if folder is None else folder / "metrics.jsonl"
        self.board = None
        if folder is not None and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:
                LOGGER.warning("--tensorboard was asked for but tensorboard is not installed (pip install "
                               "tensorboard); metrics go to metrics.jsonl only (`kdfast plot RUN` draws them)")

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.board is not None:
            prefix = record["kind"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.board.add_scalar(f"{prefix}/{key}", value, record["step"])
            for key, value in record.get("terms", {}).items():
                self.board.add_scalar(f"{prefix}/loss_{key}", value, record["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


# --------------------------------------------------------------------------- evaluation

def _autocast(config: TrainConfig, device: torch.device):
    if config.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_IMAGE_DTYPES[config.amp])


@torch.no_grad()
def evaluate(model: nn.Module, loader, runtime: Runtime, config: TrainConfig) -> dict:
    """Top-1, top-5 (in %) and mean cross-entropy over the whole split (all ranks together)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # correct@1, correct@5, loss, count
    k = min(5, loader.num_classes)
    for images, labels, _ in loader:
        with _autocast(config, runtime.device):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(k, dim=1).indices
        hits = top == labels[:, None]
        totals += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), F.cross_entropy(logits, labels, reduction="sum"),
                               torch.full((), len(labels), dtype=totals.dtype, device=logits.device)]
                              ).to(totals)  # a device fill, not a host-to-device copy
    model.train(was_training)
    correct1, correct5, loss, count = _all_reduce_sum(runtime, totals, "all-reduce of the evaluation's "
                                                      "counts").tolist()
    return {"top1": 100 * correct1 / count, "top5": 100 * correct5 / count, "loss": loss / count,
            "images": int(count)}


# --------------------------------------------------------------------------- training

def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                      "has_gauss": int(numpy_state[3]), "gauss": float(numpy_state[4])},
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _unwrap(module: nn.Module) -> nn.Module:
    module = getattr(module, "_orig_mod", module)
    return getattr(module, "module", module)


def train(config: TrainConfig, print_fn=print) -> dict:
    """Run ``kdfast train`` with a resolved configuration; returns the summary (on every rank)."""
    validate(config)
    _check_files(config)
    with _session(config) as runtime:
        return _train(config, runtime, print_fn)


def _check_files(config: TrainConfig) -> None:
    if config.exclude is not None and not Path(config.exclude).is_file():
        raise ValueError(f"exclude file {config.exclude} does not exist (it lists images to leave out, one path per "
                         f"line: what `kdfast data verify DIR --output FILE` writes)")
    for name in ("train_file_list", "val_file_list"):
        if getattr(config, name) is not None and not Path(getattr(config, name)).is_file():
            raise ValueError(f"{name} {getattr(config, name)} does not exist (one 'relative/path.jpg <class index>' "
                             f"per line)")


# The files of a run (besides its checkpoints) that describe its progress.
_RUN_RECORDS = ("metrics.jsonl", "summary.json")


def _identity(config: TrainConfig, loader) -> dict:
    """What a checkpoint's model is: architecture and the images and classes it was built for."""
    channels, height, _ = loader.image_shape
    return {"student": config.student, "num_classes": loader.num_classes, "in_channels": channels,
            "image_size": height, "method": config.method}


def _checkpoint_checker(config: TrainConfig, runtime: Runtime, kd_step: "KDStep", train_loader):
    """``check(path, state)`` for :func:`latest_checkpoint`: CheckpointError unless the checkpoint
    can continue this run (a training checkpoint, of this model, options, dataset and world size)."""
    identity = _identity(config, train_loader)
    expected = kd_step.model.state_dict()
    groups = [len(group["params"]) for group in kd_step.optimizer.param_groups]

    def check(path: Path, state) -> None:
        needed = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "batch", "step")
        if not isinstance(state, dict) or not all(key in state for key in needed):
            if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
                kind = f"a plain state dict of {len(state)} tensors (weights such as a model.pt, not a run's state)"
            elif isinstance(state, dict):
                kind = f"a dict without {', '.join(key for key in needed if key not in state)}"
            else:
                kind = f"a {type(state).__name__}"
            raise CheckpointError(f"checkpoint {path} is not a kdfast training checkpoint: {kind}")
        theirs = state.get("identity")
        if isinstance(theirs, dict):
            differ = [key for key in ("student", "num_classes", "in_channels", "image_size")
                      if key in theirs and theirs[key] != identity[key]]
            if differ:
                raise CheckpointError(
                    f"checkpoint {path} is of another model: " + ", ".join(
                        f"{key} {theirs[key]} (this run: {identity[key]})" for key in differ))
        saved = state.get("config")
        if isinstance(saved, dict):
            changes = resume_changes(saved, config)
            if changes:
                raise CheckpointError(f"checkpoint {path} is of a run with other options: "
                                      f"{describe_changes(changes)} (checkpoint → this run)")
        model_state = state["model"]
        if not isinstance(model_state, dict):
            raise CheckpointError(f"checkpoint {path} is not a kdfast training checkpoint: its model is a "
                                  f"{type(model_state).__name__}")
        upgrade_old_keys(kd_step.model, model_state)  # a wide ResNet's keys of before kdfast took the field's
        missing = sorted(set(expected) - set(model_state))
        unexpected = sorted(set(model_state) - set(expected))
        mis_shaped = [key for key in expected if key in model_state and getattr(model_state[key], "shape", None)
                      != expected[key].shape]
        if missing or unexpected or mis_shaped:
            raise CheckpointError(f"checkpoint {path} does not fit this run's model ({config.student}, "
                                  f"{identity['num_classes']} classes): {len(missing)} missing keys {missing[:3]}, "
                                  f"{len(unexpected)} unexpected {unexpected[:3]}, {len(mis_shaped)} mis-shaped "
                                  f"{mis_shaped[:3]}")
        saved_groups = [len(group.get("params", ())) for group in state["optimizer"].get("param_groups", ())] \
            if isinstance(state["optimizer"], dict) else None
        if saved_groups != groups:
            raise CheckpointError(f"checkpoint {path}: its optimizer state has parameter groups of {saved_groups} "
                                  f"parameters, this run's optimizer {groups}")
        if kd_step.loss_fn.bank is not None:
            bank = state.get("bank")
            mine = kd_step.loss_fn.bank.logits.shape
            theirs_shape = getattr(bank.get("logits"), "shape", None) if isinstance(bank, dict) else None
            if theirs_shape != mine:
                raise CheckpointError(f"checkpoint {path}: its DR-KD bank is "
                                      f"{'missing' if theirs_shape is None else tuple(theirs_shape)}, this run's "
                                      f"{tuple(mine)} (samples × classes)")
        world_size = state.get("world_size")
        if world_size is not None and world_size != runtime.world_size:
            raise CheckpointError(f"checkpoint {path} was written by a run of {world_size} process(es) (global batch "
                                  f"{world_size * config.batch_size}); this one has {runtime.world_size}: the global "
                                  f"batch and the loader position would change")
        dataset = state.get("dataset")
        same_exclude = not isinstance(saved, dict) or saved.get("exclude") == config.exclude
        if isinstance(dataset, dict) and same_exclude and dataset.get("train_samples") not in (
                None, train_loader.num_samples):
            raise CheckpointError(f"checkpoint {path} was written on a dataset of {dataset['train_samples']} "
                                  f"training images; {config.data} has {train_loader.num_samples}")

    return check


def _set_aside(paths, suffix: str) -> list[str]:
    """Rename files to ``<name><suffix>`` (out of the checkpoints' name pattern); returns the new names."""
    moved = []
    for path in paths:
        target = path.with_name(path.name + suffix)
        os.replace(path, target)
        moved.append(target.name)
    return moved


def _trim_metrics(folder: Path, step: int) -> int:
    """Drop the ``metrics.jsonl`` records after ``step`` (and a line cut by a kill); returns how many went."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record.get("step", 0)) <= step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
    return dropped


def _train(config: TrainConfig, runtime: Runtime, print_fn) -> dict:
    folder = Path(config.output)
    say = print_fn if runtime.main else (lambda *_: None)
    lock = RunLock(folder)

    def take_folder() -> None:
        """Rank 0: lock the folder, delete orphaned temporary files, and on resume refuse changed options."""
        lock.acquire(command=" ".join(sys.argv))
        for orphan in remove_orphaned_temporaries(folder):
            LOGGER.info("removed %s (the temporary file of a write that was killed)", orphan)
        saved_path = folder / "config.yaml"
        if config.resume and saved_path.is_file():
            saved = read_config_file(saved_path, what="the run folder's config file")
            changes = resume_changes(saved, config)
            if changes:
                raise ValueError(
                    f"--resume would change the run in {folder}: {describe_changes(changes)} (its config.yaml → this "
                    f"request). Refused, nothing was written: these options define what the run computes. On resume "
                    f"only these may change: {', '.join('--' + n.replace('_', '-') for n in RESUME_MAY_CHANGE)} "
                    f"(--exclude not for drkd). Resume with the folder's options (a plain --resume), or start a new "
                    f"run with another --output.")

    try:
        _from_rank0(runtime, take_folder, "run folder check (lock, resume options)")
        return _train_locked(config, runtime, folder, say)
    finally:
        lock.release()


def _train_locked(config: TrainConfig, runtime: Runtime, folder: Path, say) -> dict:
    cache = open_teacher_cache(config)
    train_loader, val_loader = make_loaders(config, runtime, cache)
    steps_per_epoch, total_steps = len(train_loader), len(train_loader) * config.epochs
    kd_step = KDStep(config, runtime, train_loader, teacher_cache=cache)
    model, optimizer, scheduler, scaler, loss_fn = (kd_step.model, kd_step.optimizer, kd_step.scheduler,
                                                    kd_step.scaler, kd_step.loss_fn)
    student = model.student

    chosen: dict = {}

    def select() -> tuple[str | None, list[str]]:
        """Rank 0: the checkpoint to resume from (None: start from the beginning), and notes to print."""
        notes: list[str] = []
        if config.resume:
            problems: list = []
            found = latest_checkpoint(folder, _checkpoint_checker(config, runtime, kd_step, train_loader), problems)
            if found is not None:
                chosen["state"] = found[1]
                return str(found[0]), notes
            if problems:
                listing = "".join(f"\n  - {reason}" for _, reason in problems)  # each names its file
                if not config.allow_restart:
                    raise ValueError(f"--resume: none of the {len(problems)} checkpoint(s) in {folder} can continue "
                                     f"this run (nothing was written):{listing}\nFix or remove them, or pass "
                                     f"--allow-restart to set them aside and start from the beginning")
                moved = _set_aside([path for path, _ in problems], ".unusable")
                notes.append(f"resume: no usable checkpoint in {folder}:{listing}\n--allow-restart: set them aside as "
                             f"{', '.join(moved)}; starting from the beginning")
            else:
                notes.append(f"resume: no checkpoint in {folder} yet; starting from the beginning")
        earlier = list_checkpoints(folder)
        if earlier:  # a new run replaces the folder's earlier one; its checkpoints are kept aside
            moved = _set_aside(earlier, ".old")
            notes.append(f"new run in {folder}: the earlier run's checkpoints were set aside as {', '.join(moved)} "
                         f"(pass --resume to continue a run)")
        return None, notes

    path, notes = _from_rank0(runtime, select, "choice of the checkpoint to resume from")
    for note in notes:
        say(note)

    start_epoch = start_batch = global_step = 0
    best_top1, elapsed_before = None, 0.0
    if path is not None:
        state = chosen.pop("state", None) or read_checkpoint_file(path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if loss_fn.bank is not None:
            loss_fn.bank.load_state_dict(state["bank"])
        _set_rng_state(state["rng"])
        start_epoch, start_batch, global_step = state["epoch"], state["batch"], state["step"]
        best_top1, elapsed_before = state.get("best_top1"), state.get("elapsed_s", 0.0)
        # The schedule follows this run's options (--epochs may change on resume); unchanged, it is the saved one.
        schedule, fresh = scheduler.lr_lambdas[0], Schedule(config, steps_per_epoch)
        if vars(schedule) != vars(fresh):
            for item in scheduler.lr_lambdas:
                vars(item).update(vars(fresh))
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * fresh(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        del state
        say(f"resumed from {path} (epoch {start_epoch + 1}, batch {start_batch}, step {global_step})")
        if start_epoch >= config.epochs:
            say(f"resume: the checkpoint is at the end of epoch {start_epoch} (--epochs {config.epochs}): nothing left "
                f"to train; evaluating")

    if runtime.main:
        folder.mkdir(parents=True, exist_ok=True)
        if path is None:
            for name in _RUN_RECORDS:  # the records of a run that this one replaces (or redoes from the start)
                (folder / name).unlink(missing_ok=True)
        else:
            dropped = _trim_metrics(folder, global_step)
            if dropped:
                LOGGER.info("metrics.jsonl: dropped %d record(s) after step %d (logged before the interruption, "
                            "logged again now)", dropped, global_step)
            (folder / "summary.json").unlink(missing_ok=True)
        save_config(config, folder / "config.yaml")

    kd_step.wrap()
    metrics = MetricsWriter(folder if runtime.main else None, config.tensorboard)
    progress = Progress(config.progress, total_steps, runtime.main)
    parameters = sum(p.numel() for p in student.parameters())
    teacher_name = describe_teachers(config.teacher) if cache is None else cache.teacher_description
    combination = describe_teachers(config.teacher, config.teacher_combine or "logits", config.teacher_weights,
                                    config.resolved_temperature())
    say(f"kdfast train: {config.method} | student {config.student} ({parameters:,} parameters)"
        + (f" | teacher {combination}" if kd_step.teacher is not None else "")
        + (f" | teacher {teacher_name} from cache {config.teacher_cache} (top-{cache.top_k} of {cache.num_classes}, "
           f"{cache.epochs} epoch(s) recorded)" if cache is not None else "")
        + f" | {train_loader.num_samples} train / {val_loader.num_samples} val images, {train_loader.num_classes} "
        f"classes | {runtime.world_size} process(es) on {runtime.device.type} | {steps_per_epoch} steps/epoch")

    if cache is not None and config.epochs > cache.epochs:
        say(f"teacher cache: {cache.epochs} epoch(s) recorded, training for {config.epochs}: epoch e replays recorded "
            f"epoch e mod {cache.epochs} (the same crops and teacher outputs again)")

    identity = _identity(config, train_loader)
    dataset = {"train_samples": train_loader.num_samples, "val_samples": val_loader.num_samples,
               "num_classes": train_loader.num_classes, "image_shape": list(train_loader.image_shape)}

    def checkpoint(epoch: int, batch: int) -> None:
        if not runtime.main:
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                 "epoch": epoch, "batch": batch, "step": global_step, "best_top1": best_top1,
                 "elapsed_s": elapsed_before + time.perf_counter() - started, "config": config.to_dict(),
                 "identity": identity, "dataset": dataset, "world_size": runtime.world_size}
        if loss_fn.bank is not None:
            state["bank"] = loss_fn.bank.state_dict()
        write_checkpoint(folder, state, global_step, keep=config.keep_checkpoints)

    started = time.perf_counter()
    last_eval: dict | None = None
    for epoch in range(start_epoch, config.epochs):
        model.train()
        sums: dict[str, torch.Tensor] = {}
        interval_steps, interval_start, data_wait = 0, time.perf_counter(), 0.0
        batches = iter(train_loader.iterate(epoch, start_batch))
        for batch_index in range(start_batch, steps_per_epoch):
            wait_start = time.perf_counter()
            images, labels, indices = next(batches)
            data_wait += time.perf_counter() - wait_start

            try:
                terms = kd_step(images, labels, indices, epoch)
            except DistributedError as error:
                raise DistributedError(f"{error} [in step {global_step + 1}, epoch {epoch + 1}]") from error.__cause__
            global_step += 1
            interval_steps += 1
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach()

            last_of_epoch = batch_index + 1 == steps_per_epoch
            if global_step % config.log_every == 0 or last_of_epoch:
                names = list(sums)
                reduced = _all_reduce_sum(runtime, torch.stack([sums[n].float() for n in names])
                                          / (interval_steps * runtime.world_size),
                                          f"all-reduce of the loss terms for metrics.jsonl (step {global_step})"
                                          ).tolist()
                if not all(math.isfinite(value) for value in reduced):
                    # Checked per log interval (where the terms reach the host anyway), not per step.
                    raise FloatingPointError(
                        f"training diverged at step {global_step} (epoch {epoch + 1}): mean loss terms "
                        f"{dict(zip(names, reduced))} over the last {interval_steps} steps are not finite; lower "
                        f"--lr, add --warmup-epochs, or resume from an earlier checkpoint in {folder}")
                seconds = time.perf_counter() - interval_start
                record = {"kind": "train", "epoch": epoch, "step": global_step, "lr": scheduler.get_last_lr()[0],
                          "loss": sum(reduced), "terms": dict(zip(names, reduced)),
                          "images_per_s": interval_steps * len(labels) * runtime.world_size / seconds,
                          "data_wait_s": data_wait, "compute_s": seconds - data_wait, "interval_s": seconds}
                metrics.write(record)
                rate = global_step - (start_epoch * steps_per_epoch + start_batch)
                seconds_left = (time.perf_counter() - started) / max(1, rate) * (total_steps - global_step)
                progress.update(global_step, epoch, config.epochs, record, seconds_left)
                sums, interval_steps, interval_start, data_wait = {}, 0, time.perf_counter(), 0.0
            if config.checkpoint_every and global_step % config.checkpoint_every == 0 and not last_of_epoch:
                checkpoint(epoch, batch_index + 1)
        start_batch = 0

        final = epoch + 1 == config.epochs
        if final or (config.eval_every and (epoch + 1) % config.eval_every == 0):
            last_eval = evaluate(student, val_loader, runtime, config)
            best_top1 = last_eval["top1"] if best_top1 is None else max(best_top1, last_eval["top1"])
            metrics.write({"kind": "eval", "epoch": epoch, "step": global_step, **last_eval})
            progress.message(f"epoch {epoch + 1}/{config.epochs}: val top-1 {last_eval['top1']:.2f}% "
                             f"top-5 {last_eval['top5']:.2f}% loss {last_eval['loss']:.4f}")
        checkpoint(epoch + 1, 0)

    if last_eval is None:  # resumed at (or, with a smaller --epochs, after) the end: evaluate what there is
        last_eval = evaluate(student, val_loader, runtime, config)
        best_top1 = last_eval["top1"] if best_top1 is None else max(best_top1, last_eval["top1"])
    seconds = elapsed_before + time.perf_counter() - started
    # images/s of the whole run (every step's global batch over its training time, interruptions excluded)
    images = global_step * config.batch_size * runtime.world_size
    summary = {"method": config.method, "student": config.student, "teacher": teacher_name,
               "epochs": config.epochs, "steps": global_step, "top1": last_eval["top1"], "top5": last_eval["top5"],
               "best_top1": best_top1, "val_loss": last_eval["loss"],
               "train_seconds": seconds, "world_size": runtime.world_size, "device": runtime.device.type,
               "images_per_s": images / max(1e-9, seconds)}
    if runtime.main:
        if config.method == "reskd":
            save_state_dict(folder / "model.pt", student.student.state_dict())
            _save_reskd_chain(config, student, train_loader, folder)
        else:
            save_state_dict(folder / "model.pt", student.state_dict())
        if model.adapter is not None:
            save_state_dict(folder / "adapter.pt", model.adapter.state_dict())
        atomic_write_bytes(folder / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    metrics.close()
    say(f"done: val top-1 {summary['top1']:.2f}% (best {summary['best_top1']:.2f}%), top-5 {summary['top5']:.2f}%, "
        f"{seconds:.1f} s; weights in {folder / 'model.pt'}")
    return summary


def run_eval(config: TrainConfig, print_fn=print) -> dict:
    """``kdfast eval``: top-1/top-5 of ``config.student`` with weights ``config.checkpoint`` on the val split."""
    if not config.checkpoint:
        raise ValueError("checkpoint is required by kdfast eval: the weights of --student to evaluate")
    validate(config)
    _check_files(config)
    from kdfast.data import make_loader

    with _session(config) as runtime:  # the val split only: indexing a training split can take minutes
        val_loader = make_loader(config.data, "val", file_list=config.val_file_list,
                                 **_loader_options(config, runtime))
        model = build_model(config.student, val_loader, config, runtime, config.checkpoint, "checkpoint")
        result = evaluate(model, val_loader, runtime, config)
        if runtime.main:
            listed = f" ({config.val_file_list})" if config.val_file_list else ""
            print_fn(f"{config.student} on {config.data} val{listed} at {val_loader.image_shape[1]} px: "
                     f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%, "
                     f"loss {result['loss']:.4f} ({result['images']} images; weights {config.checkpoint})")
        return result
