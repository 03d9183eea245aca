"""The ``kdfast`` command line (also ``python -m kdfast``).

Subcommands:

* ``kdfast train [--config FILE] [options]`` — train a teacher, a baseline or a KD student;
* ``kdfast eval [RUN_DIR] [--checkpoint FILE] [options]`` — top-1/top-5 on the val split;
* ``kdfast models`` — the architectures, with their parameters;
* ``kdfast plot RUN_DIR [RUN_DIR …] --output curves.png`` — training curves from metrics.jsonl;
* ``kdfast reskd demo`` / ``kdfast reskd curve --chain FILE`` — res-students' accuracy vs cost;
* ``kdfast data demo DIR`` — write the embedded digits as an ImageNet-style JPEG folder;
* ``kdfast data verify DIR`` — decode every image of a dataset, list the bad ones;
* ``kdfast cache build|verify|info`` — the offline teacher: record each sample's augmentation
  and the teacher's top-k outputs once (:mod:`kdfast.cache`).
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["build_parser", "main"]


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
    from kdfast.config import resolve_eval_config
    from kdfast.train import run_eval

    run_eval(resolve_eval_config(args))
    return 0


def _plot(args) -> int:
    from kdfast.plot import plot_runs

    print("wrote", plot_runs(args.runs, args.output, args.labels, args.title))
    return 0


def _models(args) -> int:
    from kdfast.models import describe_models

    print(*describe_models(), sep="\n")
    return 0


def _reskd_demo(args) -> int:
    from kdfast.reskd_demo import demo

    demo(args.output, seeds=args.seeds)
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


#: The trainer's options that ``kdfast cache build`` takes too (same flags, help and checks).
_CACHE_BUILD_SHARED = ("data", "teacher", "teacher_checkpoint", "teacher_combine", "teacher_weights", "image_size",
                       "loader", "workers", "seed", "amp", "batch_size", "exclude", "threads", "device", "progress")


def _add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    from kdfast.cache.build import DEFAULT_SHARD_SAMPLES, DEFAULT_TEMPERATURES
    from kdfast.config import OPTIONS

    for name in _CACHE_BUILD_SHARED:
        option = OPTIONS[name]
        kind = {"int": int, "float": float}.get(option.item_kind, str)
        default = {"workers": 0, "batch_size": 64}.get(name, option.default)
        help_text = {"batch_size": "rows of every teacher forward (part of the cache's settings)",
                     "workers": "DataLoader decode processes per process",
                     "teacher": "teacher architecture; repeat it for several teachers (the cache records their "
                                "combination), each with its --teacher-checkpoint"}.get(name, option.help)
        shape = {}  # how the trainer's parser reads it: repeated (--teacher a --teacher b) or several values
        if option.kind.endswith("_list"):
            shape = {"nargs": "+"} if option.item_kind in ("int", "float") else {"action": "append"}
        parser.add_argument(option.flag, type=kind, default=None, choices=option.choices,
                            required=name in ("teacher", "teacher_checkpoint"),
                            help=f"{help_text} (default: {default})", **shape)
    parser.add_argument("--epochs", type=int, required=True, help="augmentation epochs to record")
    parser.add_argument("--top-k", type=int, default=10, help="teacher logits kept per sample (default 10)")
    parser.add_argument("--output", required=True, help="the cache folder (an unfinished one is resumed)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(DEFAULT_TEMPERATURES),
                        help="temperatures whose full-row log-sum-exp is stored (default: 1 4)")
    parser.add_argument("--values-dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                        help="dtype of the stored top-k logits (default float16)")
    parser.add_argument("--shard-samples", type=int, default=DEFAULT_SHARD_SAMPLES,
                        help=f"samples per shard file (default {DEFAULT_SHARD_SAMPLES})")


def _cache_build(args) -> int:
    from kdfast.cache import build_cache, cache_info
    from kdfast.config import OPTIONS

    values = {}
    for name in _CACHE_BUILD_SHARED:
        value = getattr(args, name)
        if value is not None:
            values[name] = OPTIONS[name].check(value, f" ({OPTIONS[name].flag} on the command line)")
    values.setdefault("data", OPTIONS["data"].default)
    values.setdefault("workers", 0)
    manifest = build_cache(output=args.output, epochs=args.epochs, top_k=args.top_k,
                           temperatures=args.temperatures, values_dtype=args.values_dtype,
                           shard_samples=args.shard_samples, **values)
    if manifest.get("complete"):
        print(*cache_info(args.output), sep="\n")
    return 0


def _cache_verify(args) -> int:
    from kdfast.cache import verify_cache

    report = verify_cache(args.directory)
    print(*report.lines(), sep="\n")
    return 0 if report.ok else 1


def _cache_info(args) -> int:
    from kdfast.cache import cache_info

    print(*cache_info(args.directory), sep="\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdfast", description="kdfast: fast knowledge distillation")
    commands = parser.add_subparsers(dest="command", required=True)
    from kdfast.config import EVAL_OPTIONS, add_config_arguments

    train = commands.add_parser(
        "train", help="train a teacher, a baseline or a KD student (every option also a key of --config)",
        usage="kdfast train [--config FILE] [options]",
        description="Train a model: a teacher or baseline (--method ce) or a student with a KD method. Every option "
                    "is also a key of a YAML/JSON --config file (flags win); the resolved configuration is saved in "
                    "the run folder as config.yaml.",
        epilog="example: kdfast train --student resnet8 --method kd --teacher resnet20 --teacher-checkpoint "
               "runs/teacher/model.pt --epochs 20 --output runs/kd")
    add_config_arguments(train, exclude=("checkpoint",))
    train.set_defaults(handler=_train)
    evaluate = commands.add_parser(
        "eval", help="top-1/top-5 of a run's (or a file's) weights on the validation split",
        usage="kdfast eval [RUN_DIR] [--checkpoint FILE] [options]",
        description="Evaluate weights on the validation split. Given a run folder, its config.yaml supplies the "
                    "student, data, image size and the other evaluation settings and its model.pt the weights; "
                    "flags given here win. Without one, --checkpoint is required (and a config.yaml beside it is "
                    "read the same way).",
        epilog="examples: kdfast eval runs/kd | kdfast eval --student resnet18 --checkpoint resnet18.pth "
               "--data /data/imagenet")
    evaluate.add_argument("run", nargs="?", metavar="RUN_DIR", help="a kdfast train run folder (its config.yaml and "
                                                                    "model.pt)")
    add_config_arguments(evaluate, only=EVAL_OPTIONS,
                         config_help="YAML or JSON file of options (a run's config.yaml; flags win)")
    evaluate.set_defaults(handler=_eval)

    models = commands.add_parser("models", help="list the model architectures with their sizes")
    models.set_defaults(handler=_models)

    plot = commands.add_parser("plot", help="draw runs' training curves from their metrics.jsonl",
                               description="Loss terms, learning rate, images/s and validation top-1 of one or more "
                                           "runs, overlaid and labelled, into one image.")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="kdfast train run folders")
    plot.add_argument("--output", default="curves.png", help="image to write (default: curves.png)")
    plot.add_argument("--labels", nargs="+", default=None, help="one label per run (default: the folder names)")
    plot.add_argument("--title", default=None, help="figure title")
    plot.set_defaults(handler=_plot)

    reskd = commands.add_parser("reskd", help="res-students: demo and accuracy-vs-cost curve")
    reskd_commands = reskd.add_subparsers(dest="reskd_command", required=True)
    reskd_demo = reskd_commands.add_parser("demo", help="train a teacher, then per seed a 3-stage chain and plain "
                                                        "students of one stage's and of the chain's cost; write "
                                                        "the results and the curve")
    reskd_demo.add_argument("--output", default="runs/reskd", help="run folder (default: runs/reskd)")
    reskd_demo.add_argument("--seeds", type=int, default=3, help="seeds (default: 3)")
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

    cache = commands.add_parser("cache", help="offline teacher: record augmentations and top-k teacher outputs")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    build = cache_commands.add_parser("build", help="run the teacher over E augmentation epochs and store its top-k "
                                                    "outputs with each crop (one process or many under torchrun)")
    _add_cache_arguments(build)
    build.set_defaults(handler=_cache_build)
    cache_verify = cache_commands.add_parser("verify", help="check a cache's completeness and checksums (exit 1 "
                                                            "naming each missing or damaged shard)")
    cache_verify.add_argument("directory")
    cache_verify.set_defaults(handler=_cache_verify)
    info = cache_commands.add_parser("info", help="print a cache's manifest and its bytes per sample per epoch")
    info.add_argument("directory")
    info.set_defaults(handler=_cache_info)
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
