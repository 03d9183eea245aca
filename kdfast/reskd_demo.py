"""``kdfast reskd demo`` (``make reskd``): ResKD end to end on the digits, through the trainer.

A ResNet-20 teacher (30 epochs); then, for each seed, a chain of three ResNet-8/w4 stages
(the base trained 4 epochs, each res-student 10: 24 epochs in all) against two plain
students trained with KD as long: the base's own architecture (one stage's cost) and
ResNet-20/w4, the zoo model whose FLOPs are closest to the whole chain's (the same total
cost). Each chain is also gated: thresholds calibrated (within 0.25 points of the full
chain) on one half of the validation images and applied to the other, and the reverse.
Seed 0's accuracy-vs-cost curve is drawn. Written to the output folder: ``results.json``
(every run, FLOPs, provenance), ``curve.json`` and ``curve.png`` (seed 0). Runs are
deterministic: the same numbers on every rerun on the same machine and thread count.

A module of its own above :mod:`kdfast.train` (it trains with it), so that
:mod:`kdfast.reskd` — which the trainer imports for its chain stages — never imports the
trainer back.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from kdfast.provenance import device_name, source_commit
from kdfast.reskd import (accuracy_cost_curve, collect, count_flops, load_chain, stage_flops, two_fold_calibration,
                          write_curve)

__all__ = ["BASE", "SAME_COST", "STAGE_EPOCHS", "demo", "summary_table"]

#: Every stage's architecture (the base and each res-student).
BASE = "resnet8_w4"
#: The plain student whose FLOPs per image are closest to the whole chain's (3 × 99 k vs 320 k).
SAME_COST = "resnet20_w4"
#: Epochs of the base and of each res-student; the plain students train their sum.
STAGE_EPOCHS = (4, 10, 10)
#: The calibration's accuracy budget, in points below the full chain.
BUDGET = 0.25


def demo(output="runs/reskd", seeds: int = 3, print_fn=print) -> dict:
    """Train the teacher, and per seed the chain and the two plain students; calibrate,
    draw seed 0's curve, write ``results.json`` and return it."""
    from kdfast.config import resolve_config
    from kdfast.data import make_loader
    from kdfast.models import create_model, load_weights
    from kdfast.train import train

    begin = time.perf_counter()
    output = Path(output)
    common = dict(progress="none", eval_every=0, deterministic=True)
    quiet = lambda *_: None  # noqa: E731
    teacher_file = output / "teacher" / "model.pt"
    teacher_summary = train(resolve_config(student="resnet20", epochs=30, output=str(teacher_file.parent), **common),
                            print_fn=quiet)
    print_fn(f"ResKD on digits: teacher resnet20 {teacher_summary['top1']:.2f}%; per seed a chain of "
             f"{len(STAGE_EPOCHS)} × {BASE} (epochs {'+'.join(map(str, STAGE_EPOCHS))}) vs plain {BASE} and "
             f"{SAME_COST} (the chain's cost), {sum(STAGE_EPOCHS)} epochs each, {seeds} seed(s)")
    distill = dict(teacher="resnet20", teacher_checkpoint=str(teacher_file), method="kd", **common)
    val = make_loader("digits", "val", batch_size=540)
    teacher = create_model("resnet20", 10, 1, 8)
    load_weights(teacher, teacher_file)
    runs = []
    for seed in range(seeds):
        plain = {}
        for name in (BASE, SAME_COST):
            folder = output / f"seed{seed}-{name}"
            plain[name] = train(resolve_config(student=name, epochs=sum(STAGE_EPOCHS), seed=seed, output=str(folder),
                                               **distill), print_fn=quiet)["top1"]
        chain_file = None
        for stage, epochs in enumerate(STAGE_EPOCHS):
            folder = output / f"seed{seed}-stage{stage}"
            train(resolve_config(student=BASE, epochs=epochs, seed=seed, reskd_chain=chain_file, output=str(folder),
                                 **{**distill, "method": "reskd"}), print_fn=quiet)
            chain_file = str(folder / "chain.pt")
        chain, spec = load_chain(chain_file)
        _, correct = collect(chain, val)
        prefixes = [100 * stage.double().mean().item() for stage in correct]
        folds = two_fold_calibration(chain, val, max_accuracy_drop=BUDGET)
        gated = {"top1": statistics.mean(f["test_top1"] for f in folds),
                 "full_chain_top1": statistics.mean(f["test_full_chain_top1"] for f in folds),
                 "flops_fraction": statistics.mean(f["test_flops_fraction"] for f in folds)}
        runs.append({"seed": seed, "chain_prefixes_top1": prefixes, "plain_top1": plain, "cross_validated": gated,
                     "folds": folds})
        print_fn(f"  seed {seed}: chain {' → '.join(f'{p:.2f}' for p in prefixes)}%, gated {gated['top1']:.2f}% at "
                 f"{100 * gated['flops_fraction']:.1f}% of its FLOPs; plain {BASE} {plain[BASE]:.2f}%, "
                 f"{SAME_COST} {plain[SAME_COST]:.2f}%")
        if seed == 0:
            references = {"teacher": teacher}
            for name in (BASE, SAME_COST):
                model = create_model(name, 10, 1, 8)
                load_weights(model, output / f"seed0-{name}" / "model.pt")
                references[f"plain {name}"] = model
            curve = accuracy_cost_curve(chain, val, references=references)
            curve["architectures"] = spec["architectures"]
            curve["two_fold_calibration"], curve["cross_validated"] = folds, gated
            json_path, png_path = write_curve(curve, output)

    shape = val.image_shape
    flops = {"teacher": count_flops(teacher, shape), "stage": stage_flops(chain, shape),
             BASE: count_flops(create_model(BASE, 10, 1, 8), shape),
             SAME_COST: count_flops(create_model(SAME_COST, 10, 1, 8), shape)}
    results = {"settings": {"base": BASE, "same_cost": SAME_COST, "stage_epochs": list(STAGE_EPOCHS), "seeds": seeds,
                            "budget": BUDGET, "device": device_name("cpu"), "torch": torch.__version__,
                            "commit": source_commit(), "date": datetime.date.today().isoformat(),
                            "seconds": round(time.perf_counter() - begin, 1)},
               "teacher_top1": teacher_summary["top1"], "flops": flops, "runs": runs}
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_fn(summary_table(results))
    print_fn(f"results: {output / 'results.json'}; curve (seed 0): {json_path}, {png_path}")
    return results


def _mean_std(values) -> str:
    values = list(values)
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def summary_table(results: dict) -> str:
    """The Markdown table of a demo's ``results.json``: top-1 over seeds and FLOPs per model,
    and the chain's paired differences to the plain students and to its gated self."""
    settings, runs, flops = results["settings"], results["runs"], results["flops"]
    base, same = settings["base"], settings["same_cost"]
    chain_flops = sum(flops["stage"])
    lines = ["| model | val top-1 (mean ± std over seeds) | kFLOPs per image | share of the full chain's |",
             "| --- | ---: | ---: | ---: |",
             f"| teacher resnet20 (one run) | {results['teacher_top1']:.2f} | {flops['teacher'] / 1e3:.0f} | "
             f"{flops['teacher'] / chain_flops:.1f}× |"]
    for stages in range(1, len(flops["stage"]) + 1):
        cost = sum(flops["stage"][:stages])
        lines.append(f"| chain, {stages} stage(s) of {base} | {_mean_std(r['chain_prefixes_top1'][stages - 1] for r in runs)}"
                     f" | {cost / 1e3:.0f} | {100 * cost / chain_flops:.0f} % |")
    gated_share = statistics.mean(r["cross_validated"]["flops_fraction"] for r in runs)
    lines.append(f"| **chain, gated** (calibrated on the other half) | {_mean_std(r['cross_validated']['top1'] for r in runs)}"
                 f" | {gated_share * chain_flops / 1e3:.0f} | {100 * gated_share:.1f} % |")
    for name in (base, same):
        lines.append(f"| plain {name}, {sum(settings['stage_epochs'])} epochs | "
                     f"{_mean_std(r['plain_top1'][name] for r in runs)} | {flops[name] / 1e3:.0f} | "
                     f"{100 * flops[name] / chain_flops:.0f} % |")
    full = [r["chain_prefixes_top1"][-1] for r in runs]
    lines += ["", "Paired differences (same seed), mean ± std: full chain − plain "
              f"{base} {_mean_std(c - r['plain_top1'][base] for c, r in zip(full, runs))} points; full chain − plain "
              f"{same} (the same cost) {_mean_std(c - r['plain_top1'][same] for c, r in zip(full, runs))} points; "
              f"gated − full chain {_mean_std(r['cross_validated']['top1'] - r['cross_validated']['full_chain_top1'] for r in runs)}"
              f" points (budget {settings['budget']}). {settings['seeds']} seeds; one validation image is 0.19 points. "
              f"Whole demo {settings['seconds'] / 60:.1f} min on {settings['device']}, idle; commit "
              f"{settings['commit']}, {settings['date']}."]
    return "\n".join(lines)
