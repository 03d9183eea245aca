"""The ``kdfast`` command line (also ``python -m kdfast``).

Subcommands:

* ``kdfast train [--config FILE] [options]`` — train a teacher, a baseline or a KD student;
* ``kdfast eval --student ARCH --checkpoint FILE [options]`` — top-1/top-5 on the val split;
* ``kdfast reskd demo`` / ``kdfast reskd curve --chain FILE`` — res-students' accuracy vs cost;
* ``kdfast data demo DIR`` — write the embedded digits as an ImageNet-style JPEG folder;
* ``kdfast data verify DIR`` — decode every image of a dataset, list the bad ones.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _data_demo(args) -> int:
    from kdfast.data import write_digits_folder

    counts = write_digits_folder(args.directory, size=args.size, quality=args.quality)
    print(f"wrote {counts['train']} training and {counts['val']} validation images ({args.size}×{args.size} JPEG, "
          f"10 classes) under {args.directory}/train and {args.directory}/val")
    return 0


def _data_verify(args) -> int:
    from kdfast.data import verify_dataset

    report = verify_dataset(args.directory, workers=args.workers)
    if args.output:
        with open(args.output, "w") as handle:
            handle.writelines(f"{path}\n" for path, _ in report.corrupt)
    print(*report.lines(args.output), sep="\n")
    return 0 if report.ok else 1


def _train(args) -> int:
    from kdfast.config import resolve_config
    from kdfast.train import train

    train(resolve_config(args))
    return 0


def _eval(args) -> int:
    from kdfast.config import resolve_config
    from kdfast.train import run_eval

    run_eval(resolve_config(args))
    return 0


def _reskd_demo(args) -> int:
    from kdfast.reskd import demo

    demo(args.output)
    return 0


def _reskd_curve(args) -> int:
    from kdfast.data import make_loader
    from kdfast.models import create_model, load_weights
    from kdfast.reskd import accuracy_cost_curve, load_chain, write_curve

    chain, spec = load_chain(args.chain)
    loader = make_loader(args.data, "val", batch_size=args.batch_size,
                         image_size=spec["image_size"] if args.data != "digits" else None)
    references = {}
    for name, arch, weights in (("teacher", args.teacher, args.teacher_checkpoint),
                                ("student", args.student, args.student_checkpoint)):
        if arch:
            if not weights:
                raise ValueError(f"--{name} needs --{name}-checkpoint")
            model = create_model(arch, spec["num_classes"], spec["in_channels"], spec["image_size"])
            load_weights(model, weights, what=f"{name} checkpoint")
            references[name] = model
    curve = accuracy_cost_curve(chain, loader, references=references, points=args.points)
    curve["architectures"] = spec["architectures"]
    json_path, png_path = write_curve(curve, args.output)
    print(f"wrote {json_path} and {png_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdfast", description="kdfast: fast knowledge distillation")
    commands = parser.add_subparsers(dest="command", required=True)
    from kdfast.config import add_config_arguments

    train = commands.add_parser("train", help="train a model (every option also settable in --config)")
    add_config_arguments(train, exclude=("checkpoint",))
    train.set_defaults(handler=_train)
    evaluate = commands.add_parser("eval", help="evaluate weights on the validation split")
    add_config_arguments(evaluate)
    evaluate.set_defaults(handler=_eval)

    reskd = commands.add_parser("reskd", help="res-students: demo and accuracy-vs-cost curve")
    reskd_commands = reskd.add_subparsers(dest="reskd_command", required=True)
    reskd_demo = reskd_commands.add_parser("demo", help="train a teacher, a student and a 3-stage chain on the "
                                                        "digits; write the curve")
    reskd_demo.add_argument("--output", default="runs/reskd")
    reskd_demo.set_defaults(handler=_reskd_demo)
    curve = reskd_commands.add_parser("curve", help="accuracy vs cost of gated inference (curve.json, curve.png)")
    curve.add_argument("--chain", required=True, help="chain.pt of the last ResKD stage")
    curve.add_argument("--data", default="digits", help="dataset root or 'digits' (its val split is used)")
    curve.add_argument("--teacher", default=None, help="teacher architecture (reference point)")
    curve.add_argument("--teacher-checkpoint", default=None)
    curve.add_argument("--student", default=None, help="plain student architecture (reference point)")
    curve.add_argument("--student-checkpoint", default=None)
    curve.add_argument("--batch-size", type=int, default=256)
    curve.add_argument("--points", type=int, default=25, help="gated thresholds (quantiles of the confidences)")
    curve.add_argument("--output", default="runs/reskd-curve")
    curve.set_defaults(handler=_reskd_curve)

    data = commands.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    demo = data.add_parser("demo", help="write the embedded digits as an ImageNet-style JPEG folder")
    demo.add_argument("directory", help="output folder (gets train/<digit>/*.jpg and val/<digit>/*.jpg)")
    demo.add_argument("--size", type=int, default=32, help="image side in pixels (default 32; the digits are 8×8)")
    demo.add_argument("--quality", type=int, default=95, help="JPEG quality 1-100 (default 95)")
    demo.set_defaults(handler=_data_demo)

    verify = data.add_parser("verify", help="decode every image of a dataset and list the corrupt ones")
    verify.add_argument("directory", help="dataset root (with train/ and/or val/) or one split's folder")
    verify.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    verify.add_argument("--output", default=None, help="write the unreadable paths here, one per line")
    verify.set_defaults(handler=_data_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kdfast`` console script; returns the exit status."""
    from kdfast.data import DatasetError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (DatasetError, ValueError, FloatingPointError) as error:
        print(f"kdfast: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from kdfast.train import DistributedError

        if not isinstance(error, DistributedError):
            raise
        print(f"kdfast: error: {error}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
