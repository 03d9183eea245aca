"""The trainer: models, checkpoints, configuration, every method, kill-and-resume, DDP on gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdfast import checkpoint as ckpt
from kdfast.config import TrainConfig, add_config_arguments, read_config_file, resolve_config
from kdfast.models import create_model, load_weights
from kdfast.train import Schedule, train

ROOT = Path(__file__).resolve().parents[1]


def quiet(*_):
    pass


def run_cli(*args, cwd, timeout=240, **popen):
    """``python -m kdfast ARGS`` in a subprocess (one thread: results are reproducible)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "kdfast", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)


def weights(path) -> dict:
    return torch.load(path, weights_only=True)


def config(tmp_path, **values) -> TrainConfig:
    base = dict(student="mlp-32", epochs=1, batch_size=64, lr=0.05, progress="none", eval_every=0,
                output=str(tmp_path / values.pop("name", "run")), tensorboard=False)
    base.update(values)
    return resolve_config(**base)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """An MLP teacher trained for 3 epochs on the digits (about 80 % top-1)."""
    folder = tmp_path_factory.mktemp("teacher")
    train(resolve_config(student="mlp-128", epochs=3, lr=0.05, progress="none", output=str(folder),
                         tensorboard=False), print_fn=quiet)
    return folder / "model.pt"


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("name, classes, parameters, keys", [
    # torchvision's parameter and state-dict key counts (num_batches_tracked included)
    ("resnet18", 1000, 11_689_512, 122), ("resnet34", 1000, 21_797_672, 218), ("resnet50", 1000, 25_557_032, 320),
    # the CRD / RepDistiller CIFAR-100 models' published sizes
    ("resnet8x4", 100, 1_233_540, None), ("resnet32x4", 100, 7_433_860, None), ("resnet20", 100, 278_324, None),
    ("resnet56", 100, 861_620, None), ("resnet110", 100, 1_736_564, None), ("wrn_40_2", 100, 2_255_156, None),
    ("wrn_16_2", 100, 703_284, None),
])
def test_zoo_sizes(name, classes, parameters, keys):
    model = create_model(name, classes)
    assert sum(p.numel() for p in model.parameters()) == parameters
    if keys is not None:
        assert len(model.state_dict()) == keys


def test_resnet_keys_match_torchvision():
    """A sample of torchvision's key names and shapes (resnet18 and the bottleneck of resnet50)."""
    r18 = create_model("resnet18", 1000).state_dict()
    expected = {"conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,), "layer1.0.conv1.weight": (64, 64, 3, 3),
                "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer2.0.downsample.1.weight": (128,),
                "layer4.1.bn2.bias": (512,), "fc.weight": (1000, 512), "fc.bias": (1000,)}
    for key, shape in expected.items():
        assert tuple(r18[key].shape) == shape, key
    r50 = create_model("resnet50", 1000).state_dict()
    assert tuple(r50["layer1.0.conv3.weight"].shape) == (256, 64, 1, 1)
    assert tuple(r50["layer3.5.bn3.num_batches_tracked"].shape) == ()
    assert tuple(r50["fc.weight"].shape) == (1000, 2048)


@pytest.mark.parametrize("name", ["resnet8", "resnet8x4", "wrn_16_2", "mlp-16-8", "resnet18"])
def test_zoo_forward(name):
    size = 32 if name == "resnet18" else 8
    model = create_model(name, 7, in_channels=1, image_size=size).eval()
    x = torch.randn(3, 1, size, size)
    features = model.forward_features(x)
    assert features.shape == (3, model.feature_dim)
    torch.testing.assert_close(model(x), model.fc(features))


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'resnet19'"):
        create_model("resnet19", 10)
    with pytest.raises(ValueError, match="depth must be 6n"):
        create_model("wrn_15_2", 10)


def test_load_weights_like_a_torchvision_file(tmp_path):
    """Plain state dicts load, with DDP/compile prefixes and without BN step counters; a wrong file is named."""
    source = create_model("resnet18", 10)
    state = {f"module.{k}": v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "resnet18.pth")
    target = create_model("resnet18", 10)
    load_weights(target, tmp_path / "resnet18.pth")
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(target.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"teacher checkpoint .* does not match the model: 80 missing keys \['layer1.2"):
        load_weights(create_model("resnet34", 10), tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match=r"2 mis-shaped \['fc.weight \(10, 512\) \(expected \(5, 512\)\)"):
        load_weights(create_model("resnet18", 5), tmp_path / "resnet18.pth")


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_roundtrip_and_pruning(tmp_path):
    for step in (3, 6, 9):
        ckpt.write_checkpoint(tmp_path, {"step": step, "w": torch.full((4,), float(step))}, step, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-000000009.pt", "checkpoint-000000006.pt"]
    path, state = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "checkpoint-000000009.pt" and state["step"] == 9 and torch.equal(state["w"], torch.full((4,), 9.0))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_damaged_checkpoint_is_reported_and_skipped(tmp_path, damage, caplog):
    ckpt.write_checkpoint(tmp_path, {"step": 1}, 1)
    newest = ckpt.write_checkpoint(tmp_path, {"step": 2, "w": torch.arange(1000.0)}, 2)
    data = newest.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "flip": data[:-100] + bytes([data[-100] ^ 1]) + data[-99:],
               "empty": b"", "garbage": b"not a checkpoint at all"}[damage]
    newest.write_bytes(damaged)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-000000002.pt (is truncated or damaged|is not a read)"):
        ckpt.read_checkpoint_file(newest)
    path, state = ckpt.latest_checkpoint(tmp_path)
    assert state["step"] == 1 and path.name == "checkpoint-000000001.pt"
    assert "using the previous checkpoint" in caplog.text


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.read_checkpoint_file(tmp_path / "nope.pt")
    assert ckpt.latest_checkpoint(tmp_path / "nowhere") is None


# ----------------------------------------------------------------------------- configuration

def test_config_file_and_command_line(tmp_path):
    (tmp_path / "run.yaml").write_text("method: kd\nteacher: mlp-128\nteacher_checkpoint: t.pt\nepochs: 7\nlr: 0.2\n")
    (tmp_path / "run.json").write_text(json.dumps({"method": "dist", "teacher": "x", "teacher-checkpoint": "t.pt"}))
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    resolved = resolve_config(parser.parse_args(["--config", str(tmp_path / "run.yaml"), "--epochs", "9"]))
    assert (resolved.method, resolved.epochs, resolved.lr) == ("kd", 9, 0.2)  # the command line wins
    assert resolved.resolved_temperature() == 4.0
    assert resolve_config(parser.parse_args(["--config", str(tmp_path / "run.json")])).resolved_temperature() == 1.0
    (tmp_path / "bad.yaml").write_text("epoch: 3\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['epoch'\]"):
        read_config_file(tmp_path / "bad.yaml")


@pytest.mark.parametrize("values, message", [
    (dict(method="kd"), "method 'kd' needs a teacher"),
    (dict(method="cmkd", teacher="mlp-8"), "needs teacher_checkpoint"),
    (dict(schedule="step"), "needs --milestones"),
    (dict(lr=0.0), "lr must be a positive number"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(kd_weight=-1.0), "kd_weight must be a number >= 0"),
    (dict(method="fitnet"), "method must be one of"),
])
def test_config_errors(values, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(**values)


def test_schedule():
    steps = 10
    cosine = Schedule(resolve_config(epochs=4, warmup_epochs=1), steps)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(10) == pytest.approx(1.0) and cosine(25) == pytest.approx(0.5) and cosine(40) == pytest.approx(0.0)
    step = Schedule(resolve_config(epochs=4, schedule="step", milestones=[2, 3], lr_decay=0.1), steps)
    assert [step(s) for s in (0, 19, 20, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


# ----------------------------------------------------------------------------- methods

@pytest.mark.parametrize("method", ["ce", "kd", "dist", "cmkd", "drkd", "pesf"])
def test_every_method_trains(tmp_path, teacher_file, method):
    cfg = config(tmp_path, method=method, teacher="mlp-128", teacher_checkpoint=str(teacher_file), epochs=2,
                 log_every=5, eval_every=1)
    teacher_before = weights(teacher_file)
    summary = train(cfg, print_fn=quiet)
    folder = Path(cfg.output)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 2 and summary["top1"] == evals[-1]["top1"] and summary["top1"] > 30
    expected_terms = {"ce": {"ce"}, "kd": {"ce", "kd"}, "dist": {"ce", "dist"}, "cmkd": {"ce", "cmkd"},
                      "drkd": {"ce", "drkd"}, "pesf": {"ce", "kd", "adapter"}}[method]
    for record in trains:
        assert set(record["terms"]) == expected_terms
        assert record["loss"] == pytest.approx(sum(record["terms"].values()), rel=1e-6)
        assert record["images_per_s"] > 0 and record["data_wait_s"] >= 0 and record["compute_s"] > 0
    if method == "drkd":  # the first epoch is plain CE: no previous-epoch logits yet
        assert all(r["terms"]["drkd"] == 0 for r in trains if r["epoch"] == 0)
        assert all(r["terms"]["drkd"] > 0 for r in trains if r["epoch"] == 1)
    if method == "pesf":  # the adapter trained (its last layer starts at zero)
        adapter = weights(folder / "adapter.pt")
        assert adapter["mlp.2.weight"].abs().sum() > 0
    for key, value in weights(teacher_file).items():  # the teacher stays frozen
        assert torch.equal(value, teacher_before[key])
    saved = read_config_file(folder / "config.yaml")
    assert saved["method"] == method and saved["epochs"] == 2


def test_divergence_is_an_error_not_a_nan_model(tmp_path):
    cfg = config(tmp_path, student="mlp-32", lr=1e12, log_every=2)
    with pytest.raises(FloatingPointError, match=r"training diverged at step \d+ \(epoch 1\).*lower --lr"):
        train(cfg, print_fn=quiet)
    assert not (Path(cfg.output) / "model.pt").exists()


def test_bf16_autocast_and_channels_last(tmp_path, teacher_file):
    cfg = config(tmp_path, student="resnet8", method="cmkd", teacher="mlp-128", teacher_checkpoint=str(teacher_file),
                 amp="bf16", channels_last=True, optimizer="adamw", lr=3e-3, epochs=4)
    summary = train(cfg, print_fn=quiet)
    assert summary["top1"] > 60 and torch.isfinite(torch.tensor(summary["val_loss"]))
    state = weights(Path(cfg.output) / "model.pt")
    assert all(value.dtype in (torch.float32, torch.int64) for value in state.values())  # fp32 master weights


def test_eval_command_matches_training_summary(tmp_path):
    cfg = config(tmp_path, student="mlp-32", epochs=2)
    summary = train(cfg, print_fn=quiet)
    result = run_cli("eval", "--student", "mlp-32", "--checkpoint", Path(cfg.output) / "model.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"top-1 {summary['top1']:.2f}%" in result.stdout
    bad = run_cli("eval", "--student", "resnet8", "--checkpoint", Path(cfg.output) / "model.pt", cwd=tmp_path)
    assert bad.returncode == 2 and "does not match the model" in bad.stderr


# ----------------------------------------------------------------------------- faults and processes

def test_kill_and_resume_reaches_the_same_weights(tmp_path):
    """SIGKILL in the middle of an epoch, --resume, and the run ends with the uninterrupted run's weights.

    DR-KD, so that the per-sample logit bank must survive the restart too; then the newest
    checkpoint is damaged and the run resumes from the previous one, again to the same end.
    """
    options = ["train", "--student", "resnet8", "--method", "drkd", "--epochs", "3", "--deterministic",
               "--threads", "1", "--eval-every", "0", "--checkpoint-every", "7", "--keep-checkpoints", "3",
               "--log-every", "1", "--progress", "lines", "--no-tensorboard"]
    reference = run_cli(*options, "--output", "uninterrupted", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "kdfast", *options, "--output", "killed"], cwd=tmp_path,
                               env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in process.stderr:  # 19 steps per epoch: step 30 is in the middle of the second epoch
        if "step 30/57 " in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed = tmp_path / "killed"
    assert not (killed / "model.pt").exists(), "the run finished before the kill"
    newest = ckpt.latest_checkpoint(killed)[1]
    assert newest["epoch"] == 1 and 0 < newest["batch"] < 19  # a mid-epoch position to resume from

    resumed = run_cli(*options, "--output", "killed", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    step = newest["step"]  # 28 unless the run got past step 35 before the signal landed
    assert f"resumed from killed/checkpoint-{step:09d}.pt (epoch 2, batch {step - 19}, step {step})" in resumed.stdout
    expected = weights(tmp_path / "uninterrupted" / "model.pt")
    for key, value in weights(killed / "model.pt").items():
        assert torch.equal(value, expected[key]), key

    # A damaged newest checkpoint: reported, and the previous one is used.
    (killed / "model.pt").unlink()
    newest_path = ckpt.list_checkpoints(killed)[0]
    newest_path.write_bytes(newest_path.read_bytes()[:1000])
    again = run_cli(*options, "--output", "killed", "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "is truncated or damaged" in again.stdout + again.stderr
    assert "using the previous checkpoint" in again.stdout + again.stderr
    for key, value in weights(killed / "model.pt").items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("method", ["kd", "drkd"])
def test_two_gloo_processes_match_one(tmp_path, teacher_file, method):
    """torchrun, 2 CPU processes × 32 images = 1 process × 64: the same weights (BatchNorm-free models)."""
    options = ["--student", "mlp-32", "--method", method, "--teacher", "mlp-128", "--teacher-checkpoint", teacher_file,
               "--epochs", "2", "--lr", "0.05", "--eval-every", "0", "--progress", "none", "--no-tensorboard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "kdfast", "train", *map(str, options), "--batch-size", "32", "--output", "two"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es) on cpu" in two.stdout
    one = run_cli("train", *options, "--batch-size", "64", "--output", "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    expected = weights(tmp_path / "one" / "model.pt")
    for key, value in weights(tmp_path / "two" / "model.pt").items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)


def test_example_imagenet_config_resolves():
    """The SLURM example's config is valid (its paths are placeholders for a cluster)."""
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    resolved = resolve_config(parser.parse_args(["--config", str(ROOT / "examples" / "imagenet_cmkd.yaml")]))
    assert (resolved.student, resolved.teacher, resolved.method, resolved.amp) == ("resnet18", ["resnet34"], "cmkd", "bf16")
    assert "examples/imagenet_cmkd.yaml" in (ROOT / "examples" / "slurm_imagenet.sbatch").read_text()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["cmkd", "drkd", "pesf"])
def test_train_on_gpu(tmp_path, teacher_file, method):
    """A CUDA run with bf16 autocast and channels_last (the fused CUDA/Triton losses inside)."""
    cfg = config(tmp_path, student="resnet8", method=method, teacher="mlp-128", teacher_checkpoint=str(teacher_file),
                 device="cuda", amp="bf16", channels_last=True, epochs=3)
    summary = train(cfg, print_fn=quiet)
    assert summary["device"] == "cuda" and summary["top1"] > 50


def test_compiled_run_matches_eager(tmp_path, teacher_file):
    """--compile (torch.compile of the student step and the teacher) trains to the eager weights."""
    common = dict(student="mlp-32", method="kd", teacher="mlp-128", teacher_checkpoint=str(teacher_file), epochs=1)
    train(config(tmp_path, name="eager", **common), print_fn=quiet)
    train(config(tmp_path, name="compiled", compile=True, **common), print_fn=quiet)
    expected = weights(tmp_path / "eager" / "model.pt")
    for key, value in weights(tmp_path / "compiled" / "model.pt").items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5)
