"""Res-students (ResKD): a chain of students that each correct the chain's residual error,
with sample-adaptive inference.

(Li et al.: "ResKD: Residual-Guided Knowledge Distillation", IEEE TIP 2021.) A chain
``base, r_1, …, r_K`` predicts ``base(x) + Σ_{j≤k} r_j(x)`` after stage k. Stage k trains
``r_k`` with the earlier stages frozen, on KD (+ CE) of the stage-k logits
(``kdfast train --method reskd``). At inference, :meth:`ResidualChain.infer` runs the base
on every row, then each res-student only on the rows still unsure: after stage k−1 the
gate (:func:`kdfast.gate.gate_compact`, one fused launch) stops every row whose max softmax
probability is ≥ θ_k and compacts the others into one dense sub-batch; the res-student's
logits are added back to those rows. :func:`calibrate` picks θ on held-out data for a
FLOPs budget or an accuracy budget; :func:`accuracy_cost_curve` traces accuracy against
cost (``kdfast reskd curve``). Both run the chain once over the data and count every
threshold's outcome exactly from the stages' confidences (the curve also runs ``infer``
at a few thresholds). Every entry point checks its arguments — thresholds, points, and
the images against the chain's recorded ``in_channels``/``image_size`` — before running
a layer.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from kdfast.gate import gate_compact

__all__ = ["Calibration", "ChainStage", "ResidualChain", "accuracy_cost_curve", "calibrate", "count_flops",
           "load_chain", "save_chain"]

MAX_CURVE_POINTS = 10_000  # accuracy_cost_curve's ``points`` at most (the JSON holds one entry per threshold)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, torch.Tensor))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, torch.Tensor))


def _image_shape(value, what: str) -> tuple[int, int, int]:
    """``value`` as a ``(C, H, W)`` tuple of positive ints, or a TypeError/ValueError naming ``what``."""
    if isinstance(value, torch.Size):
        value = tuple(value)
    if (isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence)
            or not all(_is_int(v) for v in value)):
        raise TypeError(f"{what} must be a (channels, height, width) tuple of ints, got {value!r}")
    if len(value) != 3 or min(value) < 1:
        raise ValueError(f"{what} must be a (channels, height, width) tuple of positive ints, got {tuple(value)}")
    return tuple(int(v) for v in value)


class ResidualChain(nn.Module):
    """``base`` and ``res_students``; ``forward(x)`` is the sum of all their logits.

    Stage 1 is the base alone; stage k+1 adds ``res_students[k]``. ``in_channels`` and
    ``image_size`` (recorded in the chain file; :func:`load_chain` sets them) are the
    images the chain takes, ``[B, in_channels, image_size, image_size]``: every entry point
    checks its input against them before running a layer. Unset (``None``, a chain built in
    code), the input is not checked against a shape.
    """

    def __init__(self, base: nn.Module, res_students: Sequence[nn.Module] = (), *, in_channels: int | None = None,
                 image_size: int | None = None):
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be an nn.Module, got {type(base).__name__}")
        if isinstance(res_students, nn.Module) or not isinstance(res_students, collections.abc.Iterable):
            raise TypeError(f"res_students must be a sequence of nn.Module, got {type(res_students).__name__}")
        res_students = list(res_students)
        for k, student in enumerate(res_students):
            if not isinstance(student, nn.Module):
                raise TypeError(f"res_students[{k}] must be an nn.Module, got {type(student).__name__}")
        for name, value in (("in_channels", in_channels), ("image_size", image_size)):
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self.base = base
        self.res_students = nn.ModuleList(res_students)
        self.in_channels = None if in_channels is None else int(in_channels)
        self.image_size = None if image_size is None else int(image_size)

    @property
    def num_stages(self) -> int:
        return 1 + len(self.res_students)

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """``(in_channels, image_size, image_size)`` when recorded, else ``None``."""
        if self.in_channels is None or self.image_size is None:
            return None
        return (self.in_channels, self.image_size, self.image_size)

    def _expected(self) -> str:
        return (f"[B, {self.in_channels}, {self.image_size}, {self.image_size}] (the chain's in_channels="
                f"{self.in_channels}, image_size={self.image_size})")

    def check_images(self, x, what: str = "x") -> None:
        """Raise a TypeError/ValueError unless ``x`` is a tensor of the images the chain takes."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a tensor of images [B, C, H, W], got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError(f"{what} must have a batch dimension, got a 0-d tensor")
        expected = self.image_shape
        if expected is None:
            return
        if x.dim() != 4:
            raise ValueError(f"{what} must be images of shape {self._expected()}, got shape {list(x.shape)}")
        if x.shape[1] != expected[0]:
            raise ValueError(f"{what} has {x.shape[1]} channel(s) (shape {list(x.shape)}), but the chain takes "
                             f"{expected[0]}: expected images of shape {self._expected()}")
        if tuple(x.shape[2:]) != expected[1:]:
            raise ValueError(f"{what} is {x.shape[2]}×{x.shape[3]} pixels (shape {list(x.shape)}), but the chain "
                             f"takes {expected[1]}×{expected[2]}: expected images of shape {self._expected()}")

    def check_image_shape(self, image_shape, what: str = "the loader's image_shape") -> tuple[int, int, int]:
        """``image_shape`` as ``(C, H, W)``, or a ValueError when it is not the chain's recorded one."""
        image_shape = _image_shape(image_shape, what)
        expected = self.image_shape
        if expected is not None and image_shape != expected:
            which = "channel(s)" if image_shape[0] != expected[0] else "pixels"
            got = image_shape[0] if image_shape[0] != expected[0] else f"{image_shape[1]}×{image_shape[2]}"
            want = expected[0] if image_shape[0] != expected[0] else f"{expected[1]}×{expected[2]}"
            raise ValueError(f"{what} is {image_shape} (C, H, W): {got} {which}, but the chain takes {want} "
                             f"(in_channels={expected[0]}, image_size={expected[1]}: images {expected})")
        return image_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefix_logits(x, self.num_stages)

    def prefix_logits(self, x: torch.Tensor, stages: int) -> torch.Tensor:
        """The chain's logits after its first ``stages`` stages (1 = the base alone)."""
        if not _is_int(stages):
            raise TypeError(f"stages must be an int in [1, {self.num_stages}], got {stages!r}")
        if not 1 <= stages <= self.num_stages:
            raise ValueError(f"stages must be in [1, {self.num_stages}], got {stages}")
        self.check_images(x)
        logits = self.base(x)
        for student in self.res_students[: stages - 1]:
            logits = logits + student(x)
        return logits

    def stage_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The logits after each stage, ``[logits after stage 1, …, after the last]``."""
        self.check_images(x)
        out = [self.base(x)]
        for student in self.res_students:
            out.append(out[-1] + student(x))
        return out

    def thresholds_for(self, thresholds) -> list[float]:
        """One threshold per res-student from a number or a sequence (validated).

        ``thresholds``: a number in [0, 1] (every gate), or a sequence (list, tuple, 1-d
        tensor or array) of one number in [0, 1] per res-student. Anything else — ``None``,
        a string, a bool, NaN — is a TypeError or ValueError that says what is expected.
        """
        count = len(self.res_students)
        expected = f"a number in [0, 1] or a sequence of {count} number(s) in [0, 1] (one per res-student)"
        if isinstance(thresholds, torch.Tensor) or (hasattr(thresholds, "ndim") and hasattr(thresholds, "tolist")):
            kind = str(getattr(thresholds, "dtype", ""))  # a tensor or an array
            if thresholds.ndim > 1 or "complex" in kind or "bool" in kind:
                raise TypeError(f"thresholds must be {expected}, got a {kind} {type(thresholds).__name__} of shape "
                                f"{list(thresholds.shape)}")
            thresholds = thresholds.tolist()  # a number when 0-d
        if _is_number(thresholds):
            values = [thresholds] * count
        elif isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, collections.abc.Iterable) \
                or isinstance(thresholds, collections.abc.Mapping):
            raise TypeError(f"thresholds must be {expected}, got {thresholds!r}")
        else:
            values = list(thresholds)
            for k, value in enumerate(values):
                if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() \
                        and value.dtype != torch.bool:
                    values[k] = value = value.item()
                if not _is_number(value):
                    raise TypeError(f"thresholds[{k}] must be a number in [0, 1], got {value!r} (thresholds: "
                                    f"{expected})")
            if len(values) != count:
                raise ValueError(f"thresholds must have one entry per res-student ({count}), got {len(values)}")
        values = [float(t) for t in values]
        for k, t in enumerate(values):
            if not 0.0 <= t <= 1.0:  # NaN fails too
                where = "thresholds" if _is_number(thresholds) else f"thresholds[{k}]"
                raise ValueError(f"{where} must be in [0, 1], got {t}")
        return values

    @torch.no_grad()
    def infer(self, x: torch.Tensor, thresholds, *, backend: str | None = None):
        """Gated inference: ``(logits [B, C] float32, stages_used [B] int64)``.

        The base runs on every row. Before res-student k, the rows whose max softmax
        probability is ≥ ``thresholds[k]`` stop; the rest are compacted (in their order)
        into one sub-batch, the res-student runs on it alone, and its logits are added to
        those rows. A row that stopped after stage k holds exactly the stage-k prefix; the
        host reads one count per stage (to size the sub-batch), never anything per row.
        ``thresholds``: one per res-student, or one number for all (0: the base alone;
        1: the full chain, except rows whose probability is exactly 1).
        """
        thresholds = self.thresholds_for(thresholds)
        self.check_images(x)
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor of images, got {x.dtype}")
        parameter = next(self.parameters(), None)
        if parameter is not None and parameter.device != x.device:
            raise ValueError(f"x is on {x.device}, the chain on {parameter.device}: move one to the other")
        logits = self.base(x).float()
        batch = logits.shape[0]
        stages = torch.ones(batch, dtype=torch.int64, device=logits.device)
        rows = torch.arange(batch, device=logits.device)
        active = logits
        for student, threshold in zip(self.res_students, thresholds):
            next_rows, count, _ = gate_compact(active, rows, threshold, backend=backend)
            remaining = int(count)  # the one host read per stage: the sub-batch's size
            if remaining == 0:
                break
            rows = next_rows[:remaining]
            logits.index_add_(0, rows, student(x.index_select(0, rows)).float())
            stages.index_add_(0, rows, torch.ones_like(rows))
            active = logits.index_select(0, rows)
        return logits, stages


class ChainStage(nn.Module):
    """What ``--method reskd`` trains: a frozen chain (eval mode, no gradient) plus a new
    res-student, whose sum is the stage's logits. Without a chain it is the base itself."""

    def __init__(self, chain: ResidualChain | None, student: nn.Module, chain_architectures: Sequence[str] = ()):
        super().__init__()
        self.chain = chain
        self.student = student
        self.chain_architectures = list(chain_architectures)  # what save_chain records for the frozen stages
        if chain is not None:
            chain.requires_grad_(False)
            chain.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.chain is not None:
            self.chain.eval()  # the frozen stages keep their BatchNorm statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chain is None:
            return self.student(x)
        with torch.no_grad():
            frozen = self.chain(x)
        return frozen + self.student(x)


# ----------------------------------------------------------------------------- chain files

def save_chain(path, architectures: list[str], modules: list[nn.Module], *, num_classes: int, in_channels: int,
               image_size: int) -> None:
    """Write a chain (architectures and weights of base and res-students) atomically.

    ``in_channels`` and ``image_size`` are the images the chain takes (``load_chain``
    gives them to the chain, whose entry points check their inputs against them)."""
    from kdfast.checkpoint import save_state_dict

    if isinstance(architectures, str) or not all(isinstance(a, str) for a in architectures):
        raise TypeError(f"architectures must be a list of model names, got {architectures!r}")
    if not all(isinstance(m, nn.Module) for m in modules):
        raise TypeError("modules must be a list of nn.Module")
    if len(architectures) != len(modules) or not modules:
        raise ValueError(f"one architecture per module (and at least one), got {len(architectures)} architecture(s) "
                         f"for {len(modules)} module(s)")
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    save_state_dict(path, {"architectures": list(architectures), "num_classes": int(num_classes),
                           "in_channels": int(in_channels), "image_size": int(image_size),
                           "state_dicts": [m.state_dict() for m in modules]})


def load_chain(path, device="cpu") -> tuple[ResidualChain, dict]:
    """``(chain in eval mode, its description)`` from a file written by :func:`save_chain`."""
    from kdfast.checkpoint import read_checkpoint_file
    from kdfast.models import create_model

    spec = read_checkpoint_file(path, what="chain file")
    if not isinstance(spec, dict) or "architectures" not in spec:
        raise ValueError(f"chain file {path} is not a ResKD chain (written by kdfast train --method reskd)")
    missing = [key for key in ("state_dicts", "num_classes", "in_channels", "image_size") if key not in spec]
    if missing:
        raise ValueError(f"chain file {path} lacks {', '.join(missing)} (not written by kdfast train --method reskd?)")
    architectures, states = spec["architectures"], spec["state_dicts"]
    if (not isinstance(architectures, list) or not architectures or not all(isinstance(a, str) for a in architectures)
            or not isinstance(states, list) or len(states) != len(architectures)):
        raise ValueError(f"chain file {path} is damaged: it needs one state dict per architecture, got "
                         f"architectures={architectures!r} and {len(states) if isinstance(states, list) else states!r}"
                         f" state dict(s)")
    for key in ("num_classes", "in_channels", "image_size"):
        if not _is_int(spec[key]) or spec[key] < 1:
            raise ValueError(f"chain file {path} is damaged: {key} must be a positive int, got {spec[key]!r}")
    modules = []
    for stage, (name, state) in enumerate(zip(architectures, states), start=1):
        module = create_model(name, spec["num_classes"], spec["in_channels"], spec["image_size"])
        try:
            module.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as error:
            raise ValueError(f"chain file {path}: the weights of stage {stage} ({name}) do not fit the model: "
                             f"{error}") from error
        modules.append(module)
    chain = ResidualChain(modules[0], modules[1:], in_channels=spec["in_channels"],
                          image_size=spec["image_size"]).to(device).eval()
    return chain, {key: spec[key] for key in ("architectures", "num_classes", "in_channels", "image_size")}


# ----------------------------------------------------------------------------- cost

def count_flops(module: nn.Module, image_shape: Sequence[int], device="cpu", batch: int = 8) -> float:
    """FLOPs of one image through ``module`` (eval mode), counted by ``torch.utils.flop_counter``.

    Args:
        module: any ``nn.Module`` taking ``[N, C, H, W]`` images (a zoo model, a chain stage).
        image_shape: one image's ``(C, H, W)``, e.g. ``(3, 224, 224)`` or a loader's ``image_shape``.
        device: where the counting forward runs (the module's parameters must be there).
        batch: images in the counting forward (the count is divided by it; BatchNorm in
            eval mode makes it exact for any batch).

    Returns:
        Floating-point operations per image (a multiply-add counts 2), as a float.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(image_shape, (str, bytes)) or not isinstance(image_shape, collections.abc.Sequence) \
            or not image_shape or not all(_is_int(v) and v >= 1 for v in image_shape):
        raise ValueError(f"image_shape must be a sequence of positive ints (e.g. (C, H, W)), got {image_shape!r}")
    if not _is_int(batch) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")

    was_training = module.training
    module.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(torch.zeros(batch, *image_shape, device=device))
    module.train(was_training)
    return counter.get_total_flops() / batch


def stage_flops(chain: ResidualChain, image_shape, device="cpu") -> list[float]:
    """FLOPs per image of each stage alone (base, r_1, …)."""
    return [count_flops(m, image_shape, device) for m in (chain.base, *chain.res_students)]


# ----------------------------------------------------------------------------- calibration

@dataclasses.dataclass
class Calibration:
    """Thresholds picked on held-out data and what they give there."""

    thresholds: list[float]
    top1: float  # % with these thresholds
    flops: float  # mean FLOPs per image with these thresholds
    full_top1: float  # the full chain's
    full_flops: float
    stage_fractions: list[float]  # share of images that ran each stage

    @property
    def flops_fraction(self) -> float:
        return self.flops / self.full_flops


def _check_chain(chain) -> None:
    if not isinstance(chain, ResidualChain):
        raise TypeError(f"chain must be a ResidualChain (e.g. from load_chain), got {type(chain).__name__}")


def _loader_image_shape(chain: ResidualChain, loader, image_shape=None, what: str = "loader") -> tuple[int, int, int]:
    """The ``(C, H, W)`` of the loader's images (or ``image_shape``), checked against the chain's
    recorded input before anything runs."""
    if isinstance(loader, (str, bytes, torch.Tensor)) or not isinstance(loader, collections.abc.Iterable):
        raise TypeError(f"{what} must be an iterable of (images, labels, indices) batches (e.g. "
                        f"kdfast.data.make_loader(…, 'val')), got {type(loader).__name__}")
    if image_shape is None:
        image_shape = getattr(loader, "image_shape", None)
        if image_shape is None:
            raise TypeError(f"{what} has no image_shape (C, H, W): use a kdfast loader (make_loader) or pass "
                            f"image_shape=")
        return chain.check_image_shape(image_shape, f"the {what}'s image_shape")
    return chain.check_image_shape(image_shape, "image_shape")


def _batches(loader, chain: ResidualChain | None = None, what: str = "loader"):
    """``(images, labels)`` of each batch ``(images, labels[, indices])``, checked (the images
    against the chain's recorded input, before it runs)."""
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"each batch of the {what} must be (images, labels, indices), got "
                            f"{type(batch).__name__}")
        images, labels = batch[0], batch[1]
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or not isinstance(images, torch.Tensor) \
                or images.dim() == 0 or len(labels) != len(images):
            shape = lambda v: list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__  # noqa: E731
            raise ValueError(f"each batch of the {what} must hold images [B, C, H, W] and labels [B], got images "
                             f"{shape(images)} and labels {shape(labels)}")
        if chain is not None:
            chain.check_images(images, f"a batch of the {what}")
        yield images, labels


@torch.no_grad()
def _top1(model: nn.Module, loader) -> float:
    """Top-1 (in %) of a plain classifier over ``loader``, counted as the trainer's evaluation
    counts it (the first of the top-min(5, C) classes, float32 logits, eval mode)."""
    was_training = model.training
    model.eval()
    correct = count = 0
    with torch.no_grad():
        for images, labels in _batches(loader, what="references' loader"):
            logits = model(images).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices[:, 0]
            correct += int((top == labels).sum())
            count += len(labels)
    model.train(was_training)
    if count == 0:
        raise ValueError("the loader yielded no images")
    return 100 * correct / count


def collect(chain: ResidualChain, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(max probability after each stage but the last [S−1, N] float64, correct after each stage [S, N] bool)."""
    from kdfast.gate import max_probability

    _check_chain(chain)
    chain.eval()
    confidences, correct = [], []
    for images, labels in _batches(loader, chain):
        per_stage = [logits.float() for logits in chain.stage_logits(images)]
        confidences.append(torch.stack([max_probability(s).cpu() for s in per_stage[:-1]])
                           if len(per_stage) > 1 else torch.zeros(0, len(labels), dtype=torch.float64))
        correct.append(torch.stack([(s.argmax(1) == labels).cpu() for s in per_stage]))
    if not correct or sum(c.shape[1] for c in correct) == 0:
        raise ValueError("the loader yielded no images")
    return torch.cat(confidences, dim=1), torch.cat(correct, dim=1)


def simulate(confidences: torch.Tensor, correct: torch.Tensor, flops: Sequence[float],
             thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What gated inference gives for each row of ``thresholds`` [T, S−1]:
    (top-1 % [T], mean FLOPs per image [T], share of images reaching each stage [T, S]).

    Memory grows as T·S·N; for one threshold shared by every gate, :func:`simulate_shared`
    gives the same numbers in O((S·N + T·S)·log N)."""
    # go_on[t, k, n]: image n passes the gate before res-student k (and all earlier ones)
    go_on = (confidences[None] < thresholds[:, :, None]).cumprod(dim=1).bool()
    reached = torch.cat([torch.ones_like(go_on[:, :1]), go_on], dim=1)  # [T, S, N]
    last = reached.sum(dim=1) - 1  # [T, N]: the stage index each image stops at
    final_correct = correct[last, torch.arange(correct.shape[1])[None, :]]
    share = reached.double().mean(dim=2)
    cost = share @ torch.tensor(flops, dtype=torch.float64)
    return 100 * final_correct.double().mean(dim=1), cost, share


def shared_threshold_counts(confidences: torch.Tensor, correct: torch.Tensor,
                            thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact counts of what gated inference with one threshold θ for every gate does, for
    each θ of ``thresholds`` [T]: (images right [T] int64, images reaching each stage [T, S] int64).

    An image reaches stage k+1 when each of its first k confidences is < θ, i.e. when their
    running maximum is (NaN stops it, as at the gate). So, per gate, the running maxima are
    sorted once and each θ is a binary search; the images right are the base's plus, per
    gate, the cumulative gain (right after − right before) of the images it let through.
    """
    stages, total = correct.shape
    thresholds = thresholds.to(torch.float64).reshape(-1).contiguous()
    right = correct[0].sum().expand(len(thresholds)).clone()
    reached = [torch.full(thresholds.shape, total, dtype=torch.int64)]
    if stages > 1:
        values = confidences.to(torch.float64)
        values = torch.where(torch.isnan(values), torch.full_like(values, math.inf), values)
        ordered, order = torch.cummax(values, dim=0).values.sort(dim=1)
        gains = (correct[1:].long() - correct[:-1].long()).gather(1, order).cumsum(dim=1)
        gains = torch.cat([gains.new_zeros(stages - 1, 1), gains], dim=1)  # [S−1, N+1]
        for k in range(stages - 1):
            through = torch.searchsorted(ordered[k].contiguous(), thresholds, side="left")  # #{running max < θ}
            reached.append(through)
            right += gains[k, through]
    return right, torch.stack(reached, dim=1)


def simulate_shared(confidences: torch.Tensor, correct: torch.Tensor, flops: Sequence[float],
                    thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`simulate` for one threshold shared by every gate, ``thresholds`` [T]: the same
    (top-1 % [T], mean FLOPs per image [T], share reaching each stage [T, S]), in memory
    O(S·N + T·S) instead of O(T·S·N)."""
    right, reached = shared_threshold_counts(confidences, correct, thresholds)
    total = correct.shape[1]
    share = reached.double() / total
    cost = share @ torch.tensor(flops, dtype=torch.float64)
    return 100 * (right.double() / total), cost, share


def _candidate_thresholds(confidences: torch.Tensor) -> torch.Tensor:
    """0, 1 and the midpoints between consecutive distinct confidences (never equal to one)."""
    values = torch.unique(confidences[torch.isfinite(confidences)].double())
    middles = (values[1:] + values[:-1]) / 2
    return torch.cat([values.new_tensor([0.0]), middles, values.new_tensor([1.0])]).clamp(0.0, 1.0)


@torch.no_grad()
def calibrate(chain: ResidualChain, val_loader, *, target_flops: float | None = None,
              max_accuracy_drop: float | None = None, image_shape=None) -> Calibration:
    """Pick one threshold for every gate on held-out data, for a budget.

    Args:
        chain: the trained chain.
        val_loader: held-out batches ``(images, labels, indices)`` (e.g. ``make_loader(…, "val")``).
        target_flops: a cost budget, mean FLOPs per image (e.g. ``0.5 * count_flops(teacher, …)``):
            the most accurate thresholds within it.
        max_accuracy_drop: an accuracy budget, top-1 points below the full chain: the
            cheapest thresholds within it.
        image_shape: ``(C, H, W)`` for counting FLOPs (default: the loader's ``image_shape``).

    FLOPs are counted per stage with ``torch.utils.flop_counter``. Candidate thresholds
    lie halfway between consecutive observed confidences, so a calibration point is
    never on a sample's exact confidence. One pass of the chain over the loader; every
    candidate is then simulated exactly from the stages' confidences
    (:func:`simulate_shared`).
    """
    _check_chain(chain)
    for name, value in (("target_flops", target_flops), ("max_accuracy_drop", max_accuracy_drop)):
        if value is not None and not _is_number(value):
            raise TypeError(f"{name} must be a number or None, got {value!r}")
    if (target_flops is None) == (max_accuracy_drop is None):
        raise ValueError("give exactly one budget: target_flops or max_accuracy_drop")
    if target_flops is not None and not target_flops > 0:
        raise ValueError(f"target_flops must be > 0, got {target_flops}")
    if max_accuracy_drop is not None and not max_accuracy_drop >= 0:
        raise ValueError(f"max_accuracy_drop must be >= 0 (points), got {max_accuracy_drop}")
    if not chain.res_students:
        raise ValueError("the chain has no res-student: there is nothing to gate")
    image_shape = _loader_image_shape(chain, val_loader, image_shape, "val_loader")
    device = next(chain.parameters()).device
    flops = stage_flops(chain, image_shape, device)
    confidences, correct = collect(chain, val_loader)
    candidates = _candidate_thresholds(confidences)
    grid = candidates[:, None].expand(-1, len(chain.res_students))
    top1, cost, share = simulate_shared(confidences, correct, flops, candidates)
    full_top1, full_flops = 100 * correct[-1].double().mean().item(), float(sum(flops))
    if target_flops is not None:
        within = cost <= target_flops * (1 + 1e-9)
        if not within.any():
            raise ValueError(f"no thresholds fit target_flops={target_flops:.4g}: the base alone costs {flops[0]:.4g}")
        best = torch.where(within, top1, torch.full_like(top1, -1.0))
        most_accurate = torch.nonzero(best == best.max())[:, 0]
        pick = int(most_accurate[torch.argmin(cost[most_accurate])])  # the cheapest of the most accurate
    else:
        within = top1 >= full_top1 - max_accuracy_drop - 1e-9
        if not within.any():  # only when rows with a probability of exactly 1 stop even at θ = 1
            within = top1 == top1.max()
        masked = torch.where(within, cost, torch.full_like(cost, math.inf))
        pick = int(torch.argmin(masked))
    return Calibration(thresholds=grid[pick].tolist(), top1=top1[pick].item(), flops=cost[pick].item(),
                       full_top1=full_top1, full_flops=full_flops, stage_fractions=share[pick].tolist())


# ----------------------------------------------------------------------------- the curve

def _gated_points(right: torch.Tensor, reached: torch.Tensor, total: int, flops: Sequence[float]) -> list[dict]:
    """Top-1 %, mean FLOPs per image and share reaching each stage from exact counts
    (right [T], reached [T, S]): the one formula of measured and simulated curve points."""
    shares = (reached.to(torch.float64) / total).tolist()
    return [{"top1": 100 * int(r) / total, "flops": float(sum(s * f for s, f in zip(share, flops))),
             "stage_fractions": share} for r, share in zip(right.tolist(), shares)]


@torch.no_grad()
def gated_evaluation(chain: ResidualChain, loader, thresholds, flops: Sequence[float], backend=None) -> dict:
    """Real gated inference over a loader: top-1 %, mean FLOPs per image, share reaching each stage."""
    _check_chain(chain)
    chain.thresholds_for(thresholds)  # checked before any batch
    if isinstance(flops, (str, bytes)) or not isinstance(flops, collections.abc.Sequence) \
            or len(flops) != chain.num_stages or not all(_is_number(f) for f in flops):
        raise ValueError(f"flops must be {chain.num_stages} numbers (one per stage), got {flops!r}")
    if getattr(loader, "image_shape", None) is not None:
        _loader_image_shape(chain, loader)
    correct = total = 0
    reached = torch.zeros(chain.num_stages, dtype=torch.int64)
    for images, labels in _batches(loader, chain):
        logits, stages = chain.infer(images, thresholds, backend=backend)
        correct += (logits.argmax(1) == labels).sum().item()
        total += len(labels)
        reached += (stages[None, :] > torch.arange(chain.num_stages, device=stages.device)[:, None]).sum(dim=1).cpu()
    if total == 0:
        raise ValueError("the loader yielded no images")
    return _gated_points(torch.tensor([correct]), reached[None], total, flops)[0]


def _quantiles(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation), also past its input size limit."""
    if values.numel() <= 2 ** 24:
        return torch.quantile(values, q)
    ordered = values.sort().values
    ranks = q * (len(ordered) - 1)
    below = ranks.floor().long()
    return ordered[below].lerp(ordered[ranks.ceil().long()], ranks - below)


@torch.no_grad()
def accuracy_cost_curve(chain: ResidualChain, loader, *, references: dict[str, nn.Module] | None = None,
                        points: int = 25, measure: int = 5, backend=None) -> dict:
    """Accuracy against cost of gated inference, with reference points.

    The gated points are at ``points`` (1 to :data:`MAX_CURVE_POINTS`) shared thresholds
    spread over the observed confidences (quantiles), plus 0 and 1. The chain runs once
    over the loader (every stage on every image); each point's top-1, FLOPs and stage
    shares are then counted exactly from the stages' confidences and correctness
    (:func:`shared_threshold_counts`, vectorized over the thresholds), so the cost does not
    grow with ``points``. At ``measure`` of the thresholds (evenly spaced, both ends
    included when ``measure`` ≥ 2; 0: none) :meth:`ResidualChain.infer` runs for real over
    the loader and its result is the point; ``gated_check`` records those thresholds and
    the largest difference between the measured and the counted values there (0 unless
    sub-batch float rounding moves an image across a threshold). The reference points are
    each fixed chain length and each model of ``references`` (e.g. the teacher and the
    plain student). Costs are FLOPs per image (``torch.utils.flop_counter``).
    """
    _check_chain(chain)
    if not _is_int(points):
        raise TypeError(f"points must be an int (the number of gated thresholds), got {points!r}")
    if not 1 <= points <= MAX_CURVE_POINTS:
        raise ValueError(f"points must be between 1 and {MAX_CURVE_POINTS} (the number of gated thresholds), "
                         f"got {points}")
    if not _is_int(measure):
        raise TypeError(f"measure must be an int (thresholds measured by real gated inference), got {measure!r}")
    if measure < 0:
        raise ValueError(f"measure must be >= 0 (thresholds measured by real gated inference), got {measure}")
    if references is None:
        references = {}
    if not isinstance(references, collections.abc.Mapping) or not all(
            isinstance(name, str) and isinstance(model, nn.Module) for name, model in references.items()):
        raise TypeError("references must be a dict of name → nn.Module")
    image_shape = _loader_image_shape(chain, loader)
    device = next(chain.parameters()).device
    flops = stage_flops(chain, image_shape, device)
    reference_flops = {}
    for name, model in references.items():
        try:
            reference_flops[name] = count_flops(model, image_shape, device)
        except RuntimeError as error:
            raise ValueError(f"reference {name!r} cannot run on the loader's images {image_shape} (C, H, W): "
                             f"{error}") from error
    confidences, correct = collect(chain, loader)
    finite = confidences[torch.isfinite(confidences)].double()
    quantiles = [] if finite.numel() == 0 else \
        _quantiles(finite, torch.linspace(0, 1, points, dtype=torch.float64)).tolist()
    thresholds = sorted({0.0, 1.0, *[min(1.0, q + 1e-12) for q in quantiles]})
    right, reached = shared_threshold_counts(confidences, correct, torch.tensor(thresholds, dtype=torch.float64))
    gated = [{"threshold": t, **point}
             for t, point in zip(thresholds, _gated_points(right, reached, correct.shape[1], flops))]
    chosen = sorted({round(i) for i in torch.linspace(0, len(thresholds) - 1, min(measure, len(thresholds))).tolist()})
    check = {"measured_thresholds": [thresholds[i] for i in chosen], "max_top1_difference": 0.0,
             "max_flops_difference": 0.0}
    for i in chosen:
        measured = {"threshold": thresholds[i], **gated_evaluation(chain, loader, thresholds[i], flops, backend)}
        check["max_top1_difference"] = max(check["max_top1_difference"], abs(measured["top1"] - gated[i]["top1"]))
        check["max_flops_difference"] = max(check["max_flops_difference"], abs(measured["flops"] - gated[i]["flops"]))
        gated[i] = measured
    prefixes = [{"stages": k, "top1": 100 * correct[k - 1].double().mean().item(), "flops": float(sum(flops[:k]))}
                for k in range(1, chain.num_stages + 1)]
    reference_points = {name: {"top1": _top1(model, loader), "flops": reference_flops[name]}
                        for name, model in references.items()}
    return {"stage_flops": flops, "gated": gated, "chain_prefixes": prefixes, "references": reference_points,
            "gated_check": check}


def plot_curve(curve: dict, path, title: str = "ResKD: accuracy vs cost") -> None:
    """Draw the curve (PNG) against the share of the full chain's FLOPs (linear, fit to the
    chain): gated points, fixed chain lengths, the references (a point where their cost is
    within the chain's range, else a line at their top-1 labelled with their cost), and the
    calibrated operating point measured on held-out images when the curve has one
    (``cross_validated``, as ``kdfast reskd demo`` writes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = curve["chain_prefixes"][-1]["flops"]
    figure, axis = plt.subplots(figsize=(7.5, 4.4))
    gated = sorted(curve["gated"], key=lambda p: p["flops"])
    axis.plot([p["flops"] / full for p in gated], [p["top1"] for p in gated], "o-", color="#DD8452", ms=3,
              label="gated chain (one shared threshold per point)")
    axis.plot([p["flops"] / full for p in curve["chain_prefixes"]], [p["top1"] for p in curve["chain_prefixes"]],
              "s--", color="#4C72B0", label="fixed chain length (1, 2, … stages)")
    others = iter([("D", "#55A868"), ("^", "#8172B2"), ("v", "#937860"), ("X", "#DA8BC3")] * 4)
    right = 1.0
    for name, point in curve["references"].items():
        marker, color = ("*", "#333333") if name == "teacher" else next(others)
        share = point["flops"] / full
        if share <= 1.6:
            axis.plot(share, point["top1"], marker, color=color, ms=9, linestyle="",
                      label=f"{name}: {point['top1']:.2f}% at {share:.2f}× the chain's FLOPs")
            right = max(right, share)
        else:  # far beyond the chain (the teacher): a level, not a point that squeezes the curve
            axis.axhline(point["top1"], color=color, linestyle=":", linewidth=1.2,
                         label=f"{name}: {point['top1']:.2f}% at {share:.1f}× the chain's FLOPs")
    calibrated = curve.get("cross_validated")
    if calibrated:
        axis.plot(calibrated["flops_fraction"], calibrated["top1"], "P", color="#C44E52", ms=11, linestyle="",
                  label=f"calibrated, on held-out halves: {calibrated['top1']:.2f}% at "
                        f"{100 * calibrated['flops_fraction']:.1f}% of the chain's FLOPs")
    axis.set_xlim(0, 1.05 * right)
    axis.set_xlabel("FLOPs per image, as a share of the full chain's")
    axis.set_ylabel("val top-1 (%)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7.5, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_curve(curve: dict, folder) -> tuple[Path, Path]:
    """``curve.json`` and ``curve.png`` in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "curve.json").write_text(json.dumps(curve, indent=2) + "\n")
    plot_curve(curve, folder / "curve.png")
    return folder / "curve.json", folder / "curve.png"


# ----------------------------------------------------------------------------- the demo

class Subset:
    """The batches of a loader restricted to the samples ``keep(sample_indices)`` selects
    (for calibrating on one part of a held-out set and measuring on the other)."""

    def __init__(self, loader, keep):
        self.loader, self.keep = loader, keep
        self.image_shape = loader.image_shape

    def __iter__(self):
        for images, labels, indices in self.loader:
            mask = self.keep(indices)
            if mask.any():
                yield images[mask], labels[mask], indices[mask]


def two_fold_calibration(chain: ResidualChain, loader, max_accuracy_drop: float) -> list[dict]:
    """Calibrate on the even samples and measure gated inference on the odd ones, and the
    reverse: what a calibration promises on data it has not seen."""
    flops = stage_flops(chain, loader.image_shape, next(chain.parameters()).device)
    folds = []
    for name, parity in (("even→odd", 0), ("odd→even", 1)):
        calibration_set = Subset(loader, lambda i, p=parity: i % 2 == p)
        test_set = Subset(loader, lambda i, p=parity: i % 2 != p)
        found = calibrate(chain, calibration_set, max_accuracy_drop=max_accuracy_drop)
        measured = gated_evaluation(chain, test_set, found.thresholds, flops)
        _, correct = collect(chain, test_set)
        full = 100 * correct[-1].double().mean().item()
        folds.append({"folds": name, "thresholds": found.thresholds, "test_top1": measured["top1"],
                      "test_full_chain_top1": full, "test_flops_fraction": measured["flops"] / sum(flops),
                      "stage_fractions": measured["stage_fractions"]})
    return folds
