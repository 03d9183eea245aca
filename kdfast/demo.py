"""The end-to-end demo (``make demo``): every KD method on the embedded digits, through the trainer.

A ResNet-20 teacher is trained with cross-entropy; then a ResNet-8 student (a quarter of
its parameters) is trained with each method — ``ce``, ``kd``, ``dist``, ``cmkd``, ``dkd``,
``drkd``, ``pesf``, and ``kd+ls`` (KD on logit-standardized logits) — from the same
initialization and data order for a given seed, over several seeds. Every run is a real ``kdfast train`` run (its folder holds the config, metrics,
checkpoints and weights). The table of mean ± std top-1 and time per method is printed and
written as ``results.md``, ``results.json`` and a chart ``results.png`` in the run folder.
Nothing is downloaded: the digits (1,797 8×8 images, 10 classes) ship inside scikit-learn.

Run ``python -m kdfast.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import kdfast
from kdfast.config import resolve_config
from kdfast.train import train

#: The rows of the demo: a trainer method, or a variant ``method+ls`` (the method with
#: ``--logit-standardization``). ResKD has its own demo: ``kdfast reskd demo``.
METHODS = ("ce", "kd", "dist", "cmkd", "dkd", "drkd", "pesf", "kd+ls")
#: Per-method settings of the demo on top of the trainer's defaults: DIST with its CIFAR
#: setting (τ = 4, β = γ = 2) rather than its ImageNet default (τ = 1, β = γ = 1); DKD's
#: ramp over the same share of training as the authors' (20 of 240 CIFAR epochs: 1/12,
#: here 2 of 20 epochs) instead of their 20 epochs, which would be the whole run.
METHOD_OPTIONS = {"dist": dict(temperature=4.0, dist_beta=2.0, dist_gamma=2.0), "dkd": dict(dkd_warmup_epochs=2.0)}


def run_options(name: str) -> dict:
    """The trainer options of a demo row: ``kd`` → method kd; ``kd+ls`` → kd with logit standardization."""
    method, _, variant = name.partition("+")
    options = dict(method=method, **METHOD_OPTIONS.get(method, {}))
    if variant == "ls":
        options["logit_standardization"] = True
    elif variant:
        raise ValueError(f"unknown demo variant {name!r} (known: {', '.join(METHODS)})")
    return options


def _quiet(*_):
    pass


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(output: str | Path = "runs/demo", teacher: str = "resnet20", student: str = "resnet8",
        teacher_epochs: int = 30, epochs: int = 20, seeds: int = 3, methods=METHODS, print_fn=print) -> dict:
    """Train the teacher and every (method, seed) student; write and return the results."""
    output = Path(output)
    common = dict(data="digits", batch_size=64, lr=0.1, progress="none", eval_every=0, tensorboard=False)
    print_fn(f"kdfast demo: digits (1257 train / 540 val, 8×8), teacher {teacher}, student {student}; backends: "
             + ", ".join(name for name, status in kdfast.backends().items() if status.available))
    start = time.perf_counter()
    teacher_summary = train(resolve_config(student=teacher, method="ce", epochs=teacher_epochs,
                                           output=str(output / "teacher"), **common), print_fn=_quiet)
    teacher_seconds = time.perf_counter() - start
    print_fn(f"teacher {teacher}: val top-1 {teacher_summary['top1']:.2f}% ({teacher_seconds:.1f} s)")
    teacher_file = str(output / "teacher" / "model.pt")

    results = {"teacher": {"model": teacher, "top1": [teacher_summary["top1"]], "seconds": [teacher_seconds]}}
    for method in methods:
        scores, seconds = [], []
        for seed in range(seeds):
            start = time.perf_counter()
            summary = train(resolve_config(student=student, epochs=epochs, seed=seed,
                                           teacher=teacher, teacher_checkpoint=teacher_file,
                                           output=str(output / f"{method}-seed{seed}"),
                                           **common, **run_options(method)), print_fn=_quiet)
            scores.append(summary["top1"])
            seconds.append(time.perf_counter() - start)
        results[method] = {"model": student, "top1": scores, "seconds": seconds}
        mean, std = _mean_std(scores)
        print_fn(f"  {method:6s} val top-1 {mean:6.2f}% ± {std:4.2f}  ({statistics.mean(seconds):.1f} s per run)")

    settings = dict(teacher=teacher, student=student, teacher_epochs=teacher_epochs, epochs=epochs, seeds=seeds)
    write_report(output, results, settings)
    print_fn(f"table: {output / 'results.md'}, chart: {output / 'results.png'}")
    return results


def write_report(output: Path, results: dict, settings: dict) -> None:
    """``results.md`` (the table), ``results.json`` (every run) and ``results.png`` (the chart)."""
    baseline = statistics.mean(results["ce"]["top1"]) if "ce" in results else None
    lines = [f"# kdfast demo: digits, teacher {settings['teacher']}, student {settings['student']}", "",
             f"{settings['seeds']} seeds, {settings['epochs']} student epochs, {settings['teacher_epochs']} teacher "
             f"epochs; validation top-1 (540 images).", "",
             "| method | model | top-1 (mean ± std) | vs ce | time per run |", "| --- | --- | --- | --- | --- |"]
    for method, entry in results.items():
        mean, std = _mean_std(entry["top1"])
        delta = "" if baseline is None or method in ("teacher", "ce") else f"{mean - baseline:+.2f}"
        lines.append(f"| {method} | {entry['model']} | {mean:.2f} ± {std:.2f} | {delta} | "
                     f"{statistics.mean(entry['seconds']):.1f} s |")
    (output / "results.md").write_text("\n".join(lines) + "\n")
    (output / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    means = [_mean_std(results[name]["top1"])[0] for name in names]
    stds = [_mean_std(results[name]["top1"])[1] for name in names]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    colors = ["#888888" if name == "teacher" else "#4C72B0" if name == "ce" else "#DD8452" for name in names]
    axis.bar(names, means, yerr=stds, capsize=4, color=colors)
    bottom = max(0.0, min(m - s for m, s in zip(means, stds)) - 1.0)
    axis.set_ylim(bottom, 100.0)
    axis.set_ylabel("val top-1 (%)")
    axis.set_title(f"digits: {settings['student']} student, {settings['teacher']} teacher, "
                   f"{settings['seeds']} seeds (mean ± std)")
    for index, mean in enumerate(means):
        axis.text(index, bottom + 0.02 * (100.0 - bottom), f"{mean:.2f}", ha="center", va="bottom", fontsize=8,
                  color="white")
    figure.tight_layout()
    figure.savefig(output / "results.png", dpi=120)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdfast.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", default="runs/demo", help="run folder")
    parser.add_argument("--teacher", default="resnet20", help="teacher architecture (`kdfast models`)")
    parser.add_argument("--student", default="resnet8", help="student architecture")
    parser.add_argument("--teacher-epochs", type=int, default=30, help="teacher epochs")
    parser.add_argument("--epochs", type=int, default=20, help="student epochs")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="rows of the table (ce is always added: the baseline)")
    args = parser.parse_args(argv)
    if "ce" not in args.methods:
        args.methods.insert(0, "ce")  # the baseline every other row is compared with
    run(args.output, args.teacher, args.student, args.teacher_epochs, args.epochs, args.seeds, args.methods)


if __name__ == "__main__":
    main()
