"""Training curves of kdfast runs from their ``metrics.jsonl`` (``kdfast plot RUN [RUN …]``).

One figure of four panels, every run overlaid and labelled (by its folder name, or
``--labels``): the training loss and each of its terms against the step, the learning
rate, the images per second, and the validation top-1 against the epoch (a run evaluated
only at its end is one marked point). Reads only ``metrics.jsonl``: no TensorBoard needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["plot_runs", "read_metrics"]


def read_metrics(run: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run folder's ``metrics.jsonl``; ValueError when it has none."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run} is not a kdfast run folder with metrics (no {path.name}); give the --output folder "
                         f"of a `kdfast train` run")
    train, evals = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{number}: not a JSON record") from None
        (evals if record.get("kind") == "eval" else train).append(record)
    if not train and not evals:
        raise ValueError(f"{path} holds no records yet")
    return train, evals


def plot_runs(runs, output: str | os.PathLike, labels=None, title: str | None = None) -> Path:
    """Draw the runs' curves into ``output`` (a PNG, or any format matplotlib knows by its
    suffix) and return its path."""
    runs = [Path(run) for run in runs]
    if not runs:
        raise ValueError("plot_runs needs at least one run folder")
    labels = [run.name or str(run) for run in runs] if labels is None else list(labels)
    if len(labels) != len(runs):
        raise ValueError(f"labels must name each run ({len(runs)}), got {len(labels)}")
    records = [read_metrics(run) for run in runs]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    loss_axis, lr_axis, speed_axis, top1_axis = axes.flat
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for number, (label, (train, evals)) in enumerate(zip(labels, records)):
        color = colors[number % len(colors)]
        steps = [r["step"] for r in train]
        if train:
            loss_axis.plot(steps, [r["loss"] for r in train], color=color, label=f"{label}: loss")
            terms = sorted({name for r in train for name in r.get("terms", {})})
            if len(terms) > 1:  # with a single term the loss is that term
                for index, name in enumerate(terms):
                    points = [(r["step"], r["terms"][name]) for r in train if name in r.get("terms", {})]
                    loss_axis.plot(*zip(*points), color=color, alpha=0.6, linewidth=1,
                                   linestyle=styles[(index + 1) % len(styles)], label=f"{label}: {name}")
            lr_axis.plot(steps, [r["lr"] for r in train], color=color, label=label)
            speed_axis.plot(steps, [r["images_per_s"] for r in train], color=color, label=label)
        if evals:
            epochs = [r["epoch"] + 1 for r in evals]
            top1_axis.plot(epochs, [r["top1"] for r in evals], color=color, marker="o", markersize=4,
                           label=f"{label}: {evals[-1]['top1']:.2f}%")
    loss_axis.set(title="training loss (each term dashed)", xlabel="step", ylabel="loss")
    if any(r["loss"] > 0 for train, _ in records for r in train):
        loss_axis.set_yscale("log")
    lr_axis.set(title="learning rate", xlabel="step", ylabel="lr")
    speed_axis.set(title="throughput", xlabel="step", ylabel="images/s")
    speed_axis.set_ylim(bottom=0)
    top1_axis.set(title="validation top-1 (last value in the legend)", xlabel="epoch", ylabel="top-1 (%)")
    top1_axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    scores = [r["top1"] for _, evals in records for r in evals]
    if scores:  # at least 2 points of range: differences of a few tenths must not fill the panel
        low, high = min(scores), max(scores)
        middle, half = (low + high) / 2, max((high - low) / 2 * 1.15, 1.0)
        top1_axis.set_ylim(max(0.0, middle - half), min(100.0, middle + half) + 0.05)
    if not any(evals for _, evals in records):
        top1_axis.text(0.5, 0.5, "no evaluation recorded (--eval-every)", ha="center", va="center",
                       transform=top1_axis.transAxes, color="gray")
    for axis in axes.flat:
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="best")
    figure.suptitle(title or ("kdfast run " + labels[0] if len(runs) == 1 else f"kdfast runs ({len(runs)})"))
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
