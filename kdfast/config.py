"""The training configuration: one dataclass, settable from a YAML/JSON file and the command line.

Precedence: the defaults below < the config file (``--config``; on ``--resume`` without
``--config``, the run folder's saved ``config.yaml``) < options given on the command line.
The resolved configuration is saved into the run folder as ``config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

METHODS = ("ce", "kd", "dist", "cmkd", "drkd", "pesf", "reskd")
TEACHER_METHODS = ("kd", "dist", "cmkd", "pesf", "reskd")  # drkd's teacher is the student's own past logits
#: The temperature each method uses when --temperature is not given (the papers' defaults;
#: DIST uses τ = 1 on ImageNet).
DEFAULT_TEMPERATURE = {"ce": 1.0, "kd": 4.0, "dist": 1.0, "cmkd": 4.0, "drkd": 4.0, "pesf": 4.0, "reskd": 4.0}


def _option(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything ``kdfast train`` / ``kdfast eval`` take (see ``kdfast train --help``)."""

    # data
    data: str = _option("digits", "dataset root (root/train/<class>/*.jpg, root/val/...) or 'digits' (embedded)")
    loader: str = _option("auto", "input pipeline for folders", choices=("auto", "dali", "torch"))
    image_size: int | None = _option(None, "training/eval crop size (default: 224; digits: 8)")
    workers: int | None = _option(None, "DALI threads or DataLoader workers per process (default: cores, at most 8)")
    # models
    student: str = _option("resnet8", "student architecture (kdfast.models)")
    teacher: str | None = _option(None, "teacher architecture (kd, dist, cmkd, pesf, reskd; ignored by ce, drkd)")
    teacher_checkpoint: str | None = _option(None, "teacher weights: a kdfast model.pt/checkpoint or a "
                                                   "torchvision state dict")
    init_checkpoint: str | None = _option(None, "initial student weights (default: fresh initialization)")
    sync_bn: bool = _option(False, "convert the student's BatchNorm to SyncBatchNorm under DDP (GPUs only)")
    # method and loss
    method: str = _option("ce", "training method", choices=METHODS)
    temperature: float | None = _option(None, "τ (default per method: kd/cmkd/drkd/pesf/reskd 4, dist 1)")
    ce_weight: float = _option(1.0, "weight of the cross-entropy term")
    kd_weight: float = _option(1.0, "weight of the distillation term")
    dist_beta: float = _option(1.0, "DIST inter-class (row) weight β")
    dist_gamma: float = _option(1.0, "DIST intra-class (column) weight γ")
    cmkd_kl_weight: float = _option(1.0, "CMKD weight of its KL term")
    cmkd_corr_weight: float = _option(1.0, "CMKD weight of its correlation terms")
    cmkd_weighting: str = _option("entropy", "CMKD per-sample difficulty", choices=("entropy", "fixed"))
    spearman_strength: float | None = _option(None, "ε of the soft ranks (default 2/C)")
    adapter_hidden: int | None = _option(None, "PESF adapter hidden width (default: the teacher's feature size)")
    adapter_lr: float | None = _option(None, "PESF adapter learning rate (default: --lr)")
    rectify: bool = _option(False, "PESF: rectify the adapted teacher logits (DR-KD) for the student")
    reskd_chain: str | None = _option(None, "ResKD: the chain trained so far (chain.pt of the previous stage's run); "
                                            "--student is the new res-student (without it: the base)")
    # optimization
    optimizer: str = _option("sgd", "optimizer", choices=("sgd", "adamw"))
    lr: float = _option(0.1, "peak learning rate")
    momentum: float = _option(0.9, "SGD momentum")
    nesterov: bool = _option(False, "SGD Nesterov momentum")
    weight_decay: float = _option(5e-4, "weight decay (not applied to BatchNorm and bias parameters)")
    schedule: str = _option("cosine", "learning-rate schedule (per step)", choices=("cosine", "step", "constant"))
    warmup_epochs: float = _option(0.0, "linear warm-up from 0, in epochs")
    milestones: list[int] = field(default_factory=list, metadata={
        "help": "step schedule: epochs at which the lr is multiplied by --lr-decay", "nargs": "+", "type": int})
    lr_decay: float = _option(0.1, "step schedule factor")
    epochs: int = _option(30, "training epochs")
    batch_size: int = _option(64, "images per process and step (the global batch is this × world size)")
    # execution
    device: str = _option("auto", "cpu, cuda or auto (cuda:LOCAL_RANK when a GPU is present)")
    amp: str = _option("none", "autocast precision", choices=("none", "bf16", "fp16"))
    channels_last: bool = _option(False, "NHWC memory format for images and models")
    compile: bool = _option(False, "torch.compile the student (and teacher)")
    backend: str = _option("auto", "kdfast loss backend (auto, cpu, cuda, triton, torch)")
    seed: int = _option(0, "seed of initialization, data order and augmentation")
    deterministic: bool = _option(False, "deterministic algorithms (bitwise-reproducible runs and resumes)")
    threads: int | None = _option(None, "CPU threads of this process (default: PyTorch's)")
    # output
    output: str = _option("runs/train", "run folder (config, metrics, checkpoints, model)")
    resume: bool = _option(False, "continue from the run folder's newest valid checkpoint")
    checkpoint_every: int = _option(0, "also checkpoint every N steps (0: only at epoch ends)")
    keep_checkpoints: int = _option(2, "checkpoints kept (older ones are deleted)")
    log_every: int = _option(20, "steps between metrics.jsonl records")
    eval_every: int = _option(1, "epochs between evaluations (0: only at the end)")
    progress: str = _option("auto", "progress bar on stderr", choices=("auto", "bar", "lines", "none"))
    tensorboard: bool = _option(True, "write TensorBoard events when tensorboard is installed")
    # eval
    checkpoint: str | None = _option(None, "kdfast eval: weights of --student to evaluate")

    def resolved_temperature(self) -> float:
        return DEFAULT_TEMPERATURE[self.method] if self.temperature is None else self.temperature

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_type(item: dataclasses.Field):
    text = str(item.type)
    if "bool" in text:
        return bool
    if "int" in text and "list" not in text:
        return int
    if "float" in text:
        return float
    return str


def add_config_arguments(parser: argparse.ArgumentParser, *, exclude: tuple[str, ...] = ()) -> None:
    """One ``--option`` per field of :class:`TrainConfig` (default ``None`` = not given)."""
    parser.add_argument("--config", default=None, help="YAML or JSON file of options (keys as below, with _)")
    for item in dataclasses.fields(TrainConfig):
        if item.name in exclude:
            continue
        flag = "--" + item.name.replace("_", "-")
        kind = _field_type(item)
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        help_text = f"{item.metadata['help']} (default: {default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif item.metadata.get("nargs"):
            parser.add_argument(flag, nargs=item.metadata["nargs"], type=item.metadata["type"], default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, choices=item.metadata.get("choices"), help=help_text)


def read_config_file(path: str | os.PathLike) -> dict:
    """Options from a YAML (``.yaml``/``.yml``) or JSON file; unknown keys are an error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of options, got {type(values).__name__}")
    known = {item.name for item in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(k.replace("-", "_") for k in values) - known)
    if unknown:
        raise ValueError(f"config file {path} has unknown option(s) {unknown}; known: {sorted(known)}")
    return {key.replace("-", "_"): value for key, value in values.items()}


def resolve_config(args: argparse.Namespace | None = None, **overrides) -> TrainConfig:
    """Defaults < config file < command-line options (< keyword overrides); validated."""
    values: dict = {}
    given = {} if args is None else {k: v for k, v in vars(args).items()
                                     if v is not None and k in {f.name for f in dataclasses.fields(TrainConfig)}}
    given.update(overrides)
    config_path = None if args is None else getattr(args, "config", None)
    if config_path is None and given.get("resume"):
        saved = Path(given.get("output", TrainConfig.output)) / "config.yaml"
        if saved.is_file():
            config_path = saved
    if config_path is not None:
        values.update(read_config_file(config_path))
    values.update(given)
    config = TrainConfig(**values)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Raise ValueError naming the first option with a bad value."""
    def positive(name, integer=False):
        value = getattr(config, name)
        if (integer and (isinstance(value, bool) or not isinstance(value, int))) or value <= 0:
            raise ValueError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")

    if config.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {config.method!r}")
    for name in ("epochs", "batch_size", "keep_checkpoints", "log_every"):
        positive(name, integer=True)
    positive("lr")
    if config.temperature is not None:
        positive("temperature")
    for name in ("ce_weight", "kd_weight", "dist_beta", "dist_gamma", "cmkd_kl_weight", "cmkd_corr_weight",
                 "weight_decay", "momentum", "warmup_epochs", "checkpoint_every", "eval_every"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)!r}")
    if config.method in TEACHER_METHODS and not config.teacher:
        raise ValueError(f"method {config.method!r} needs a teacher: pass --teacher ARCH --teacher-checkpoint FILE")
    if config.method in TEACHER_METHODS and not config.teacher_checkpoint:
        raise ValueError(f"method {config.method!r} needs teacher_checkpoint: the teacher's weights (a frozen "
                         f"random teacher teaches nothing)")
    if config.reskd_chain and config.method != "reskd":
        raise ValueError(f"reskd_chain is only read by method 'reskd', got method {config.method!r}")
    if config.schedule == "step" and not config.milestones:
        raise ValueError("the step schedule needs --milestones (epochs at which the lr decays)")
    if config.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {config.device!r}")


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved configuration as YAML (atomically)."""
    import yaml

    from kdfast.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
