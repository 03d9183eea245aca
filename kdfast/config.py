"""The training configuration: one dataclass, settable from a YAML/JSON file and the command line.

Precedence: the defaults below < the config file (``--config``; on ``--resume`` without
``--config``, the run folder's saved ``config.yaml``) < options given on the command line.
The resolved configuration is saved into the run folder as ``config.yaml``.

Every option has one specification (:data:`OPTIONS`, built from the fields of
:class:`TrainConfig`): its type, its choices or its range. The same specification types
the command-line flags and checks every value from any source (flags, a YAML/JSON file,
the run folder's ``config.yaml`` on ``--resume``, keyword arguments of
:func:`resolve_config`, a :class:`TrainConfig` given to :func:`kdfast.train.train`): a
value of the wrong type (``lr: "0.1"``, ``nesterov: "no"``, ``checkpoint_every: 0.5``),
outside its choices (``optimizer: lbfgs``) or out of range (``momentum: 5``,
``threads: 0``) is a ValueError naming the option, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kdfast._checks import MAX_TEMPERATURE

__all__ = ["TrainConfig", "Option", "OPTIONS", "METHODS", "TEACHER_METHODS", "CACHE_METHODS", "DEFAULT_TEMPERATURE",
           "GROUPS", "EVAL_OPTIONS", "RESUME_MAY_CHANGE", "add_config_arguments", "check_option", "read_config_file",
           "resolve_config", "resolve_eval_config", "validate", "resume_changes", "describe_changes", "save_config"]

METHODS = ("ce", "kd", "dist", "cmkd", "dkd", "drkd", "pesf", "reskd")
TEACHER_METHODS = ("kd", "dist", "cmkd", "dkd", "pesf", "reskd")  # drkd's teacher is the student's own past logits
#: The methods that can take their teacher's logits from a cache (--teacher-cache); pesf trains an
#: adapter on the teacher's features, which a cache does not hold.
CACHE_METHODS = ("kd", "dist", "cmkd", "dkd", "reskd")
#: The temperature each method uses when --temperature is not given (the papers' defaults;
#: DIST uses τ = 1 on ImageNet).
DEFAULT_TEMPERATURE = {"ce": 1.0, "kd": 4.0, "dist": 1.0, "cmkd": 4.0, "dkd": 4.0, "drkd": 4.0, "pesf": 4.0,
                       "reskd": 4.0}
#: The default of --dist-timeout in seconds: how long a collective (DDP's gradient all-reduce,
#: the metrics' reduction …) waits for the other processes before the run fails.
DEFAULT_DIST_TIMEOUT = 600.0

#: The options that may differ between a run and its ``--resume``: they change how long it
#: runs, what it logs and how it executes, not what it computes. Any other change is refused
#: (see :func:`resume_changes`). ``exclude`` may change except for DR-KD, whose per-sample
#: bank is indexed by the positions of the file list; ``data`` (the path) may change when the
#: dataset at the new path has the checkpoint's classes and number of training images.
RESUME_MAY_CHANGE = ("epochs", "log_every", "eval_every", "progress", "tensorboard", "checkpoint_every",
                     "keep_checkpoints", "workers", "threads", "device", "backend", "compile", "channels_last",
                     "deterministic", "loader", "data", "exclude", "dist_timeout", "allow_restart")
#: Not part of a run's identity at all (the folder itself, the request to resume, eval's weights).
_NOT_COMPARED = ("output", "resume", "checkpoint")


def _option(default, help: str, *, choices=None, low=None, high=None, low_open=False, high_open=False,
            kind=None):
    """A field of :class:`TrainConfig` with its specification (see :class:`Option`)."""
    metadata = {"help": help, "choices": choices, "low": low, "high": high, "low_open": low_open,
                "high_open": high_open, "kind": kind}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything ``kdfast train`` / ``kdfast eval`` take (see ``kdfast train --help``)."""

    # data
    data: str = _option("digits", "dataset root (root/train/<class>/*.jpg, root/val/...) or 'digits' (embedded)",
                        kind="path")
    loader: str = _option("auto", "input pipeline for folders", choices=("auto", "dali", "torch"))
    image_size: int | None = _option(None, "training/eval crop size (default: 224; digits: 8)", low=1)
    workers: int | None = _option(None, "DALI threads or DataLoader workers per process (default: cores, at most 8)",
                                  low=0)
    exclude: str | None = _option(None, "a file listing images to leave out, one path per line (what `kdfast data "
                                        "verify --output` writes)", kind="path")
    train_file_list: str | None = _option(None, "read the training split from this list instead of DATA/train: one "
                                                "'relative/path.jpg <class index>' per line, paths relative to the "
                                                "list's folder, indices into DATA/train's sorted class folders",
                                          kind="path")
    train_per_class: int | None = _option(None, "train on only N images of each class (a fixed choice, the same "
                                                "for every --seed; all of a smaller class): few-label distillation, "
                                                "with a teacher that saw every image", low=1)
    val_file_list: str | None = _option(None, "read the validation split from this list instead of DATA/val (e.g. "
                                              "ImageNet's flat val folder: 'val/ILSVRC2012_val_00000001.JPEG 65' …)",
                                        kind="path")
    # models
    student: str = _option("resnet8", "student architecture")
    teacher: list[str] | None = _option(None, "teacher architecture (kd, dist, cmkd, dkd, pesf, reskd; ignored by "
                                              "ce, drkd; with --teacher-cache optional, checked against the "
                                              "cache's); repeat it for several teachers, each with its "
                                              "--teacher-checkpoint", kind="str_list")
    teacher_checkpoint: list[str] | None = _option(None, "teacher weights: a kdfast model.pt/checkpoint, a "
                                                         "torchvision/CRD/mdistiller file; one per --teacher, in "
                                                         "the same order", kind="path_list")
    teacher_combine: str | None = _option(None, "several teachers: 'logits' (the weighted mean of their logits; "
                                                "the default) or 'probabilities' (the weighted mean of their "
                                                "softmax at τ, as logits τ·log q)",
                                          choices=("logits", "probabilities"))
    teacher_weights: list[float] | None = _option(None, "several teachers: one weight each, normalized to sum 1 "
                                                        "(default: uniform)", low=0, kind="float_list")
    teacher_cache: str | None = _option(None, "an offline teacher (`kdfast cache build`): replay its recorded crops "
                                              "and take the teacher's logits from it instead of running a teacher "
                                              "(kd, dist, cmkd, reskd; not with --teacher-checkpoint)", kind="path")
    init_checkpoint: str | None = _option(None, "initial student weights: a kdfast model.pt/checkpoint or a state "
                                                "dict (default: fresh initialization)", kind="path")
    sync_bn: bool = _option(False, "convert the student's BatchNorm to SyncBatchNorm under DDP (GPUs only)")
    # method and loss
    method: str = _option("ce", "training method", choices=METHODS)
    temperature: float | None = _option(None, "τ (default per method: kd/cmkd/dkd/drkd/pesf/reskd 4, dist 1)", low=0,
                                        low_open=True, high=MAX_TEMPERATURE)
    ce_weight: float = _option(1.0, "weight of the cross-entropy term", low=0)
    kd_weight: float = _option(1.0, "weight of the distillation term", low=0)
    dist_beta: float = _option(1.0, "DIST inter-class (row) weight β", low=0)
    dist_gamma: float = _option(1.0, "DIST intra-class (column) weight γ", low=0)
    cmkd_kl_weight: float = _option(1.0, "CMKD weight of its KL term", low=0)
    cmkd_corr_weight: float = _option(1.0, "CMKD weight of its correlation terms", low=0)
    cmkd_weighting: str = _option("entropy", "CMKD per-sample difficulty", choices=("entropy", "fixed"))
    dkd_alpha: float = _option(1.0, "DKD weight α of TCKD (target vs non-target)", low=0)
    dkd_beta: float = _option(8.0, "DKD weight β of NCKD (the non-target classes; the authors: 8 on CIFAR-100, "
                                   "0.5 on ImageNet)", low=0)
    dkd_warmup_epochs: float = _option(20.0, "DKD: the term ramps linearly from 0 over these epochs (the authors' "
                                             "CIFAR-100 setting; 0: none)", low=0)
    logit_standardization: bool = _option(False, "z-score each row of student and teacher logits before the "
                                                 "temperature (Sun et al., CVPR 2024; kd, dist, cmkd, dkd, drkd, "
                                                 "reskd)")
    spearman_strength: float | None = _option(None, "ε of the soft ranks (default 2/C)", low=0, low_open=True)
    adapter_hidden: int | None = _option(None, "PESF adapter hidden width (default: the teacher's feature size)",
                                         low=1)
    adapter_lr: float | None = _option(None, "PESF adapter learning rate (default: --lr)", low=0, low_open=True)
    rectify: bool = _option(False, "PESF: rectify the adapted teacher logits (DR-KD) for the student")
    reskd_chain: str | None = _option(None, "ResKD: the chain trained so far (chain.pt of the previous stage's run); "
                                            "--student is the new res-student (without it: the base)", kind="path")
    # optimization
    optimizer: str = _option("sgd", "optimizer", choices=("sgd", "adamw"))
    lr: float = _option(0.1, "peak learning rate", low=0, low_open=True)
    momentum: float = _option(0.9, "SGD momentum", low=0, high=1, high_open=True)
    nesterov: bool = _option(False, "SGD Nesterov momentum")
    weight_decay: float = _option(5e-4, "weight decay (not applied to BatchNorm and bias parameters)", low=0)
    schedule: str = _option("cosine", "learning-rate schedule (per step)", choices=("cosine", "step", "constant"))
    warmup_epochs: float = _option(0.0, "linear warm-up from 0, in epochs", low=0)
    milestones: list[int] = _option([], "step schedule: epochs at which the lr is multiplied by --lr-decay", low=1)
    lr_decay: float = _option(0.1, "step schedule factor", low=0, low_open=True)
    epochs: int = _option(30, "training epochs", low=1)
    batch_size: int = _option(64, "images per process and step (the global batch is this × world size)", low=1)
    # execution
    device: str = _option("auto", "cpu, cuda or auto (cuda:LOCAL_RANK when a GPU is present)",
                          choices=("auto", "cpu", "cuda"))
    amp: str = _option("none", "autocast precision", choices=("none", "bf16", "fp16"))
    channels_last: bool = _option(False, "NHWC memory format for images and models")
    compile: bool = _option(False, "torch.compile the student (and teacher)")
    backend: str = _option("auto", "kdfast loss backend", choices=("auto", "cpu", "cuda", "triton", "torch"))
    seed: int = _option(0, "seed of initialization, data order and augmentation", low=0, high=2**32 - 1)
    deterministic: bool = _option(False, "deterministic algorithms (bitwise-reproducible runs and resumes)")
    threads: int | None = _option(None, "CPU threads of this process (default: PyTorch's)", low=1)
    dist_timeout: float = _option(DEFAULT_DIST_TIMEOUT, "seconds a collective (DDP's gradient all-reduce, the "
                                                        "metrics' reduction …) waits for the other processes before "
                                                        "the run fails with an error naming it", low=0, low_open=True)
    # output
    output: str = _option("runs/train", "run folder (config, metrics, checkpoints, model)", kind="path")
    resume: bool = _option(False, "continue from the run folder's newest usable checkpoint")
    allow_restart: bool = _option(False, "with --resume: when the run folder has checkpoints but none is usable, set "
                                         "them aside (renamed *.unusable) and start from the beginning instead of "
                                         "stopping with an error")
    checkpoint_every: int = _option(0, "also checkpoint every N steps (0: only at epoch ends)", low=0)
    keep_checkpoints: int = _option(2, "checkpoints kept (older ones are deleted)", low=1)
    log_every: int = _option(20, "steps between metrics.jsonl records", low=1)
    eval_every: int = _option(1, "epochs between evaluations (0: only at the end)", low=0)
    progress: str = _option("auto", "progress bar on stderr", choices=("auto", "bar", "lines", "none"))
    tensorboard: bool = _option(False, "also write TensorBoard events (needs `pip install tensorboard`; "
                                       "`kdfast plot RUN` draws metrics.jsonl without it)")
    # eval
    checkpoint: str | None = _option(None, "kdfast eval: weights of --student to evaluate (a model.pt, a kdfast "
                                           "checkpoint or a state dict)", kind="path")

    def __post_init__(self):
        # A list option given one string (``teacher="resnet20"``) holds a list of it even in a
        # TrainConfig built without validate(), as validate() would make it.
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.metadata.get("kind") in ("str_list", "path_list") and isinstance(value, (str, os.PathLike)):
                setattr(self, item.name, [os.fspath(value)])

    def resolved_temperature(self) -> float:
        return DEFAULT_TEMPERATURE[self.method] if self.temperature is None else self.temperature

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- the option table

def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


#: The option groups of ``kdfast train --help`` and the README's table: each starts at the
#: named field of :class:`TrainConfig` and runs until the next.
GROUPS = (("data", "data"), ("models", "student"), ("method and loss", "method"), ("optimization", "optimizer"),
          ("execution", "device"), ("output", "output"), ("evaluation", "checkpoint"))
#: The options ``kdfast eval`` reads (the rest of a run's configuration does not change
#: what its weights score).
EVAL_OPTIONS = ("data", "loader", "image_size", "workers", "exclude", "val_file_list", "student", "checkpoint",
                "batch_size", "device", "amp", "channels_last", "threads", "deterministic", "dist_timeout")


@dataclass(frozen=True)
class Option:
    """The specification of one option: its type, whether it may be null, its choices or range."""

    name: str
    #: "bool", "int", "float", "str", "path" (a str or os.PathLike), or a list of one of the last
    #: four: "int_list", "float_list", "str_list", "path_list" (a list option given a single
    #: string holds a list of it: a config file written when the option took one value).
    kind: str
    nullable: bool
    default: object
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    group: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def item_kind(self) -> str:
        """The kind of one value: the option's kind, or its items' for a list."""
        return self.kind.removesuffix("_list")

    def allowed(self) -> str:
        """What the option accepts, in words ("a positive integer", "one of 'sgd', 'adamw'" …)."""
        if self.kind == "bool":
            text = "true or false"
        elif self.choices is not None:
            text = "one of " + ", ".join(repr(choice) for choice in self.choices)
        elif self.item_kind in ("int", "float"):
            integer = self.item_kind == "int"
            noun = "integer" if integer else "number"
            if self.low == 0 and self.low_open and self.high is None:
                text = f"a positive {noun}"
            elif integer and self.low == 1 and self.high is None:
                text = "a positive integer"
            elif self.low is not None and self.high is not None:
                text = (f"a{'n' if integer else ''} {noun} in {'(' if self.low_open else '['}{_number(self.low)}, "
                        f"{_number(self.high)}{')' if self.high_open else ']'}")
            elif self.low is not None:
                text = f"a{'n' if integer else ''} {noun} {'>' if self.low_open else '>='} {_number(self.low)}"
            else:
                text = f"a{'n' if integer else ''} {noun}"
            if self.kind.endswith("_list"):
                text = "a list of " + text.removeprefix("a ").removeprefix("an ").replace(noun, noun + "s", 1)
        else:
            text = "a path" if self.item_kind == "path" else "a string"
            if self.kind.endswith("_list"):
                text = "a non-empty list of " + text.removeprefix("a ") + "s"
        return text + (" or null (the default)" if self.nullable else "")

    def _fail(self, value, where: str, hint: str = ""):
        raise ValueError(f"{self.name} must be {self.allowed()}, got {value!r}{hint}{where}")

    def check(self, value, where: str = ""):
        """``value`` as this option holds it (ints as floats for a float option, a tuple as a
        list, a path as str); ValueError naming the option, the value and what is allowed.
        ``where`` is appended to the message (e.g. " (in config file run.yaml)")."""
        if value is None:
            if self.nullable:
                return None
            self._fail(value, where)
        if isinstance(value, str) and self.item_kind in ("bool", "int", "float"):
            hint = " (a string: write it without quotes)"
            if self.kind == "float" and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", value.strip()):
                hint = f" (a string: YAML reads a number like {value} as text; write it with a decimal point, " \
                       f"e.g. {float(value):.1e})"
            self._fail(value, where, hint)
        if self.kind == "bool":
            if not isinstance(value, bool):
                self._fail(value, where)
            return value
        if self.kind.endswith("_list"):
            if self.item_kind in ("str", "path") and isinstance(value, (str, os.PathLike)):
                value = [value]
            if not isinstance(value, (list, tuple)):
                self._fail(value, where)
            if self.item_kind in ("int", "float"):
                return [self._check_number(item, where, whole=value) for item in value]
            if not value:
                self._fail(value, where, " (an empty list)")
            return [self._check_text(item, where, whole=value) for item in value]
        if self.kind in ("int", "float"):
            return self._check_number(value, where)
        return self._check_text(value, where)

    def _check_text(self, value, where: str, whole=None):
        shown = value if whole is None else whole
        if self.item_kind == "path" and isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value:
            self._fail(shown, where, " (an empty string)" if value == "" else "")
        if self.choices is not None and value not in self.choices:
            self._fail(shown, where)
        return value

    def _check_number(self, value, where: str, whole=None):
        shown = value if whole is None else whole
        integer = self.item_kind == "int"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(shown, where)
        if integer and not isinstance(value, int):
            self._fail(shown, where, " (not an integer)")
        if not integer:
            value = float(value)
            if not math.isfinite(value):
                self._fail(shown, where)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            self._fail(shown, where)
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            self._fail(shown, where)
        return value


def _build_options() -> dict[str, Option]:
    options = {}
    starts = {first: name for name, first in GROUPS}
    group = ""
    for item in dataclasses.fields(TrainConfig):
        group = starts.get(item.name, group)
        text, meta = str(item.type), item.metadata
        if meta.get("kind"):
            kind = meta["kind"]
        elif text.startswith("list[int]"):
            kind = "int_list"
        elif "bool" in text:
            kind = "bool"
        elif "int" in text:
            kind = "int"
        elif "float" in text:
            kind = "float"
        else:
            kind = "str"
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        options[item.name] = Option(item.name, kind, "None" in text, default, meta["help"], meta.get("choices"),
                                    meta.get("low"), meta.get("high"), meta.get("low_open", False),
                                    meta.get("high_open", False), group)
    return options


#: The specification of every option of :class:`TrainConfig`, by name.
OPTIONS: dict[str, Option] = _build_options()


def check_option(name: str, value, where: str = ""):
    """``value`` checked against option ``name``'s specification (see :meth:`Option.check`)."""
    if name not in OPTIONS:
        raise ValueError(f"unknown option {name!r}{where}; known: {sorted(OPTIONS)}")
    return OPTIONS[name].check(value, where)


def help_text(option: Option) -> str:
    """The option's help with its default said once: as its help says it, else appended
    (nothing for an unset default the help explains, on/off for a switch)."""
    text = option.help
    if "default" in text.lower() or option.default is None:
        return text
    if option.kind == "bool":
        return f"{text} (default: {'on' if option.default else 'off'})"
    if isinstance(option.default, list):
        return f"{text} (default: {' '.join(map(str, option.default)) or 'none'})"
    return f"{text} (default: {_number(option.default)})"


def add_config_arguments(parser: argparse.ArgumentParser, *, exclude: tuple[str, ...] = (),
                         only: tuple[str, ...] | None = None, config_help: str | None = None) -> None:
    """One ``--option`` per field of :class:`TrainConfig` (default ``None`` = not given), typed by
    :data:`OPTIONS`, in the argument groups of :data:`GROUPS`; ``only``: just these options."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=config_help or "YAML or JSON file of options (keys as the flags below, with _)")
    groups = {}
    for option in OPTIONS.values():
        if option.name in exclude or (only is not None and option.name not in only):
            continue
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        _add_option(groups[option.group], option)


_METAVARS = {"int": "N", "float": "X", "str": "NAME", "path": "PATH"}


def _add_option(parser, option: Option) -> None:
    text = help_text(option)
    if option.name == "student":
        from kdfast.models import model_names

        text += " — one of " + ", ".join(model_names()) + " (`kdfast models` lists them with their sizes)"
    if option.kind == "bool":
        parser.add_argument(option.flag, action=argparse.BooleanOptionalAction, default=None, help=text)
    elif option.item_kind in ("int", "float") and option.kind.endswith("_list"):
        parser.add_argument(option.flag, nargs="+", type={"int": int, "float": float}[option.item_kind],
                            default=None, help=text, metavar=_METAVARS[option.item_kind])
    elif option.kind.endswith("_list"):  # repeated: --teacher a --teacher b
        parser.add_argument(option.flag, action="append", default=None, choices=option.choices, help=text,
                            metavar=_METAVARS[option.item_kind])
    else:
        kind = {"int": int, "float": float}.get(option.kind, str)
        parser.add_argument(option.flag, type=kind, default=None, choices=option.choices, help=text,
                            metavar=None if option.choices else _METAVARS[option.kind])


def read_config_file(path: str | os.PathLike, *, what: str = "config file") -> dict:
    """Options from a YAML (``.yaml``/``.yml``) or JSON file, each checked against :data:`OPTIONS`;
    unknown keys and bad values are a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as error:  # yaml.YAMLError, json.JSONDecodeError
        raise ValueError(f"{what} {path} cannot be parsed: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path} must hold a mapping of options, got {type(values).__name__}")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{what} {path} has unknown option(s) {unknown}; known: {sorted(OPTIONS)}")
    return {key: check_option(key, value, f" (in {what} {path})") for key, value in values.items()}


def resolve_config(args: argparse.Namespace | None = None, **overrides) -> TrainConfig:
    """Defaults < config file < command-line options (< keyword overrides); every value checked."""
    given = {}
    if args is not None:
        for key, value in vars(args).items():
            if value is not None and key in OPTIONS:
                given[key] = check_option(key, value, f" ({OPTIONS[key].flag} on the command line)")
    for key, value in overrides.items():
        given[key] = check_option(key, value)
    config_path = None if args is None else getattr(args, "config", None)
    values: dict = {}
    what = "config file"
    if config_path is None and given.get("resume"):
        saved = Path(given.get("output", TrainConfig.output)) / "config.yaml"
        if saved.is_file():
            config_path, what = saved, "the run folder's config file"
    if config_path is not None:
        values.update(read_config_file(config_path, what=what))
    values.update(given)
    config = TrainConfig(**values)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Check every option against :data:`OPTIONS` and the rules between options; ValueError naming the first bad one."""
    for name, option in OPTIONS.items():
        setattr(config, name, option.check(getattr(config, name)))
    if config.teacher_cache is not None:
        if config.method == "pesf":
            raise ValueError("method 'pesf' cannot train from --teacher-cache: its adapter trains on the teacher's "
                             "pooled features, which a cache does not hold (run the teacher: --teacher-checkpoint)")
        if config.method not in CACHE_METHODS:
            reason = (" (DR-KD's teacher is the student's own logits of the previous epoch)"
                      if config.method == "drkd" else " (it uses no teacher)")
            raise ValueError(f"teacher_cache is only read by the methods {', '.join(CACHE_METHODS)}, got method "
                             f"{config.method!r}{reason}")
        if config.teacher_checkpoint is not None:
            raise ValueError("teacher_cache and teacher_checkpoint exclude each other: with a cache no teacher is "
                             "built or run (its logits come from the cache); drop --teacher-checkpoint, or "
                             "--teacher-cache to run the teacher")
    elif config.method in TEACHER_METHODS and not config.teacher:
        raise ValueError(f"method {config.method!r} needs a teacher: pass --teacher ARCH --teacher-checkpoint FILE "
                         f"(or --teacher-cache DIR, built by `kdfast cache build`)")
    elif config.method in TEACHER_METHODS and not config.teacher_checkpoint:
        raise ValueError(f"method {config.method!r} needs teacher_checkpoint: the teacher's weights (a frozen "
                         f"random teacher teaches nothing)")
    elif config.method in TEACHER_METHODS and len(config.teacher_checkpoint) != len(config.teacher):
        raise ValueError(f"teacher_checkpoint must give one file per teacher, in the order of --teacher: "
                         f"{len(config.teacher)} teacher(s) {config.teacher}, {len(config.teacher_checkpoint)} "
                         f"checkpoint(s) {config.teacher_checkpoint}")
    if config.teacher_cache is not None and (config.teacher_combine is not None or config.teacher_weights is not None):
        raise ValueError("teacher_combine and teacher_weights are recorded in a teacher cache (the teachers were "
                         "combined when it was built, see `kdfast cache info`): drop them with --teacher-cache")
    if config.method in TEACHER_METHODS and config.teacher_cache is None:
        check_teacher_weights(len(config.teacher), config.teacher_weights)
    elif config.method not in TEACHER_METHODS and (config.teacher_combine is not None
                                                   or config.teacher_weights is not None):
        raise ValueError(f"teacher_combine and teacher_weights are read by the methods with a teacher "
                         f"({', '.join(TEACHER_METHODS)}), got method {config.method!r}")
    for name in ("train_file_list", "val_file_list"):
        if getattr(config, name) is not None and config.data == "digits":
            raise ValueError(f"{name} lists image files of a dataset folder; data='digits' is held in memory")
    for name in ("train_file_list", "train_per_class"):
        if getattr(config, name) is not None and config.teacher_cache is not None:
            raise ValueError(f"{name} and teacher_cache exclude each other: a cache records every sample of "
                             f"DATA/train (build one from a dataset folder)")
    if config.logit_standardization and config.method not in ("kd", "dist", "cmkd", "dkd", "drkd", "reskd"):
        raise ValueError(f"logit_standardization applies to the methods kd, dist, cmkd, dkd, drkd, reskd, got method "
                         f"{config.method!r}")
    if config.reskd_chain and config.method != "reskd":
        raise ValueError(f"reskd_chain is only read by method 'reskd', got method {config.method!r}")
    if config.schedule == "step" and not config.milestones:
        raise ValueError("the step schedule needs --milestones (epochs at which the lr decays)")
    if config.milestones and config.schedule != "step":
        raise ValueError(f"milestones {config.milestones} are only read by the step schedule, got schedule "
                         f"{config.schedule!r}")
    if config.nesterov and config.optimizer != "sgd":
        raise ValueError(f"nesterov is an SGD option, got optimizer {config.optimizer!r}")
    if config.nesterov and config.momentum == 0:
        raise ValueError("nesterov needs a momentum > 0, got momentum 0")


def check_teacher_weights(count: int, weights: list[float] | None) -> None:
    """``--teacher-weights`` for ``count`` teachers: one non-negative weight each, not all 0 (ValueError)."""
    if weights is not None:
        if len(weights) != count:
            raise ValueError(f"teacher_weights must give one weight per teacher ({count}), got {len(weights)}: "
                             f"{weights}")
        if not any(weight > 0 for weight in weights):
            raise ValueError(f"teacher_weights must not all be 0, got {weights}")


def resolve_eval_config(args: argparse.Namespace) -> TrainConfig:
    """``kdfast eval``'s configuration: a run folder's ``config.yaml`` (``RUN_DIR``, or the
    folder of ``--checkpoint`` when it holds one), then ``--config``, then the flags, each
    restricted to :data:`EVAL_OPTIONS`; the weights default to the run's ``model.pt``.
    ValueError naming what is missing."""
    run = getattr(args, "run", None)
    checkpoint = getattr(args, "checkpoint", None)
    folder = None
    if run is not None:
        folder = Path(run)
        if not (folder / "config.yaml").is_file():
            raise ValueError(f"RUN_DIR {folder} is not a kdfast run folder (it has no config.yaml); give a run "
                             f"folder, or --checkpoint FILE with --student and --data")
        if checkpoint is None:
            checkpoint = folder / "model.pt"
            if not checkpoint.is_file():
                raise ValueError(f"run folder {folder} has no model.pt (the run has not finished): pass --checkpoint "
                                 f"{folder}/checkpoint-<step>.pt")
    elif checkpoint is not None:
        beside = Path(checkpoint).parent
        folder = beside if (beside / "config.yaml").is_file() else None
    else:
        raise ValueError("kdfast eval needs a run folder (kdfast eval RUN_DIR) or the weights (--checkpoint FILE, "
                         "with --student and --data)")
    values: dict = {}
    if folder is not None:
        saved = read_config_file(folder / "config.yaml", what="the run folder's config file")
        if saved.get("method") == "reskd":
            raise ValueError(f"{folder} is a ResKD stage: its model.pt is one res-student, whose logits only mean "
                             f"something added to the chain's; evaluate the chain with `kdfast reskd curve --chain "
                             f"{folder}/chain.pt`")
        values.update({key: value for key, value in saved.items() if key in EVAL_OPTIONS})
    if getattr(args, "config", None) is not None:
        values.update({key: value for key, value in read_config_file(args.config).items() if key in EVAL_OPTIONS})
    for key in EVAL_OPTIONS:
        value = getattr(args, key, None)
        if value is not None:
            values[key] = check_option(key, value, f" ({OPTIONS[key].flag} on the command line)")
    values["checkpoint"] = check_option("checkpoint", checkpoint)
    config = TrainConfig(**values)
    validate(config)
    return config


def resume_changes(saved: dict, config: TrainConfig) -> list[tuple[str, object, object]]:
    """The options of ``config`` that differ from a run's saved options ``saved`` (its
    ``config.yaml`` or a checkpoint's ``config``) and may not change on resume, as
    ``(name, saved value, requested value)``. Options missing from ``saved`` (written by an
    older kdfast) count as their defaults."""
    changes = []
    requested = config.to_dict()
    for name, option in OPTIONS.items():
        if name in _NOT_COMPARED:
            continue
        if name in RESUME_MAY_CHANGE and not (name == "exclude" and config.method == "drkd"):
            continue
        old = saved.get(name, option.default)
        try:
            old = option.check(old)
        except ValueError:
            pass  # a value this version rejects differs from any valid request
        if old != requested[name]:
            changes.append((name, old, requested[name]))
    return changes


def describe_changes(changes: list[tuple[str, object, object]]) -> str:
    """``--student resnet8 → resnet20, --method ce → drkd`` for :func:`resume_changes`'s list."""
    def show(value):
        return "unset" if value is None else " ".join(map(str, value)) if isinstance(value, list) else str(value)

    return ", ".join(f"{OPTIONS[name].flag} {show(old)} → {show(new)}" for name, old, new in changes)


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved configuration as YAML (atomically)."""
    import yaml

    from kdfast.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
