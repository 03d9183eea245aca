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
cost (``kdfast reskd curve``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from kdfast.gate import gate_compact

__all__ = ["Calibration", "ChainStage", "ResidualChain", "accuracy_cost_curve", "calibrate", "count_flops",
           "load_chain", "save_chain"]


class ResidualChain(nn.Module):
    """``base`` and ``res_students``; ``forward(x)`` is the sum of all their logits.

    Stage 1 is the base alone; stage k+1 adds ``res_students[k]``.
    """

    def __init__(self, base: nn.Module, res_students: Sequence[nn.Module] = ()):
        super().__init__()
        self.base = base
        self.res_students = nn.ModuleList(res_students)

    @property
    def num_stages(self) -> int:
        return 1 + len(self.res_students)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefix_logits(x, self.num_stages)

    def prefix_logits(self, x: torch.Tensor, stages: int) -> torch.Tensor:
        """The chain's logits after its first ``stages`` stages (1 = the base alone)."""
        if not 1 <= stages <= self.num_stages:
            raise ValueError(f"stages must be in [1, {self.num_stages}], got {stages}")
        logits = self.base(x)
        for student in self.res_students[: stages - 1]:
            logits = logits + student(x)
        return logits

    def stage_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The logits after each stage, ``[logits after stage 1, …, after the last]``."""
        out = [self.base(x)]
        for student in self.res_students:
            out.append(out[-1] + student(x))
        return out

    def thresholds_for(self, thresholds) -> list[float]:
        """One threshold per res-student from a number or a sequence (validated)."""
        if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
            thresholds = [float(thresholds)] * len(self.res_students)
        thresholds = [float(t) for t in thresholds]
        if len(thresholds) != len(self.res_students):
            raise ValueError(f"thresholds must have one entry per res-student ({len(self.res_students)}), "
                             f"got {len(thresholds)}")
        for t in thresholds:
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"thresholds must be in [0, 1], got {t}")
        return thresholds

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
    """Write a chain (architectures and weights of base and res-students) atomically."""
    from kdfast.checkpoint import save_state_dict

    if len(architectures) != len(modules):
        raise ValueError("one architecture per module")
    save_state_dict(path, {"architectures": list(architectures), "num_classes": num_classes,
                           "in_channels": in_channels, "image_size": image_size,
                           "state_dicts": [m.state_dict() for m in modules]})


def load_chain(path, device="cpu") -> tuple[ResidualChain, dict]:
    """``(chain in eval mode, its description)`` from a file written by :func:`save_chain`."""
    from kdfast.checkpoint import read_checkpoint_file
    from kdfast.models import create_model

    spec = read_checkpoint_file(path, what="chain file")
    if not isinstance(spec, dict) or "architectures" not in spec:
        raise ValueError(f"chain file {path} is not a ResKD chain (written by kdfast train --method reskd)")
    modules = []
    for name, state in zip(spec["architectures"], spec["state_dicts"]):
        module = create_model(name, spec["num_classes"], spec["in_channels"], spec["image_size"])
        module.load_state_dict(state)
        modules.append(module)
    chain = ResidualChain(modules[0], modules[1:]).to(device).eval()
    return chain, {key: spec[key] for key in ("architectures", "num_classes", "in_channels", "image_size")}


# ----------------------------------------------------------------------------- cost

def count_flops(module: nn.Module, image_shape: Sequence[int], device="cpu", batch: int = 8) -> float:
    """FLOPs of one image through ``module`` (eval mode), counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

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


@torch.no_grad()
def collect(chain: ResidualChain, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(max probability after each stage but the last [S−1, N] float64, correct after each stage [S, N] bool)."""
    from kdfast.gate import max_probability

    chain.eval()
    confidences, correct = [], []
    for images, labels, _ in loader:
        per_stage = [logits.float() for logits in chain.stage_logits(images)]
        confidences.append(torch.stack([max_probability(s).cpu() for s in per_stage[:-1]]))
        correct.append(torch.stack([(s.argmax(1) == labels).cpu() for s in per_stage]))
    return torch.cat(confidences, dim=1), torch.cat(correct, dim=1)


def simulate(confidences: torch.Tensor, correct: torch.Tensor, flops: Sequence[float],
             thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What gated inference gives for each row of ``thresholds`` [T, S−1]:
    (top-1 % [T], mean FLOPs per image [T], share of images reaching each stage [T, S])."""
    # go_on[t, k, n]: image n passes the gate before res-student k (and all earlier ones)
    go_on = (confidences[None] < thresholds[:, :, None]).cumprod(dim=1).bool()
    reached = torch.cat([torch.ones_like(go_on[:, :1]), go_on], dim=1)  # [T, S, N]
    last = reached.sum(dim=1) - 1  # [T, N]: the stage index each image stops at
    final_correct = correct[last, torch.arange(correct.shape[1])[None, :]]
    share = reached.double().mean(dim=2)
    cost = share @ torch.tensor(flops, dtype=torch.float64)
    return 100 * final_correct.double().mean(dim=1), cost, share


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
    never on a sample's exact confidence.
    """
    if (target_flops is None) == (max_accuracy_drop is None):
        raise ValueError("give exactly one budget: target_flops or max_accuracy_drop")
    if target_flops is not None and not target_flops > 0:
        raise ValueError(f"target_flops must be > 0, got {target_flops}")
    if max_accuracy_drop is not None and not max_accuracy_drop >= 0:
        raise ValueError(f"max_accuracy_drop must be >= 0 (points), got {max_accuracy_drop}")
    if not chain.res_students:
        raise ValueError("the chain has no res-student: there is nothing to gate")
    device = next(chain.parameters()).device
    flops = stage_flops(chain, image_shape or val_loader.image_shape, device)
    confidences, correct = collect(chain, val_loader)
    candidates = _candidate_thresholds(confidences)
    grid = candidates[:, None].expand(-1, len(chain.res_students))
    top1, cost, share = simulate(confidences, correct, flops, grid)
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

@torch.no_grad()
def gated_evaluation(chain: ResidualChain, loader, thresholds, flops: Sequence[float], backend=None) -> dict:
    """Real gated inference over a loader: top-1 %, mean FLOPs per image, share reaching each stage."""
    correct = total = 0
    reached = torch.zeros(chain.num_stages, dtype=torch.float64)
    for images, labels, _ in loader:
        logits, stages = chain.infer(images, thresholds, backend=backend)
        correct += (logits.argmax(1) == labels).sum().item()
        total += len(labels)
        for k in range(chain.num_stages):
            reached[k] += (stages > k).sum().item()
    share = (reached / total).tolist()
    return {"top1": 100 * correct / total, "flops": float(sum(s * f for s, f in zip(share, flops))),
            "stage_fractions": share}


@torch.no_grad()
def accuracy_cost_curve(chain: ResidualChain, loader, *, references: dict[str, nn.Module] | None = None,
                        points: int = 25, backend=None) -> dict:
    """Accuracy against cost of gated inference, with reference points.

    The gated points run :meth:`ResidualChain.infer` for real, at ``points`` shared
    thresholds spread over the observed confidences (quantiles); the reference points
    are each fixed chain length and each model of ``references`` (e.g. the teacher and
    the plain student). Costs are FLOPs per image (``torch.utils.flop_counter``).
    """
    device = next(chain.parameters()).device
    image_shape = loader.image_shape
    flops = stage_flops(chain, image_shape, device)
    confidences, correct = collect(chain, loader)
    finite = confidences[torch.isfinite(confidences)].double()
    quantiles = torch.quantile(finite, torch.linspace(0, 1, points, dtype=torch.float64)).tolist()
    thresholds = sorted({0.0, 1.0, *[min(1.0, q + 1e-12) for q in quantiles]})
    gated = []
    for threshold in thresholds:
        result = gated_evaluation(chain, loader, threshold, flops, backend)
        gated.append({"threshold": threshold, **result})
    prefixes = [{"stages": k, "top1": 100 * correct[k - 1].double().mean().item(), "flops": float(sum(flops[:k]))}
                for k in range(1, chain.num_stages + 1)]
    from kdfast.config import TrainConfig
    from kdfast.train import Runtime, evaluate

    runtime = Runtime(0, 1, 0, device)
    reference_points = {name: {"top1": evaluate(model, loader, runtime, TrainConfig())["top1"],
                               "flops": count_flops(model, image_shape, device)}
                        for name, model in (references or {}).items()}
    return {"stage_flops": flops, "gated": gated, "chain_prefixes": prefixes, "references": reference_points}


def plot_curve(curve: dict, path, title: str = "ResKD: accuracy vs cost") -> None:
    """Draw the curve (PNG): gated points, fixed chain lengths, references; the x axis is the
    share of the teacher's FLOPs when a ``teacher`` reference is present, with ResKD's
    published range (18–57 % of the teacher's cost) shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = curve["references"].get("teacher")
    scale = teacher["flops"] if teacher else 1.0
    unit = "share of the teacher's FLOPs" if teacher else "FLOPs per image"
    figure, axis = plt.subplots(figsize=(7, 4.2))
    if teacher:
        axis.axvspan(0.18, 0.57, color="#DDDDDD", alpha=0.6, label="ResKD paper: 18–57 % of the teacher's cost")
    gated = sorted(curve["gated"], key=lambda p: p["flops"])
    axis.plot([p["flops"] / scale for p in gated], [p["top1"] for p in gated], "o-", color="#DD8452", ms=3,
              label="gated chain (shared threshold)")
    axis.plot([p["flops"] / scale for p in curve["chain_prefixes"]], [p["top1"] for p in curve["chain_prefixes"]],
              "s--", color="#4C72B0", label="fixed chain length (1, 2, … stages)")
    markers = {"teacher": ("*", "#333333"), "student": ("D", "#55A868")}
    for name, point in curve["references"].items():
        marker, color = markers.get(name, ("^", "#8172B2"))
        axis.plot(point["flops"] / scale, point["top1"], marker, color=color, ms=10, label=name)
    axis.set_xscale("log")
    axis.set_xlabel(unit + " (log scale)")
    axis.set_ylabel("val top-1 (%)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
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


def demo(output="runs/reskd", print_fn=print) -> dict:
    """``kdfast reskd demo``: train a teacher, a plain student and a 3-stage chain on the
    digits, then write the accuracy-vs-cost curve and a two-fold calibration."""
    from kdfast.config import resolve_config
    from kdfast.data import make_loader
    from kdfast.models import create_model, load_weights
    from kdfast.train import train

    output = Path(output)
    common = dict(progress="none", eval_every=0, tensorboard=False)
    quiet = lambda *_: None  # noqa: E731
    teacher_file = output / "teacher" / "model.pt"
    train(resolve_config(student="resnet20", epochs=30, output=str(teacher_file.parent), **common), print_fn=quiet)
    distill = dict(teacher="resnet20", teacher_checkpoint=str(teacher_file), **common)
    # The plain student: the base's architecture, trained as long as the whole chain.
    train(resolve_config(student="resnet8_w4", method="kd", epochs=24, output=str(output / "student"), **distill),
          print_fn=quiet)
    chain_file = None
    for stage, epochs in enumerate((4, 10, 10)):  # a briefly trained base, then two res-students
        folder = output / f"stage{stage}"
        train(resolve_config(student="resnet8_w4", method="reskd", epochs=epochs, reskd_chain=chain_file,
                             output=str(folder), **distill), print_fn=quiet)
        chain_file = str(folder / "chain.pt")
    chain, spec = load_chain(chain_file)
    val = make_loader("digits", "val", batch_size=540)
    teacher = create_model("resnet20", 10, 1, 8)
    load_weights(teacher, teacher_file)
    student = create_model("resnet8_w4", 10, 1, 8)
    load_weights(student, output / "student" / "model.pt")
    curve = accuracy_cost_curve(chain, val, references={"teacher": teacher, "student": student})
    curve["architectures"] = spec["architectures"]
    curve["two_fold_calibration"] = two_fold_calibration(chain, val, max_accuracy_drop=0.25)
    json_path, png_path = write_curve(curve, output)
    teacher_flops = curve["references"]["teacher"]["flops"]
    print_fn(f"ResKD on digits: chain {' + '.join(spec['architectures'])}")
    for point in curve["chain_prefixes"]:
        print_fn(f"  {point['stages']} stage(s): top-1 {point['top1']:.2f}%, {point['flops'] / 1e3:.0f} kFLOPs "
                 f"({100 * point['flops'] / teacher_flops:.1f}% of the teacher)")
    for name, point in curve["references"].items():
        print_fn(f"  {name}: top-1 {point['top1']:.2f}%, {point['flops'] / 1e3:.0f} kFLOPs")
    folds = curve["two_fold_calibration"]
    for fold in folds:
        print_fn(f"  calibrated {fold['folds']} (≤ 0.25 points): top-1 {fold['test_top1']:.2f}% vs full chain "
                 f"{fold['test_full_chain_top1']:.2f}% at {100 * fold['test_flops_fraction']:.1f}% of its FLOPs")
    # Every image once, gated with thresholds calibrated on the other half (equal halves).
    mean = lambda key: sum(fold[key] for fold in folds) / len(folds)  # noqa: E731
    curve["cross_validated"] = {"top1": mean("test_top1"), "full_chain_top1": mean("test_full_chain_top1"),
                                "flops_fraction": mean("test_flops_fraction")}
    json_path.write_text(json.dumps(curve, indent=2) + "\n")
    print_fn(f"  cross-validated: top-1 {mean('test_top1'):.2f}% vs full chain {mean('test_full_chain_top1'):.2f}% "
             f"at {100 * mean('test_flops_fraction'):.1f}% of its FLOPs")
    print_fn(f"curve: {json_path}, {png_path}")
    return curve
