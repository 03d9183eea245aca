"""Teacher files of the field load as is (issue 15, item 4).

The CIFAR model zoo that most KD papers report on is CRD's (HobbitLong/RepDistiller,
``models/resnet.py``, ``models/wrn.py``), which mdistiller (megvii-research/mdistiller,
``mdistiller/models/cifar/resnet.py``, ``wrn.py``) uses unchanged. The key lists and shapes
below are written from those definitions (not taken from kdfast), so that a file of theirs
is simulated by random tensors under their names:

* CIFAR ResNet ``ResNet(depth, num_filters, 'basicblock')``: ``conv1`` (3×3, 3 →
  num_filters[0]) and ``bn1``; ``layer1``–``layer3`` of n = (depth − 2)/6 BasicBlocks of
  num_filters[1..3] channels (stride 1, 2, 2 on the first block), each ``conv1``/``bn1``/
  ``conv2``/``bn2`` (3×3) and, where the stride is not 1 or the width changes, a
  ``downsample`` = Sequential(1×1 conv, BN); ``fc`` on num_filters[3]. resnet8 … resnet110
  take [16, 16, 32, 64], resnet8x4 and resnet32x4 [32, 64, 128, 256].
* WRN ``WideResNet(depth, widen_factor)``: ``conv1`` (3×3, 3 → 16); ``block1``–``block3``, each
  a ``NetworkBlock`` whose ``.layer`` holds n = (depth − 4)/6 pre-activation BasicBlocks
  (``bn1`` on the input, ``conv1`` 3×3 with the stage's stride on the first block, ``bn2``,
  ``conv2`` 3×3, and a 1×1 ``convShortcut`` where input and output widths differ) of 16k, 32k,
  64k channels; the final ``bn1`` and ``fc``.

Their teacher files (``<arch>_vanilla/ckpt_epoch_240.pth``) are ``{'epoch': 240, 'model':
state dict, 'accuracy': …, 'optimizer': …}``; RepDistiller's ``<arch>_last.pth`` carries its
argparse options under ``'opt'``; mdistiller's student files are ``{'model': state dict}``.
"""

from __future__ import annotations

import argparse
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdfast import checkpoint as ckpt
from kdfast.models import create_model, load_weights

RESNETS = {  # name: (depth, num_filters) of RepDistiller's / mdistiller's models/resnet.py
    "resnet8": (8, [16, 16, 32, 64]), "resnet14": (14, [16, 16, 32, 64]), "resnet20": (20, [16, 16, 32, 64]),
    "resnet32": (32, [16, 16, 32, 64]), "resnet44": (44, [16, 16, 32, 64]), "resnet56": (56, [16, 16, 32, 64]),
    "resnet110": (110, [16, 16, 32, 64]), "resnet8x4": (8, [32, 64, 128, 256]),
    "resnet32x4": (32, [32, 64, 128, 256]),
}
WRNS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}  # (depth, widen)
ARCHITECTURES = [*RESNETS, *WRNS]


# ----------------------------------------------------------------------------- the field's keys

def _batch_norm(keys: dict, name: str, channels: int) -> None:
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{name}.{leaf}"] = (channels,)
    keys[f"{name}.num_batches_tracked"] = ()


def field_resnet_keys(depth: int, filters: list[int], classes: int) -> dict[str, tuple]:
    keys: dict[str, tuple] = {"conv1.weight": (filters[0], 3, 3, 3)}
    _batch_norm(keys, "bn1", filters[0])
    inplanes, blocks = filters[0], (depth - 2) // 6
    for stage in (1, 2, 3):
        planes = filters[stage]
        for index in range(blocks):
            stride = (1 if stage == 1 else 2) if index == 0 else 1
            block = f"layer{stage}.{index}"
            keys[f"{block}.conv1.weight"] = (planes, inplanes, 3, 3)
            _batch_norm(keys, f"{block}.bn1", planes)
            keys[f"{block}.conv2.weight"] = (planes, planes, 3, 3)
            _batch_norm(keys, f"{block}.bn2", planes)
            if stride != 1 or inplanes != planes:
                keys[f"{block}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                _batch_norm(keys, f"{block}.downsample.1", planes)
            inplanes = planes
    keys["fc.weight"], keys["fc.bias"] = (classes, filters[3]), (classes,)
    return keys


def field_wrn_keys(depth: int, widen: int, classes: int) -> dict[str, tuple]:
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    keys: dict[str, tuple] = {"conv1.weight": (16, 3, 3, 3)}
    for stage in (1, 2, 3):
        for index in range(((depth - 4) // 6)):
            inputs, outputs = widths[stage - 1] if index == 0 else widths[stage], widths[stage]
            block = f"block{stage}.layer.{index}"
            _batch_norm(keys, f"{block}.bn1", inputs)
            keys[f"{block}.conv1.weight"] = (outputs, inputs, 3, 3)
            _batch_norm(keys, f"{block}.bn2", outputs)
            keys[f"{block}.conv2.weight"] = (outputs, outputs, 3, 3)
            if inputs != outputs:
                keys[f"{block}.convShortcut.weight"] = (outputs, inputs, 1, 1)
    _batch_norm(keys, "bn1", widths[3])
    keys["fc.weight"], keys["fc.bias"] = (classes, widths[3]), (classes,)
    return keys


def field_keys(name: str, classes: int) -> dict[str, tuple]:
    return field_resnet_keys(*RESNETS[name], classes) if name in RESNETS else field_wrn_keys(*WRNS[name], classes)


def field_state(name: str, classes: int, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights under the field's names: convolutions about He-scaled (so that a deep
    forward stays finite), BN scales, shifts and statistics all distinct from a fresh model's."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in field_keys(name, classes).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(1, 10**6, (), generator=generator)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator, dtype=dtype) * 1.5 + 0.5
        elif key.endswith(("bn1.weight", "bn2.weight", "downsample.1.weight")) or key == "bn1.weight":
            state[key] = torch.rand(shape, generator=generator, dtype=dtype) + 0.5
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=generator, dtype=dtype) / fan_in ** 0.5
        else:
            state[key] = torch.randn(shape, generator=generator, dtype=dtype) * 0.2
    return state


def old_kdfast_names(state: dict) -> dict:
    """A wide ResNet's state dict under kdfast's names before it took the field's (``block1.0.…``)."""
    return {re.sub(r"^(block[123])\.layer\.", r"\1.", key): value for key, value in state.items()}


def assert_loaded(model: nn.Module, state: dict) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def _optimizer_state(count: int) -> dict:
    return {"state": {}, "param_groups": [{"lr": 0.05, "momentum": 0.9, "dampening": 0, "weight_decay": 5e-4,
                                           "nesterov": False, "params": list(range(count))}]}


def save_as(path, state: dict, layout: str):
    """``state`` written as one of the field's files."""
    if layout == "plain":
        torch.save(state, path)
    elif layout == "crd":  # RepDistiller's train_teacher.py ckpt_epoch_<n>.pth, as CRD's teachers
        torch.save({"epoch": 240, "model": state, "accuracy": torch.tensor(75.61), "optimizer": _optimizer_state(3)},
                   path)
    elif layout == "crd-legacy":  # the same, in PyTorch's pre-1.6 (non-zip) format of the 2019 teacher files
        torch.save({"epoch": 240, "model": state, "accuracy": torch.tensor(75.61), "optimizer": _optimizer_state(3)},
                   path, _use_new_zipfile_serialization=False)
    elif layout == "crd-last":  # RepDistiller's <arch>_last.pth: with the argparse options
        options = argparse.Namespace(model="wrn_40_2", learning_rate=0.05, lr_decay_epochs=[150, 180, 210],
                                     dataset="cifar100", trial="0")
        torch.save({"opt": options, "model": state, "optimizer": _optimizer_state(3)}, path)
    elif layout == "ddp":  # trained under (Distributed)DataParallel
        torch.save({"epoch": 240, "model": {f"module.{key}": value for key, value in state.items()}}, path)
    elif layout == "mdistiller-student":  # mdistiller's student_best / student_<epoch>
        torch.save({"model": state}, path)
    elif layout == "no-step-counters":  # written before PyTorch 0.4.1
        torch.save({key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}, path)
    else:  # pragma: no cover
        raise AssertionError(layout)
    return path


LAYOUTS = ["plain", "crd", "crd-legacy", "crd-last", "ddp", "mdistiller-student", "no-step-counters"]


# ----------------------------------------------------------------------------- key names and shapes

@pytest.mark.parametrize("name", ARCHITECTURES)
def test_keys_and_shapes_are_the_fields(name):
    ours = {key: tuple(value.shape) for key, value in create_model(name, 100).state_dict().items()}
    assert ours == field_keys(name, 100)


def test_key_lists_spot_checks():
    """A few keys of the definitions, written out (anchors for the generated lists above)."""
    resnet8x4 = field_keys("resnet8x4", 100)
    assert resnet8x4["layer1.0.downsample.0.weight"] == (64, 32, 1, 1)  # stem 32 → stage 64: a projection
    assert resnet8x4["layer3.0.conv1.weight"] == (256, 128, 3, 3) and resnet8x4["fc.weight"] == (100, 256)
    resnet32 = field_keys("resnet32", 100)
    assert "layer1.0.downsample.0.weight" not in resnet32 and resnet32["layer2.0.downsample.0.weight"] == (32, 16, 1, 1)
    assert resnet32["layer3.4.bn2.running_var"] == (64,) and "layer3.5.conv1.weight" not in resnet32
    wrn_40_2 = field_keys("wrn_40_2", 100)
    assert wrn_40_2["block1.layer.0.convShortcut.weight"] == (32, 16, 1, 1)
    assert wrn_40_2["block1.layer.0.bn1.weight"] == (16,) and wrn_40_2["block1.layer.1.bn1.weight"] == (32,)
    assert wrn_40_2["block3.layer.5.conv2.weight"] == (128, 128, 3, 3) and wrn_40_2["bn1.running_mean"] == (128,)
    assert "block3.layer.6.conv1.weight" not in wrn_40_2 and "block1.layer.1.convShortcut.weight" not in wrn_40_2
    wrn_40_1 = field_keys("wrn_40_1", 100)  # widen 1: the first stage keeps 16 channels, no projection
    assert "block1.layer.0.convShortcut.weight" not in wrn_40_1
    assert wrn_40_1["block2.layer.0.convShortcut.weight"] == (32, 16, 1, 1)
    # CRD's published sizes (parameters, BN statistics excluded)
    assert sum(torch.Size(shape).numel() for key, shape in field_keys("resnet32x4", 100).items()
               if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))) == 7_433_860
    assert sum(torch.Size(shape).numel() for key, shape in wrn_40_2.items()
               if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))) == 2_255_156


# ----------------------------------------------------------------------------- the field's files load

@pytest.mark.parametrize("name", ARCHITECTURES)
def test_crd_teacher_file_loads(tmp_path, name):
    state = field_state(name, 100)
    path = save_as(tmp_path / "ckpt_epoch_240.pth", state, "crd")
    model = create_model(name, 100)
    load_weights(model, path)
    assert_loaded(model, state)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "wrn_40_1"])
def test_every_file_layout_loads(tmp_path, name, layout):
    state = field_state(name, 100, seed=1)
    path = save_as(tmp_path / f"{name}.pth", state, layout)
    model = create_model(name, 100)
    fresh_counters = {key: value.clone() for key, value in model.state_dict().items()
                      if key.endswith("num_batches_tracked")}
    load_weights(model, path, what="teacher checkpoint")
    if layout == "no-step-counters":  # the model keeps its own counters
        state = {**state, **fresh_counters}
    assert_loaded(model, state)


# ----------------------------------------------------------------------------- kdfast's old WRN names

def test_old_kdfast_wrn_files_still_load(tmp_path):
    from kdfast.reskd import load_chain

    state = field_state("wrn_16_2", 10, seed=2)
    old = old_kdfast_names(state)
    assert "block1.0.bn1.weight" in old and "block3.1.conv2.weight" in old and not any(".layer." in k for k in old)

    ckpt.save_state_dict(tmp_path / "model.pt", old)  # an old run's model.pt
    model = create_model("wrn_16_2", 10)
    load_weights(model, tmp_path / "model.pt")
    assert_loaded(model, state)

    # an old training checkpoint (the trainer's wrapper: student.…), through load_weights
    path = ckpt.write_checkpoint(tmp_path / "run", {"model": {f"student.{k}": v for k, v in old.items()},
                                                    "identity": {"student": "wrn_16_2", "num_classes": 10}}, 7)
    model = create_model("wrn_16_2", 10)
    load_weights(model, path, what="checkpoint")
    assert_loaded(model, state)

    # load_state_dict itself (a module holding the model, as the trainer's wrapper its `student`; a ResKD chain)
    model = create_model("wrn_16_2", 10)
    model.load_state_dict(old)
    assert_loaded(model, state)
    wrapper = nn.Module()
    wrapper.student = create_model("wrn_16_2", 10)
    wrapper.load_state_dict({f"student.{k}": v for k, v in old.items()})
    assert_loaded(wrapper.student, state)
    # the rename for code that compares keys before loading (as the trainer's resume check does)
    from kdfast.models import upgrade_old_keys
    renamed = upgrade_old_keys(wrapper, {f"student.{k}": v for k, v in old.items()} | {"adapter.w": state["fc.bias"]})
    assert set(renamed) == {f"student.{k}" for k in state} | {"adapter.w"}
    ckpt.save_state_dict(tmp_path / "chain.pt", {"architectures": ["wrn_16_2"], "num_classes": 10, "in_channels": 3,
                                                 "image_size": 32, "state_dicts": [old]})
    chain, _ = load_chain(tmp_path / "chain.pt")
    assert_loaded(chain.base, state)
    model = create_model("wrn_16_2", 10)
    load_weights(model, tmp_path / "chain.pt")
    assert_loaded(model, state)

    # a wrong old file is reported under the field's names
    with pytest.raises(ValueError, match=r"model.pt does not match the model: 0 missing keys \[\], 36 unexpected keys "
                                         r"\['block1.layer.1.bn1.bias'"):
        load_weights(create_model("wrn_10_2", 10), tmp_path / "model.pt")


def test_new_names_are_written(tmp_path):
    """kdfast writes the field's names: its own wide-ResNet files load into the field's key list."""
    keys = set(create_model("wrn_40_2", 100).state_dict())
    assert "block1.layer.0.bn1.weight" in keys and not any(re.match(r"block\d\.\d", key) for key in keys)


# ----------------------------------------------------------------------------- mismatches are errors

def test_mismatched_files_name_their_keys(tmp_path):
    crd = save_as(tmp_path / "resnet32x4.pth", field_state("resnet32x4", 100), "crd")
    unexpected = sorted(set(field_keys("resnet32x4", 100)) - set(field_keys("resnet8x4", 100)))
    assert len(unexpected) == 144  # blocks 1–4 of each of the 3 stages, 12 keys each
    with pytest.raises(ValueError, match=re.escape(
            f"resnet32x4.pth (the state dict under its 'model' key, epoch 240) does not match the model: 0 missing "
            f"keys [], 144 unexpected keys {unexpected[:5]}, 0 mis-shaped []")):
        load_weights(create_model("resnet8x4", 100), crd)

    with pytest.raises(ValueError, match=re.escape(
            "2 mis-shaped ['fc.weight (100, 256) (expected (10, 256))', 'fc.bias (100,) (expected (10,))']")):
        load_weights(create_model("resnet32x4", 10), crd)  # another class count

    with pytest.raises(ValueError, match=r"resnet32x4.pth \(the state dict under its 'model' key, epoch 240\) does "
                                         r"not match the model: \d+ missing keys \['block1.layer.0.bn1.bias'.*\d+ "
                                         r"unexpected keys \['layer1.0.bn1.bias'"):
        load_weights(create_model("wrn_40_2", 100), crd)  # another architecture

    narrow = save_as(tmp_path / "resnet8.pth", field_state("resnet8", 100), "ddp")
    with pytest.raises(ValueError, match=r"5 missing keys \['layer1.0.downsample.0.weight', .*mis-shaped "
                                         r"\['conv1.weight \(16, 3, 3, 3\) \(expected \(32, 3, 3, 3\)\)"):
        load_weights(create_model("resnet8x4", 100), narrow)  # one stem width instead of the other

    wrn = save_as(tmp_path / "wrn_40_2.pth", field_state("wrn_40_2", 100), "mdistiller-student")
    with pytest.raises(ValueError, match=r"wrn_40_2.pth \(the state dict under its 'model' key\) does not match the "
                                         r"model: 0 missing keys \[\], 144 unexpected keys \['block1.layer.2"):
        load_weights(create_model("wrn_16_2", 100), wrn)


# ----------------------------------------------------------------------------- the same forward

def _bn(x, state, name):
    return F.batch_norm(x, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                        state[f"{name}.bias"], training=False, eps=1e-5)


def resnet_reference(state: dict, depth: int, x: torch.Tensor) -> torch.Tensor:
    """He et al.'s CIFAR ResNet as CRD builds it: conv-BN-ReLU stem; per block
    ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut), the shortcut BN(1×1 conv) where the shape
    changes; 8×8 average pooling of the 8×8 map of a 32 px image; fc."""
    out = F.relu(_bn(F.conv2d(x, state["conv1.weight"], padding=1), state, "bn1"))
    for stage in (1, 2, 3):
        for index in range((depth - 2) // 6):
            block, stride = f"layer{stage}.{index}", (1 if stage == 1 else 2) if index == 0 else 1
            branch = F.relu(_bn(F.conv2d(out, state[f"{block}.conv1.weight"], stride=stride, padding=1), state,
                                f"{block}.bn1"))
            branch = _bn(F.conv2d(branch, state[f"{block}.conv2.weight"], padding=1), state, f"{block}.bn2")
            shortcut = out
            if f"{block}.downsample.0.weight" in state:
                shortcut = _bn(F.conv2d(out, state[f"{block}.downsample.0.weight"], stride=stride), state,
                               f"{block}.downsample.1")
            out = F.relu(branch + shortcut)
    return F.linear(F.avg_pool2d(out, 8).flatten(1), state["fc.weight"], state["fc.bias"])


def wrn_reference(state: dict, depth: int, x: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis's WRN with pre-activation blocks B(3, 3): per block, a = ReLU(BN(x));
    conv3×3(ReLU(BN(conv3×3(a)))) + (x, or the 1×1 projection of a where the width changes);
    then BN-ReLU, 8×8 average pooling, fc."""
    out = F.conv2d(x, state["conv1.weight"], padding=1)
    for stage in (1, 2, 3):
        for index in range((depth - 4) // 6):
            block, stride = f"block{stage}.layer.{index}", (1 if stage == 1 else 2) if index == 0 else 1
            activated = F.relu(_bn(out, state, f"{block}.bn1"))
            branch = F.conv2d(activated, state[f"{block}.conv1.weight"], stride=stride, padding=1)
            branch = F.conv2d(F.relu(_bn(branch, state, f"{block}.bn2")), state[f"{block}.conv2.weight"], padding=1)
            shortcut = out
            if f"{block}.convShortcut.weight" in state:
                shortcut = F.conv2d(activated, state[f"{block}.convShortcut.weight"], stride=stride)
            out = branch + shortcut
    out = F.relu(_bn(out, state, "bn1"))
    return F.linear(F.avg_pool2d(out, 8).flatten(1), state["fc.weight"], state["fc.bias"])


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_a_loaded_teacher_computes_the_fields_forward(tmp_path, name):
    state = field_state(name, 100, seed=3, dtype=torch.float64)
    path = save_as(tmp_path / "teacher.pth", state, "crd")
    model = create_model(name, 100).double()
    load_weights(model, path)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model.eval()(x)
    reference = (resnet_reference(state, RESNETS[name][0], x) if name in RESNETS
                 else wrn_reference(state, WRNS[name][0], x))
    assert torch.isfinite(reference).all() and reference.abs().max() > 1e-3
    torch.testing.assert_close(logits, reference, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- through the trainer and eval

def test_field_files_through_teacher_init_and_eval(tmp_path):
    """--teacher-checkpoint (a CRD file), --init-checkpoint (a DDP-prefixed one) and kdfast eval
    --checkpoint (an old kdfast WRN file) on a small RGB image folder."""
    from helpers import small_digits_folder

    from kdfast.config import resolve_config
    from kdfast.train import run_eval, train

    folder = small_digits_folder(tmp_path / "digits", size=16, per_class=4)
    teacher = save_as(tmp_path / "wrn_16_1.pth", field_state("wrn_16_1", 10, seed=5), "crd")
    initial = field_state("resnet8", 10, seed=6)
    init = save_as(tmp_path / "resnet8.pth", initial, "ddp")
    common = dict(data=str(folder), loader="torch", workers=0, image_size=16, batch_size=20, progress="none",
                  tensorboard=False, eval_every=0)
    train(resolve_config(**common, method="kd", teacher="wrn_16_1", teacher_checkpoint=str(teacher),
                         student="resnet8", init_checkpoint=str(init), epochs=1, lr=1e-12, output=str(tmp_path / "kd")),
          print_fn=lambda *_: None)
    trained = torch.load(tmp_path / "kd" / "model.pt", weights_only=True)
    for key, value in initial.items():  # started from the file (lr ≈ 0: only BN statistics move)
        if key.endswith(".weight") and value.dim() == 4:
            torch.testing.assert_close(trained[key], value, rtol=0, atol=1e-9)

    ckpt.save_state_dict(tmp_path / "old-wrn.pt", old_kdfast_names(field_state("wrn_16_1", 10, seed=7)))
    lines = []
    result = run_eval(resolve_config(**common, student="wrn_16_1", checkpoint=str(tmp_path / "old-wrn.pt")),
                      print_fn=lines.append)
    assert result["images"] > 0 and any("wrn_16_1 on" in line for line in lines)
    with pytest.raises(ValueError, match=r"checkpoint .*wrn_16_1.pth \(the state dict under its 'model' key, "
                                         r"epoch 240\) does not match the model"):
        run_eval(resolve_config(**common, student="wrn_16_2", checkpoint=str(teacher)))


def test_a_run_checkpointed_under_the_old_wrn_names_resumes(tmp_path):
    """--resume of a kdfast training checkpoint written before the WRN keys changed."""
    from kdfast.config import resolve_config
    from kdfast.train import train

    options = dict(student="wrn_16_1", epochs=1, batch_size=64, progress="none", tensorboard=False, eval_every=0,
                   output=str(tmp_path / "run"))
    train(resolve_config(**options), print_fn=lambda *_: None)
    [checkpoint] = ckpt.list_checkpoints(tmp_path / "run")
    state = ckpt.read_checkpoint_file(checkpoint)
    state["model"] = {re.sub(r"^(student\.block[123])\.layer\.", r"\1.", key): value
                      for key, value in state["model"].items()}
    assert any(key.startswith("student.block1.0.") for key in state["model"])
    step = int(checkpoint.stem.split("-")[1])
    checkpoint.unlink()
    ckpt.write_checkpoint(tmp_path / "run", state, step)
    lines = []
    summary = train(resolve_config(**{**options, "epochs": 2}, resume=True), print_fn=lines.append)
    assert summary["epochs"] == 2 and summary["steps"] == 2 * step
    assert any("resum" in line for line in lines)
