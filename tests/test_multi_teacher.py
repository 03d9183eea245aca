"""Several teachers: the trainer's --teacher repeated, --teacher-combine, --teacher-weights, the
TeacherEnsemble, and a teacher cache recording the combination."""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.cache import CacheError, CacheMismatchError, TeacherCache, build_cache, cache_info
from kdfast.config import add_config_arguments, resolve_config
from kdfast.data import make_loader
from kdfast.models import create_model
from kdfast.teachers import TeacherEnsemble
from kdfast.train import KDStep, Runtime, make_loaders, train
from helpers import random_teacher_file


def quiet(*_):
    pass


def weights(path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> dict:
    """Two digits teachers of different architectures, trained 2 epochs each (about 80–90 % top-1)."""
    files = {}
    for arch in ("mlp-128", "mlp-64"):
        folder = tmp_path_factory.mktemp(arch)
        train(resolve_config(student=arch, epochs=2, lr=0.05, seed=len(arch), progress="none", output=str(folder),
                             tensorboard=False), print_fn=quiet)
        files[arch] = folder / "model.pt"
    return files


def config(tmp_path, name="run", **values):
    base = dict(student="mlp-32", epochs=1, batch_size=64, lr=0.05, progress="none", eval_every=0,
                output=str(tmp_path / name), tensorboard=False)
    base.update(values)
    return resolve_config(**base)


def hand_combination(logits_list, weights, mode, tau):
    """The combination written out: Σ w_k t_k, or τ · log Σ w_k softmax(t_k / τ) (weights normalized)."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    if mode == "logits":
        return sum(wk * t.double() for wk, t in zip(w, logits_list)).float()
    mixed = sum(wk * torch.softmax(t.double() / tau, dim=1) for wk, t in zip(w, logits_list))
    return (tau * mixed.log()).float()


# ----------------------------------------------------------------------------- configuration

def test_repeated_flags_pair_teachers_with_checkpoints():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--method", "kd", "--teacher", "resnet20", "--teacher-checkpoint", "a.pt",
                              "--teacher", "wrn40_2", "--teacher-checkpoint", "b.pt", "--teacher-weights", "1", "3",
                              "--teacher-combine", "probabilities"])
    resolved = resolve_config(args)
    assert resolved.teacher == ["resnet20", "wrn40_2"] and resolved.teacher_checkpoint == ["a.pt", "b.pt"]
    assert resolved.teacher_weights == [1.0, 3.0] and resolved.teacher_combine == "probabilities"
    # A config file written when --teacher took one value still reads (as a list of one).
    single = resolve_config(method="kd", teacher="resnet20", teacher_checkpoint="a.pt")
    assert single.teacher == ["resnet20"] and single.teacher_checkpoint == ["a.pt"]


@pytest.mark.parametrize("values, message", [
    (dict(teacher=["a", "b"], teacher_checkpoint=["x"]), r"teacher_checkpoint must give one file per teacher"),
    (dict(teacher=["a", "b"], teacher_checkpoint=["x", "y"], teacher_weights=[1.0]),
     r"teacher_weights must give one weight per teacher \(2\), got 1"),
    (dict(teacher=["a", "b"], teacher_checkpoint=["x", "y"], teacher_weights=[0, 0]), r"must not all be 0"),
    (dict(teacher=["a", "b"], teacher_checkpoint=["x", "y"], teacher_weights=[-1, 2]), r"teacher_weights must be"),
    (dict(teacher=[], teacher_checkpoint=["x"]), r"teacher must be a non-empty list .*an empty list"),
    (dict(teacher=["a"], teacher_checkpoint=["x"], teacher_combine="mean"), r"teacher_combine must be one of"),
    (dict(method="ce", teacher_weights=[1.0]), r"teacher_combine and teacher_weights are read by the methods"),
    (dict(teacher_cache="somewhere", teacher_combine="logits"), r"recorded in a teacher cache"),
])
def test_bad_combinations_name_the_option(values, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(**{"method": "kd", **values})


# ----------------------------------------------------------------------------- the ensemble

@pytest.mark.parametrize("mode", ["logits", "probabilities"])
def test_ensemble_combines_its_teachers(mode):
    torch.manual_seed(0)
    models = [create_model(arch, 10, 1, 8).eval() for arch in ("mlp-64", "resnet8", "mlp-32")]
    images = torch.randn(16, 1, 8, 8)
    ensemble = TeacherEnsemble(models, [1.0, 0.0, 2.0], mode, temperature=3.0)
    assert ensemble.feature_dim == sum(m.feature_dim for m in models)
    with torch.no_grad():
        combined, features = ensemble(images)
        singles = [m(images) for m in models]
        expected_features = torch.cat([m.forward_features(images) for m in models], dim=1)
    torch.testing.assert_close(combined, hand_combination(singles, [1.0, 0.0, 2.0], mode, 3.0), rtol=1e-5, atol=1e-5)
    assert torch.equal(features, expected_features)
    ensemble.train()
    assert not any(m.training for m in ensemble.modules())  # the teachers' BatchNorm stays frozen
    assert not any(p.requires_grad for p in ensemble.parameters())


def test_one_teacher_ensemble_is_the_teacher_itself():
    torch.manual_seed(0)
    model = create_model("resnet8", 10, 1, 8).eval()
    images = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        logits, features = TeacherEnsemble([model], [5.0], "probabilities", 4.0)(images)
        assert torch.equal(logits, model(images)) and torch.equal(features, model.forward_features(images))


# ----------------------------------------------------------------------------- the trainer

def test_one_teacher_run_is_bitwise_the_single_teacher_run(tmp_path, teacher_files):
    """One teacher given with a weight and a combination trains exactly as before, and so does
    the same teacher given twice (the mean of equal logits is those logits, bit for bit)."""
    file = str(teacher_files["mlp-128"])
    plain = config(tmp_path, "plain", method="kd", teacher="mlp-128", teacher_checkpoint=file, epochs=2)
    train(plain, print_fn=quiet)
    variants = {
        "weighted": dict(teacher=["mlp-128"], teacher_checkpoint=[file], teacher_weights=[3.0],
                         teacher_combine="probabilities"),
        "twice": dict(teacher=["mlp-128", "mlp-128"], teacher_checkpoint=[file, file]),
    }
    expected = weights(Path(plain.output) / "model.pt")
    for name, values in variants.items():
        cfg = config(tmp_path, name, method="kd", epochs=2, **values)
        train(cfg, print_fn=quiet)
        state = weights(Path(cfg.output) / "model.pt")
        assert all(torch.equal(state[key], expected[key]) for key in expected), name


@pytest.mark.parametrize("mode", ["logits", "probabilities"])
@pytest.mark.parametrize("method", ["kd", "dist", "cmkd", "dkd"])
def test_two_teacher_step_is_the_loss_on_the_hand_combined_logits(tmp_path, teacher_files, method, mode):
    names = ["mlp-128", "mlp-64"]
    cfg = config(tmp_path, method=method, teacher=names, teacher_checkpoint=[str(teacher_files[n]) for n in names],
                 teacher_weights=[1.0, 3.0], teacher_combine=mode, dkd_warmup_epochs=0, backend="cpu")
    runtime = Runtime(0, 1, 0, torch.device("cpu"))
    loader, _ = make_loaders(cfg, runtime)
    step = KDStep(cfg, runtime, loader)
    images, labels, indices = next(iter(loader.iterate(0)))
    student = copy.deepcopy(step.model.student)
    teachers = [create_model(n, 10, 1, 8).eval() for n in names]
    for teacher, name in zip(teachers, names):
        teacher.load_state_dict(weights(teacher_files[name]))
    with torch.no_grad():
        combined = hand_combination([t(images) for t in teachers], [1.0, 3.0], mode, cfg.resolved_temperature())
    s = student(images)
    tau = cfg.resolved_temperature()
    expected = {
        "kd": lambda: kdfast.kd_loss(s, combined, tau, backend="torch"),
        "dist": lambda: kdfast.dist_loss(s, combined, tau, backend="torch"),
        "cmkd": lambda: kdfast.cmkd_loss(s, combined, None, tau, backend="torch"),
        "dkd": lambda: kdfast.dkd_loss(s, combined, labels, 1.0, 8.0, tau, backend="torch"),
    }[method]()
    terms = step(images, labels, indices, epoch=0)
    assert set(terms) == {"ce", method}
    torch.testing.assert_close(terms[method].detach(), expected.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(terms["ce"].detach(), F.cross_entropy(s, labels).detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["kd", "dist", "cmkd", "dkd", "pesf", "reskd"])
def test_every_teacher_method_trains_with_two_teachers(tmp_path, teacher_files, method):
    names = ["mlp-128", "mlp-64"]
    cfg = config(tmp_path, method=method, teacher=names, teacher_checkpoint=[str(teacher_files[n]) for n in names],
                 teacher_weights=[2.0, 1.0], epochs=2, eval_every=1, dkd_warmup_epochs=1)
    lines = []
    summary = train(cfg, print_fn=lines.append)
    assert summary["top1"] > 30 and summary["teacher"] == "mlp-128 + mlp-64"
    assert any("teacher mlp-128 + mlp-64 (mean of their logits, weights 2:1)" in line for line in lines)
    if method == "pesf":  # the adapter reads the two teachers' features side by side (128 + 64)
        adapter = weights(Path(cfg.output) / "adapter.pt")
        assert adapter["mlp.0.weight"].shape[1] == 128 + 64 and adapter["mlp.2.weight"].abs().sum() > 0


def test_a_teachers_bad_checkpoint_is_named(tmp_path, teacher_files):
    cfg = config(tmp_path, method="kd", teacher=["mlp-128", "mlp-32"],
                 teacher_checkpoint=[str(teacher_files["mlp-128"]), str(teacher_files["mlp-64"])])
    with pytest.raises(ValueError, match=r"teacher_checkpoint 2 \(mlp-32\)"):
        train(cfg, print_fn=quiet)


# ----------------------------------------------------------------------------- the cache

@pytest.fixture(scope="module")
def random_teachers(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("random-teachers")
    return {"resnet8": random_teacher_file(tmp, "resnet8", 1, 8), "mlp-32": random_teacher_file(tmp, "mlp-32", 1, 8)}


@pytest.mark.parametrize("mode", ["logits", "probabilities"])
def test_cache_records_the_combination(tmp_path, random_teachers, mode):
    names = ["resnet8", "mlp-32"]
    output = tmp_path / "cache"
    temperatures = [4.0] if mode == "probabilities" else [1.0, 4.0]
    build_cache("digits", names, [random_teachers[n] for n in names], output, epochs=1, top_k=10, seed=3,
                batch_size=64, values_dtype="float32", temperatures=temperatures, teacher_combine=mode,
                teacher_weights=[1, 3], progress="none")
    cache = TeacherCache.open(output, dataset="digits", num_classes=10, image_size=8, teacher=names)
    manifest = cache.manifest["teacher"]
    assert manifest["architecture"] == names and manifest["combine"] == mode and manifest["weights"] == [0.25, 0.75]
    assert len(manifest["checkpoint_sha256"]) == 2 and ("temperature" in manifest) == (mode == "probabilities")
    info = "\n".join(cache_info(output))
    assert "teacher: resnet8 from" in info and "teacher: mlp-32 from" in info
    assert f"teachers combined: resnet8 + mlp-32 (mean of their {mode}" in info and "weights 0.25:0.75" in info
    models = [create_model(n, 10, 1, 8).eval() for n in names]
    for model, name in zip(models, names):
        model.load_state_dict(weights(random_teachers[name]))
    loader = make_loader("digits", "train", batch_size=100, seed=3)
    images, _, indices = next(iter(loader))
    with torch.no_grad():
        expected = hand_combination([m(images) for m in models], [1, 3], mode, 4.0)
    stored = cache.read(0, indices).teacher.dense(4.0)
    # k = C: the stored row is the combination; "probabilities" mode's logits are defined up
    # to a per-row constant (τ · log q), which the softmax at τ does not see.
    torch.testing.assert_close(torch.softmax(stored / 4.0, 1), torch.softmax(expected / 4.0, 1), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(CacheMismatchError, match=r"teacher: cache \['resnet8', 'mlp-32'\], expected \['resnet8'\]"):
        TeacherCache.open(output, teacher="resnet8")


def test_cache_refuses_probabilities_at_several_temperatures(tmp_path, random_teachers):
    names = ["resnet8", "mlp-32"]
    with pytest.raises(CacheError, match=r"give exactly one temperature"):
        build_cache("digits", names, [random_teachers[n] for n in names], tmp_path / "c", epochs=1, top_k=10,
                    temperatures=[1.0, 4.0], teacher_combine="probabilities", progress="none")
    with pytest.raises(CacheError, match=r"teacher_checkpoint must give one file per teacher"):
        build_cache("digits", names, [random_teachers["resnet8"]], tmp_path / "c", epochs=1, top_k=10,
                    progress="none")
    with pytest.raises(CacheError, match=r"teacher_weights must be 2 non-negative numbers"):
        build_cache("digits", names, [random_teachers[n] for n in names], tmp_path / "c", epochs=1, top_k=10,
                    teacher_weights=[1, math.nan], progress="none")


def test_training_from_a_combined_cache(tmp_path, random_teachers):
    names = ["resnet8", "mlp-32"]
    output = tmp_path / "cache"
    build_cache("digits", names, [random_teachers[n] for n in names], output, epochs=1, top_k=10, seed=0,
                batch_size=64, temperatures=[4.0], teacher_combine="probabilities", progress="none")
    cfg = config(tmp_path, method="kd", teacher_cache=str(output), teacher=names, temperature=4.0)
    lines = []
    summary = train(cfg, print_fn=lines.append)
    assert summary["teacher"] == "resnet8 + mlp-32 (mean of their probabilities at τ = 4, weights 0.5:0.5)"
    assert any("from cache" in line and "resnet8 + mlp-32" in line for line in lines)
    with pytest.raises(ValueError, match=r"combined at τ = 4, which a loss reads only at that temperature"):
        train(config(tmp_path, "other", method="kd", teacher_cache=str(output), temperature=1.0), print_fn=quiet)


def test_cli_cache_build_takes_several_teachers(tmp_path, random_teachers, capsys):
    from kdfast.cli import main as cli_main

    output = tmp_path / "cache"
    assert cli_main(["cache", "build", "--teacher", "resnet8", "--teacher-checkpoint", str(random_teachers["resnet8"]),
                     "--teacher", "mlp-32", "--teacher-checkpoint", str(random_teachers["mlp-32"]),
                     "--teacher-weights", "2", "1", "--epochs", "1", "--top-k", "3", "--output", str(output),
                     "--progress", "none"]) == 0
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["teacher"]["architecture"] == ["resnet8", "mlp-32"]
    assert np.allclose(manifest["teacher"]["weights"], [2 / 3, 1 / 3])
    assert "teachers combined: resnet8 + mlp-32 (mean of their logits, weights" in capsys.readouterr().out
