"""The model zoo: the standard KD teacher/student pairs, written without torchvision.

Every model is a :class:`Classifier`: ``model(x)`` returns logits, and
``model.forward_features(x)`` the pooled penultimate feature ``[B, feature_dim]`` that
``model.fc`` maps to logits (PESF-KD's teacher adapter reads it).

* ImageNet ResNets ``resnet18``, ``resnet34``, ``resnet50`` (He et al., 2016) whose
  state-dict keys and shapes match torchvision's, so a torchvision checkpoint file loads
  as a teacher (:func:`load_weights`).
* CIFAR-style ResNets ``resnet8``, ``resnet20``, ``resnet32``, ``resnet56``, ``resnet110``
  and the 4×-wide ``resnet8x4``, ``resnet32x4`` (and narrower ``resnet<depth>_w<width>``,
  e.g. ``resnet8_w8``, for light res-students), with the key names of the CRD/RepDistiller
  model zoo that most KD papers report on (Tian et al., 2020).
* Wide ResNets ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2`` … (``wrn_<depth>_<widen>``,
  Zagoruyko & Komodakis, 2016), pre-activation, no dropout, with the key names of the same
  zoo (each stage holds its blocks in ``.layer``: ``block1.layer.0.bn1.weight``); files that
  kdfast wrote before (``block1.0.bn1.weight``) still load.
* ``mlp-<width>-<width>…``: a multilayer perceptron on the flattened image, for the
  embedded 8×8 digits (e.g. ``mlp-256-256`` teacher, ``mlp-32`` student).

CIFAR-style models and MLPs take any image size (global average pooling; the MLP needs
the size at construction); ImageNet ResNets expect about 224 px (a stride-32 network).
"""

from __future__ import annotations

import re

import torch
from torch import nn

__all__ = ["Classifier", "MODEL_NAMES", "create_model", "describe_models", "load_weights", "model_names"]


class Classifier(nn.Module):
    """Base of the zoo: ``forward = fc ∘ forward_features``."""

    feature_dim: int
    fc: nn.Linear

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def _conv3x3(inputs: int, outputs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)


def _downsample(inputs: int, outputs: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and inputs == outputs:
        return None
    return nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inputs: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(inputs, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(inputs, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inputs: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)  # stride on the 3×3, as torchvision (ResNet v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inputs, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _init_resnet(model: nn.Module) -> None:
    """He-normal convolutions, unit BatchNorm, and the last BN of each residual branch at
    zero (each block starts as the identity: Goyal et al., 2017)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, Bottleneck):
            nn.init.zeros_(module.bn3.weight)
        elif isinstance(module, BasicBlock):
            nn.init.zeros_(module.bn2.weight)


class ResNet(Classifier):
    """A ResNet: a stem, then stages of residual blocks, global average pooling and ``fc``.

    ``stem="imagenet"``: 7×7/2 convolution and 3×3/2 max-pooling (torchvision's layout and
    key names); ``stem="cifar"``: one 3×3 convolution (CRD's CIFAR ResNets).
    """

    def __init__(self, block: type[nn.Module], layers: list[int], widths: list[int], num_classes: int,
                 in_channels: int = 3, stem: str = "imagenet", stem_width: int | None = None):
        super().__init__()
        stem_width = stem_width or widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = _conv3x3(in_channels, stem_width)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        channels = stem_width
        for stage, (blocks, width) in enumerate(zip(layers, widths), start=1):
            stride = 1 if stage == 1 else 2
            modules = []
            for index in range(blocks):
                modules.append(block(channels, width, stride if index == 0 else 1))
                channels = width * block.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*modules))
        self.stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels
        self.fc = nn.Linear(channels, num_classes)
        _init_resnet(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, self.stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return torch.flatten(self.avgpool(x), 1)


class _WideBlock(nn.Module):
    """Pre-activation block of a wide ResNet (BN-ReLU-conv twice, 1×1 projection shortcut)."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inputs)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(inputs, outputs, stride)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(outputs, outputs)
        self.equal = inputs == outputs and stride == 1
        self.convShortcut = None if self.equal else nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return out + (x if self.equal else self.convShortcut(activated))


class _WideStage(nn.Module):
    """A stage of a wide ResNet, its blocks in ``.layer``: the ``NetworkBlock`` of the CRD/RepDistiller
    and mdistiller code (``models/wrn.py``), so that the state-dict keys are theirs
    (``block1.layer.0.bn1.weight``) and their teacher files load as is."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


# kdfast's wide ResNets held a stage's blocks directly (``block1.0.bn1.weight``) until they
# took the field's names (``block1.layer.0.bn1.weight``); the files written before (model.pt,
# checkpoints, ResKD chains) are renamed on loading. Both names of a key cannot be confused:
# the stage's only child is ``layer``.
_OLD_WIDE_KEY = re.compile(r"(block[123])\.(?=\d+\.)")


def _upgrade_wide_keys(state: dict, prefix: str = "") -> dict:
    """Rename in place the old kdfast keys ``<prefix>blockN.<i>.…`` of a wide ResNet to
    ``<prefix>blockN.layer.<i>.…`` (where the new key is not there already); returns ``state``."""
    for key in [key for key in state if key.startswith(prefix)]:
        if (match := _OLD_WIDE_KEY.match(key, len(prefix))) is not None:
            renamed = f"{key[:match.end(1)]}.layer.{key[match.end():]}"
            if renamed not in state:
                state[renamed] = state.pop(key)
    return state


def _upgrade_wide_keys_hook(module, state_dict, prefix, *args) -> None:
    # load_state_dict's pre-hook: the rename wherever a state dict reaches a wide ResNet
    # (of the model itself or of a module holding it: a ResKD chain's stages, the trainer's wrapper).
    _upgrade_wide_keys(state_dict, prefix)


def upgrade_old_keys(model: nn.Module, state: dict) -> dict:
    """Rename in place the old kdfast keys in ``state`` (a state dict of ``model``) of the wide
    ResNets that ``model`` is or holds; returns ``state``. For code that compares a state
    dict's keys with the model's before ``load_state_dict`` (whose hook renames them too)."""
    for name, module in model.named_modules():
        if isinstance(module, WideResNet):
            _upgrade_wide_keys(state, f"{name}." if name else "")
    return state


class WideResNet(Classifier):
    """WRN-depth-widen: three stages of (depth − 4)/6 pre-activation blocks, widths 16k, 32k, 64k.

    The architecture and key names of ``models/wrn.py`` in CRD/RepDistiller and mdistiller
    (without dropout): ``conv1``; ``block1``–``block3`` (each a stage whose ``.layer`` holds
    its blocks, the first of stages 2 and 3 of stride 2); the final ``bn1`` and ReLU; global
    average pooling; ``fc``. A block is BN-ReLU-conv3×3-BN-ReLU-conv3×3; where its input and
    output widths differ, a 1×1 ``convShortcut`` on the activated input is its shortcut,
    otherwise the input itself.
    """

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"a wide ResNet's depth must be 6n + 4 with n >= 1, got {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = _conv3x3(in_channels, widths[0])
        for stage in range(3):
            layers = [_WideBlock(widths[stage] if index == 0 else widths[stage + 1], widths[stage + 1],
                                 (1 if stage == 0 else 2) if index == 0 else 1) for index in range(blocks)]
            setattr(self, f"block{stage + 1}", _WideStage(layers))
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)
        self.register_load_state_dict_pre_hook(_upgrade_wide_keys_hook)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return torch.flatten(self.avgpool(self.relu(self.bn1(x))), 1)


class MLP(Classifier):
    """Flatten, then Linear-ReLU layers of the given widths, then ``fc``."""

    def __init__(self, widths: list[int], num_classes: int, in_features: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for width in widths:
            layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
            in_features = width
        self.body = nn.Sequential(*layers)
        self.feature_dim = in_features
        self.fc = nn.Linear(in_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


_IMAGENET = {  # name: (block, blocks per stage)
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
_CIFAR = {  # name: (depth, stem width, stage widths)
    "resnet8": (8, 16, [16, 32, 64]),
    "resnet14": (14, 16, [16, 32, 64]),
    "resnet20": (20, 16, [16, 32, 64]),
    "resnet32": (32, 16, [16, 32, 64]),
    "resnet44": (44, 16, [16, 32, 64]),
    "resnet56": (56, 16, [16, 32, 64]),
    "resnet110": (110, 16, [16, 32, 64]),
    "resnet8x4": (8, 32, [64, 128, 256]),
    "resnet32x4": (32, 32, [64, 128, 256]),
}
_WRN = re.compile(r"wrn_(\d+)_(\d+)$")
_NARROW = re.compile(r"resnet(\d+)_w(\d+)$")  # CIFAR-style, stage widths w, 2w, 4w
_MLP = re.compile(r"mlp(-\d+)*$")
MODEL_NAMES = sorted(_IMAGENET) + sorted(_CIFAR) + ["resnet<depth>_w<width>", "wrn_16_2", "wrn_40_2",
                                                    "wrn_<depth>_<widen>", "mlp-<width>-…"]


def model_names() -> list[str]:
    """The names :func:`create_model` accepts (patterns in angle brackets)."""
    return list(MODEL_NAMES)


#: How ``kdfast models`` sizes each family: (classes, channels, image size, where it is used).
_FAMILIES = (
    (sorted(_IMAGENET), (1000, 3, 224, "ImageNet (torchvision's keys)")),
    (sorted(_CIFAR, key=lambda n: (n.endswith("x4"), int(re.sub(r"\D", "", n.split("x")[0])))),
     (100, 3, 32, "CIFAR-100 (CRD/RepDistiller keys)")),
    (["resnet8_w8", "resnet20_w8"], (100, 3, 32, "narrow CIFAR ResNets, resnet<depth>_w<width>")),
    (["wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"], (100, 3, 32, "Wide ResNets, wrn_<depth>_<widen> (CRD keys)")),
    (["mlp-32", "mlp-128", "mlp-256-256"], (10, 1, 8, "the embedded 8×8 digits, mlp-<width>-…")),
)


def describe_models() -> list[str]:
    """``kdfast models``: each architecture (patterns by examples) with its parameters where it is used."""
    lines = [f"{'model':14s} {'parameters':>12s}  used for (classes, input)"]
    for names, (classes, channels, size, use) in _FAMILIES:
        for name in names:
            count = sum(p.numel() for p in create_model(name, classes, channels, size).parameters())
            lines.append(f"{name:14s} {count:12,d}  {use} ({classes} classes, {channels}×{size}×{size})")
    lines.append("Any model takes any number of classes (--data sets it); CIFAR-style ResNets, WRNs and MLPs any "
                 "image size.")
    return lines


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 224) -> Classifier:
    """A zoo model by name, freshly initialized.

    Args:
        name: see :data:`MODEL_NAMES` (e.g. ``"resnet18"``, ``"resnet8x4"``, ``"wrn_40_2"``,
            ``"mlp-256-256"``).
        num_classes: outputs of ``fc``.
        in_channels: image channels (3; 1 for the digits).
        image_size: input height and width (used by MLPs only).
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if name in _IMAGENET:
        block, layers = _IMAGENET[name]
        return ResNet(block, layers, [64, 128, 256, 512], num_classes, in_channels, stem="imagenet")
    if name in _CIFAR:
        depth, stem, widths = _CIFAR[name]
        return ResNet(BasicBlock, [(depth - 2) // 6] * 3, widths, num_classes, in_channels, stem="cifar",
                      stem_width=stem)
    if match := _NARROW.match(name):
        depth, width = int(match.group(1)), int(match.group(2))
        if (depth - 2) % 6 or depth < 8 or width < 1:
            raise ValueError(f"resnet<depth>_w<width> needs depth = 6n + 2 >= 8 and width >= 1, got {name!r}")
        return ResNet(BasicBlock, [(depth - 2) // 6] * 3, [width, 2 * width, 4 * width], num_classes, in_channels,
                      stem="cifar", stem_width=width)
    if match := _WRN.match(name):
        return WideResNet(int(match.group(1)), int(match.group(2)), num_classes, in_channels)
    if _MLP.match(name):
        widths = [int(width) for width in name.split("-")[1:]]
        return MLP(widths, num_classes, in_channels * image_size * image_size)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")


def _weights_of(state, path, what: str) -> tuple[dict, str]:
    """The model weights in what a kdfast file holds, and where they came from (for messages).

    A training checkpoint holds the trainer's wrapper (``student.`` and, for PESF-KD,
    ``adapter.``; for ResKD ``student.`` is the stage: ``student.chain.`` the frozen chain,
    ``student.student.`` the new res-student, which is what the run's ``model.pt`` holds); a
    ResKD chain file holds one state dict per stage. The files of the field's training
    scripts hold the model's state dict under ``"model"`` too (CRD/RepDistiller's teachers
    ``{'model': …, 'epoch': 240, 'optimizer': …}``, mdistiller's ``{'model': …}``). Prefixes
    that DDP or ``torch.compile`` add (``module.``, ``_orig_mod.``) are removed.
    """
    source = ""
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        # A kdfast training checkpoint (its "identity" and "config" name the student), or a
        # CRD/RepDistiller/mdistiller file (neither; its "epoch", when an int, is named).
        identity = state.get("identity") if isinstance(state.get("identity"), dict) else {}
        config = state.get("config") if isinstance(state.get("config"), dict) else {}
        student = identity.get("student", config.get("student"))
        classes = identity.get("num_classes")
        epoch = state.get("epoch")
        if student:
            source = f" (a training checkpoint of a {student} student" + (f", {classes} classes)" if classes else ")")
        elif "identity" not in state and "config" not in state:
            source = " (the state dict under its 'model' key" + (
                f", epoch {epoch})" if isinstance(epoch, int) and not isinstance(epoch, bool) else ")")
        state = state["model"]
    elif isinstance(state, dict) and "architectures" in state and "state_dicts" in state:  # a ResKD chain file
        architectures, states = state["architectures"], state["state_dicts"]
        if not isinstance(states, list) or len(states) != 1:
            raise ValueError(f"{what} {path} is a ResKD chain of {len(states) if isinstance(states, list) else '?'} "
                             f"stages ({' + '.join(map(str, architectures))}), whose logits are the sum of its stages, "
                             f"not one model's weights: pass it as --reskd-chain (the next stage) or to `kdfast reskd "
                             f"curve --chain`; a stage's own res-student is that stage's model.pt")
        source = f" (a one-stage ResKD chain: {architectures[0]})"
        state = states[0]
    if not isinstance(state, dict) or not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{what} {path} is not a state dict of tensors")

    def clean(key: str) -> str:
        changed = True
        while changed:
            stripped = key.removeprefix("module.").removeprefix("_orig_mod.")
            changed, key = stripped != key, stripped
        return key

    state = {clean(key): value for key, value in state.items()}
    # The trainer's wrapper and ResKD's stage: keep the student (the run's model.pt).
    while (all(key.startswith(("student.", "adapter.", "chain.")) for key in state)
           and any(key.startswith("student.") for key in state)):
        state = {clean(key.removeprefix("student.")): value for key, value in state.items()
                 if key.startswith("student.")}
    return state, source


def load_weights(model: nn.Module, path, *, what: str = "teacher checkpoint") -> None:
    """Load weights into ``model`` from a file: a plain state dict (e.g. torchvision's
    ``resnet34-*.pth``), a CRD/RepDistiller or mdistiller teacher file (``{'model': state
    dict, 'epoch': …}``, e.g. ``resnet32x4_vanilla/ckpt_epoch_240.pth``), a kdfast run's
    ``model.pt``, a kdfast training checkpoint (``checkpoint-<step>.pt``: its student) or a
    one-stage ResKD chain file (its base).

    Prefixes that DDP or ``torch.compile`` add (``module.``, ``_orig_mod.``) and the
    trainer's own (``student.``) are removed; the wide-ResNet keys of files kdfast wrote
    before it took the field's names (``block1.0.…``) are renamed (``block1.layer.0.…``).
    Raises ValueError naming the missing, unexpected or mis-shaped keys.
    """
    from kdfast.checkpoint import read_checkpoint_file

    cleaned, source = _weights_of(read_checkpoint_file(path, what=what), path, what)
    # Old kdfast wide-ResNet names, renamed before the comparison below (load_state_dict's
    # hook would rename them too, but only after it).
    upgrade_old_keys(model, cleaned)
    expected = model.state_dict()
    # Checkpoints older than PyTorch 0.4 (torchvision's own ResNet files among them) have no
    # BatchNorm step counters; they are not weights, so they may be missing.
    missing = sorted(key for key in set(expected) - set(cleaned) if not key.endswith("num_batches_tracked"))
    unexpected = sorted(set(cleaned) - set(expected))
    mis_shaped = [f"{key} {tuple(cleaned[key].shape)} (expected {tuple(expected[key].shape)})"
                  for key in expected if key in cleaned and cleaned[key].shape != expected[key].shape]
    if missing or unexpected or mis_shaped:
        raise ValueError(f"{what} {path}{source} does not match the model: {len(missing)} missing keys "
                         f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, {len(mis_shaped)} "
                         f"mis-shaped {mis_shaped[:5]}")
    model.load_state_dict(cleaned, strict=False)
