"""The end-to-end demo (``make demo``): every KD method on the embedded digits, through the trainer.

The setting is few-label distillation, where a student clearly underfits on its own and
a teacher's soft labels carry what the labels do not (Hinton et al., 2015): a ResNet-20
teacher is trained with cross-entropy on the whole training split (1,257 images); then a
ResNet-8 student (29 % of its parameters) is trained on **10 images per class** (100
images, ``--train-per-class 10``) with each method — ``ce``, ``kd``, ``dist``, ``cmkd``,
``dkd``, ``drkd``, ``pesf``, and ``kd+ls`` (KD on logit-standardized logits) — from the
same initialization and data order for a given seed, over several seeds. Every run is a
real ``kdfast train`` run (its folder holds the config, metrics, checkpoints and
weights), evaluated every 10 epochs so that ``kdfast plot`` draws its curve.

Each method is reported as its mean ± std top-1 and as the mean ± std of its **paired
differences** to CE (same seed: same initialization, data order and subset), next to the
noise floor: one validation image is 100/540 = 0.19 points. Written to the output folder:
``results.md`` (the table), ``results.json`` (every run), ``results.png`` (the chart).
Nothing is downloaded: the digits (1,797 8×8 images, 10 classes) ship inside scikit-learn.

Run ``python -m kdfast.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

import kdfast
from kdfast.config import resolve_config
from kdfast.provenance import device_name, source_commit
from kdfast.train import train

__all__ = ["METHODS", "report_table", "run", "run_options", "write_report"]

#: The rows of the demo: a trainer method, or a variant ``method+ls`` (the method with
#: ``--logit-standardization``). ResKD has its own demo: ``kdfast reskd demo``.
METHODS = ("ce", "kd", "dist", "cmkd", "dkd", "drkd", "pesf", "kd+ls")
#: Per-method settings of the demo on top of the trainer's defaults (each method's paper
#: defaults otherwise, untuned): DIST with its CIFAR setting (τ = 4, β = γ = 2) rather than
#: its ImageNet default (τ = 1, β = γ = 1); DKD's ramp over the same share of training as
#: the authors' (20 of 240 CIFAR epochs: 1/12) instead of their 20 epochs.
METHOD_OPTIONS = {"dist": dict(temperature=4.0, dist_beta=2.0, dist_gamma=2.0)}
#: The student's training set: this many images of each class.
PER_CLASS = 10
#: One validation image, in points of top-1 (540 validation images).
ONE_IMAGE = 100.0 / 540


def run_options(name: str, epochs: int) -> dict:
    """The trainer options of a demo row: ``kd`` → method kd; ``kd+ls`` → kd with logit standardization."""
    method, _, variant = name.partition("+")
    options = dict(method=method, **METHOD_OPTIONS.get(method, {}))
    if method == "dkd":
        options["dkd_warmup_epochs"] = epochs / 12
    if variant == "ls":
        options["logit_standardization"] = True
    elif variant:
        raise ValueError(f"unknown demo variant {name!r} (known: {', '.join(METHODS)})")
    return options


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _quiet(*_):
    pass


def run(output: str | Path = "runs/demo", teacher: str = "resnet20", student: str = "resnet8",
        teacher_epochs: int = 30, epochs: int = 60, seeds: int = 5, methods=METHODS, per_class: int = PER_CLASS,
        print_fn=print) -> dict:
    """Train the teacher and every (method, seed) student; write and return the results.

    The teacher trains on the whole training split with batch 64; the students on
    ``per_class`` images of each class with batch 32 (lr 0.1, cosine, SGD), evaluated every
    10 epochs. Runs are deterministic (``--deterministic``): the same numbers on every rerun
    on the same machine and thread count.
    """
    begin = time.perf_counter()
    output = Path(output)
    common = dict(data="digits", lr=0.1, progress="none", deterministic=True)
    print_fn(f"kdfast demo: digits, teacher {teacher} on all 1257 training images, student {student} on "
             f"{per_class} per class ({10 * per_class} images), {seeds} seed(s), 540 validation images (one image = "
             f"{ONE_IMAGE:.2f} points); backends: "
             + ", ".join(name for name, status in kdfast.backends().items() if status.available))
    start = time.perf_counter()
    teacher_summary = train(resolve_config(student=teacher, method="ce", epochs=teacher_epochs, batch_size=64,
                                           eval_every=0, output=str(output / "teacher"), **common), print_fn=_quiet)
    teacher_seconds = time.perf_counter() - start
    print_fn(f"teacher {teacher}: val top-1 {teacher_summary['top1']:.2f}% ({teacher_seconds:.1f} s)")
    teacher_file = str(output / "teacher" / "model.pt")

    results = {"teacher": {"model": teacher, "top1": [teacher_summary["top1"]], "seconds": [teacher_seconds]}}
    for method in methods:
        scores, seconds = [], []
        for seed in range(seeds):
            start = time.perf_counter()
            teacher_options = {} if method == "ce" else dict(teacher=teacher, teacher_checkpoint=teacher_file)
            summary = train(resolve_config(student=student, epochs=epochs, seed=seed, batch_size=32,
                                           train_per_class=per_class, eval_every=10,
                                           output=str(output / f"{method}-seed{seed}"), **teacher_options,
                                           **common, **run_options(method, epochs)), print_fn=_quiet)
            scores.append(summary["top1"])
            seconds.append(time.perf_counter() - start)
            print_fn(f"  {method:6s} seed {seed}: val top-1 {summary['top1']:6.2f}% ({seconds[-1]:.1f} s)")
        results[method] = {"model": student, "top1": scores, "seconds": seconds}
        mean, std = _mean_std(scores)
        gain = ""
        if method != "ce" and "ce" in results:
            gain_mean, gain_std = _mean_std(_paired_gains(results, method))
            gain = f", vs ce {gain_mean:+.2f} ± {gain_std:.2f}"
        print_fn(f"  {method:6s} val top-1 {mean:6.2f}% ± {std:4.2f}{gain}")

    settings = dict(teacher=teacher, student=student, teacher_epochs=teacher_epochs, epochs=epochs, seeds=seeds,
                    per_class=per_class, device=device_name("cpu"), torch=torch.__version__, commit=source_commit(),
                    date=datetime.date.today().isoformat(), seconds=round(time.perf_counter() - begin, 1))
    write_report(output, results, settings)
    print_fn(f"table: {output / 'results.md'}, chart: {output / 'results.png'}, curves: kdfast plot "
             f"{output}/ce-seed0 {output}/kd-seed0")
    return results


def _paired_gains(results: dict, method: str) -> list[float]:
    return [score - baseline for score, baseline in zip(results[method]["top1"], results["ce"]["top1"])]


def report_table(results: dict, settings: dict) -> str:
    """The Markdown table of the results: top-1 per method and its paired gain over CE."""
    lines = ["| method | model | top-1 (mean ± std) | gain over ce (paired, mean ± std) | time per run |",
             "| --- | --- | ---: | ---: | ---: |"]
    for method, entry in results.items():
        mean, std = _mean_std(entry["top1"])
        score = f"{mean:.2f}" if len(entry["top1"]) == 1 else f"{mean:.2f} ± {std:.2f}"
        gain = "—"
        if method not in ("teacher", "ce") and "ce" in results:
            gain_mean, gain_std = _mean_std(_paired_gains(results, method))
            gain = f"{gain_mean:+.2f} ± {gain_std:.2f}"
        name = f"{method} (all {1257} images)" if method == "teacher" else method
        lines.append(f"| {name} | {entry['model']} | {score} | {gain} | {statistics.mean(entry['seconds']):.1f} s |")
    return "\n".join(lines)


def write_report(output: Path, results: dict, settings: dict) -> None:
    """``results.md`` (the table), ``results.json`` (every run) and ``results.png`` (the chart)."""
    seeds = settings["seeds"]
    lines = [f"# kdfast demo: digits, teacher {settings['teacher']}, student {settings['student']} on "
             f"{settings['per_class']} images per class", "",
             f"{seeds} seed(s), {settings['epochs']} student epochs, {settings['teacher_epochs']} teacher epochs; "
             f"validation top-1 on 540 images (one image = {ONE_IMAGE:.2f} points).", "",
             report_table(results, settings)]
    (output / "results.md").write_text("\n".join(lines) + "\n")
    (output / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    draw_chart(results, settings, output / "results.png")


def draw_chart(results: dict, settings: dict, path: Path) -> None:
    """Left: every run's top-1 (dots) and each method's mean, the teacher as a line. Right:
    each method's paired gain over CE (mean ± std over seeds) against the one-image band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in results if m != "teacher"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.1, 1]})
    teacher = results["teacher"]["top1"][0]
    for index, method in enumerate(methods):
        scores = results[method]["top1"]
        color = "#4C72B0" if method == "ce" else "#DD8452"
        left.scatter([index] * len(scores), scores, color=color, s=18, alpha=0.7, zorder=3)
        left.hlines(statistics.mean(scores), index - 0.3, index + 0.3, color=color, linewidth=2.5, zorder=4)
    left.axhline(teacher, color="#555555", linestyle="--", linewidth=1)
    left.text(len(methods) - 0.5, teacher, f"teacher {teacher:.2f}% (one run)", ha="right", va="bottom",
              fontsize=8, color="#555555")
    every = [s for m in methods for s in results[m]["top1"]] + [teacher]
    left.set_ylim(max(0.0, min(every) - 3.0), min(100.0, max(every) + 1.5))
    left.set_xticks(range(len(methods)), methods)
    left.set_ylabel("validation top-1 (%)")
    left.set_title(f"{settings['student']} on {settings['per_class']} images/class: each seed (dot), mean (bar)",
                   fontsize=9)
    handles = [plt.Line2D([], [], color="#4C72B0", marker="o", linestyle="", label="ce (no teacher)"),
               plt.Line2D([], [], color="#DD8452", marker="o", linestyle="", label="KD methods"),
               plt.Line2D([], [], color="#555555", linestyle="--", label=f"{settings['teacher']} teacher")]
    left.legend(handles=handles, fontsize=8, loc="lower right")

    others = [m for m in methods if m != "ce"]
    if "ce" in results and others:
        gains = [_mean_std(_paired_gains(results, m)) for m in others]
        right.axhspan(-ONE_IMAGE, ONE_IMAGE, color="#cccccc", alpha=0.6, label="± one validation image")
        right.axhline(0, color="#4C72B0", linewidth=1, label="ce")
        right.errorbar(range(len(others)), [g[0] for g in gains], yerr=[g[1] for g in gains], fmt="o",
                       color="#DD8452", capsize=4, label=f"gain over ce (mean ± std, {settings['seeds']} seeds)")
        right.set_xticks(range(len(others)), others)
        highest = max(g[0] + g[1] for g in gains)
        right.set_ylim(top=highest + 0.35 * (highest - min(g[0] - g[1] for g in gains)))  # room for the legend
        right.set_ylabel("top-1 gain over ce (points)")
        right.set_title("paired differences to ce (same seed)", fontsize=9)
        right.legend(fontsize=8, loc="upper right")
    for axis in (left, right):
        axis.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdfast.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", default="runs/demo", help="run folder")
    parser.add_argument("--teacher", default="resnet20", help="teacher architecture (`kdfast models`)")
    parser.add_argument("--student", default="resnet8", help="student architecture")
    parser.add_argument("--teacher-epochs", type=int, default=30, help="teacher epochs (all training images)")
    parser.add_argument("--epochs", type=int, default=60, help="student epochs")
    parser.add_argument("--per-class", type=int, default=PER_CLASS, help="student training images per class")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per method")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="rows of the table (ce is always added: the baseline)")
    args = parser.parse_args(argv)
    if "ce" not in args.methods:
        args.methods.insert(0, "ce")  # the baseline every other row is compared with
    run(args.output, args.teacher, args.student, args.teacher_epochs, args.epochs, args.seeds, args.methods,
        args.per_class)


if __name__ == "__main__":
    main()
