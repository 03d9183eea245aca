"""``kdfast reskd demo``: ResKD end to end on the digits, through the trainer.

A module of its own above :mod:`kdfast.train` (it trains with it), so that
:mod:`kdfast.reskd` — which the trainer imports for its chain stages — never imports the
trainer back.
"""

from __future__ import annotations

from pathlib import Path

from kdfast.reskd import accuracy_cost_curve, load_chain, two_fold_calibration, write_curve


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
    curve["two_fold_calibration"] = folds = two_fold_calibration(chain, val, max_accuracy_drop=0.25)
    # Every image once, gated with thresholds calibrated on the other half (equal halves).
    mean = lambda key: sum(fold[key] for fold in folds) / len(folds)  # noqa: E731
    curve["cross_validated"] = {"top1": mean("test_top1"), "full_chain_top1": mean("test_full_chain_top1"),
                                "flops_fraction": mean("test_flops_fraction")}
    json_path, png_path = write_curve(curve, output)
    teacher_flops = curve["references"]["teacher"]["flops"]
    print_fn(f"ResKD on digits: chain {' + '.join(spec['architectures'])}")
    for point in curve["chain_prefixes"]:
        print_fn(f"  {point['stages']} stage(s): top-1 {point['top1']:.2f}%, {point['flops'] / 1e3:.0f} kFLOPs "
                 f"({100 * point['flops'] / teacher_flops:.1f}% of the teacher)")
    for name, point in curve["references"].items():
        print_fn(f"  {name}: top-1 {point['top1']:.2f}%, {point['flops'] / 1e3:.0f} kFLOPs")
    for fold in folds:
        print_fn(f"  calibrated {fold['folds']} (≤ 0.25 points): top-1 {fold['test_top1']:.2f}% vs full chain "
                 f"{fold['test_full_chain_top1']:.2f}% at {100 * fold['test_flops_fraction']:.1f}% of its FLOPs")
    print_fn(f"  cross-validated: top-1 {mean('test_top1'):.2f}% vs full chain {mean('test_full_chain_top1'):.2f}% "
             f"at {100 * mean('test_flops_fraction'):.1f}% of its FLOPs")
    print_fn(f"curve: {json_path}, {png_path}")
    return curve
