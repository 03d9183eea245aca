"""The trainer's hardening (issue 12, items 4-10 and 15): --exclude, one option schema for every
source, resume rules, checkpoint selection, the run folder's lock, metrics and summary after a
resume, checkpoints as weights, and --dist-timeout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kdfast.config
from kdfast import checkpoint as ckpt
from kdfast.config import resolve_config
from kdfast.models import create_model, load_weights
from kdfast.train import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
LOCK = ".kdfast.lock"  # the run folder's lock file (kdfast.checkpoint.RunLock.NAME)


def quiet(*_):
    pass


def run_cli(*args, cwd, timeout=240):
    return subprocess.run([sys.executable, "-m", "kdfast", *map(str, args)], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def options(folder, **values) -> dict:
    base = dict(student="mlp-32", epochs=1, batch_size=64, lr=0.05, progress="none", eval_every=0,
                tensorboard=False, output=str(folder))
    base.update(values)
    return base


def run(folder, **values) -> dict:
    return train(resolve_config(**options(folder, **values)), print_fn=quiet)


def weights(path) -> dict:
    return torch.load(path, weights_only=True)


def records(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory) -> Path:
    """A quickly trained mlp-64 (a teacher file for the methods that need one)."""
    folder = tmp_path_factory.mktemp("teacher")
    run(folder, student="mlp-64", epochs=2)
    return folder / "model.pt"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """An mlp-32 ce run of 2 epochs, checkpointed every 7 steps (all kept): 7 14 19 21 28 35 38."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    run(folder, epochs=2, checkpoint_every=7, keep_checkpoints=20, log_every=1, eval_every=1)
    return folder


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (target / LOCK).unlink(missing_ok=True)
    return target


# ----------------------------------------------------------------------------- 4: --exclude

def test_exclude_flag_and_key_reach_the_loaders(tmp_path):
    """`kdfast train/eval --exclude FILE` and the `exclude` key leave the listed images out of both splits."""
    from kdfast.data import write_digits_folder

    data = tmp_path / "digits"
    write_digits_folder(data, size=8)
    bad = sorted((data / "train").rglob("*.jpg"))[:5] + sorted((data / "val").rglob("*.jpg"))[:3]
    (tmp_path / "bad.txt").write_text("".join(f"{path}\n" for path in bad))
    common = ["--data", data, "--loader", "torch", "--workers", "0", "--student", "mlp-32", "--epochs", "1",
              "--progress", "none", "--no-tensorboard", "--eval-every", "0"]
    result = run_cli("train", *common, "--exclude", tmp_path / "bad.txt", "--output", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1252 train / 537 val images" in result.stdout
    (tmp_path / "options.yaml").write_text(f"exclude: {tmp_path / 'bad.txt'}\n")
    # eval takes the options it reads (data, loader, workers, student …), not the training ones.
    evaluated = run_cli("eval", *common[:8], "--config", tmp_path / "options.yaml", "--checkpoint", "run/model.pt",
                        cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "(537 images;" in evaluated.stdout
    missing = run_cli("train", *common, "--exclude", "nope.txt", "--output", "run2", cwd=tmp_path)
    assert missing.returncode == 2 and "exclude file nope.txt does not exist" in missing.stderr
    assert "--exclude" in run_cli("train", "--help", cwd=tmp_path).stdout


def test_exclude_is_passed_to_every_loader(tmp_path, monkeypatch):
    import kdfast.data

    seen = []
    real = kdfast.data.make_loader

    def spy(data, split="train", **kwargs):
        seen.append((split, kwargs.get("exclude")))
        return real(data, split, **{k: v for k, v in kwargs.items() if k != "exclude"})

    monkeypatch.setattr(kdfast.data, "make_loader", spy)
    listing = tmp_path / "bad.txt"
    listing.write_text("")
    run(tmp_path / "run", exclude=str(listing))
    assert seen == [("train", str(listing)), ("val", str(listing))]


# ----------------------------------------------------------------------------- 5: one schema

@pytest.mark.parametrize("text, message", [
    ("optimizer: lbfgs", r"optimizer must be one of 'sgd', 'adamw', got 'lbfgs'"),
    ("schedule: linear", r"schedule must be one of 'cosine', 'step', 'constant', got 'linear'"),
    ('nesterov: "no"', r"nesterov must be true or false, got 'no' \(a string"),
    ("checkpoint_every: 0.5", r"checkpoint_every must be an integer >= 0, got 0.5"),
    ("momentum: 5", r"momentum must be a number in \[0, 1\), got 5"),
    ("threads: 0", r"threads must be a positive integer or null \(the default\), got 0"),
    ("threads: -2", r"threads must be a positive integer .*, got -2"),
    ('lr: "0.1"', r"lr must be a positive number, got '0.1' \(a string"),
    ("amp: fp8", r"amp must be one of 'none', 'bf16', 'fp16', got 'fp8'"),
    ("milestones: 1", r"milestones must be a list of positive integers, got 1"),
    ("weight_decay: 1e-4", r"weight_decay must be a number >= 0, got '1e-4' \(a string: YAML reads"),
    ("epochs: true", r"epochs must be a positive integer, got True"),
    ("dist_timeout: 0", r"dist_timeout must be a positive number, got 0"),
    ("temperature: 1000", r"temperature must be a number in \(0, 100\] or null \(the default\), got 1000"),
])
def test_config_file_values_are_validated(tmp_path, text, message):
    """Every value of a --config file is checked (type, choices, range), naming option, value and file."""
    import argparse

    from kdfast.config import add_config_arguments

    (tmp_path / "bad.yaml").write_text(text + "\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    with pytest.raises(ValueError, match=message + r".*in config file .*bad.yaml"):
        resolve_config(parser.parse_args(["--config", str(tmp_path / "bad.yaml")]))


def test_bad_config_file_fails_before_writing_anything(tmp_path):
    (tmp_path / "bad.yaml").write_text("optimizer: lbfgs\nstudent: mlp-32\n")
    result = run_cli("train", "--config", "bad.yaml", "--output", "run", "--progress", "none", cwd=tmp_path)
    assert result.returncode == 2
    assert "kdfast: error: optimizer must be one of 'sgd', 'adamw', got 'lbfgs' (in config file bad.yaml)" in \
        result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("flags, message", [
    (["--momentum", "5"], r"momentum must be a number in \[0, 1\), got 5.0 \(--momentum on the command line\)"),
    (["--threads", "0"], r"threads must be a positive integer"),
    (["--checkpoint-every", "-1"], r"checkpoint_every must be an integer >= 0"),
    (["--nesterov", "--optimizer", "adamw"], r"nesterov is an SGD option"),
    (["--milestones", "3", "--schedule", "cosine"], r"only read by the step schedule"),
])
def test_command_line_values_are_validated(tmp_path, flags, message):
    import argparse
    import re

    from kdfast.config import add_config_arguments

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    with pytest.raises(ValueError, match=message):
        resolve_config(parser.parse_args(flags))
    result = run_cli("train", *flags, "--output", "run", cwd=tmp_path)
    assert result.returncode == 2 and re.search(message, result.stderr), result.stderr


def test_yaml_booleans_and_python_values(tmp_path):
    (tmp_path / "ok.yaml").write_text("nesterov: no\nmomentum: 0\nlr: 1\nmilestones: [2, 3]\nschedule: step\n")
    import argparse

    from kdfast.config import add_config_arguments

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    resolved = resolve_config(parser.parse_args(["--config", str(tmp_path / "ok.yaml")]))
    assert resolved.nesterov is False and resolved.lr == 1.0 and isinstance(resolved.lr, float)
    assert resolved.milestones == [2, 3]
    assert resolve_config(output=tmp_path / "x").output == str(tmp_path / "x")  # a Path is a path
    with pytest.raises(ValueError, match=r"unknown option 'epoch'"):
        resolve_config(epoch=3)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 4294967295\], got -1"):
        resolve_config(seed=-1)


def test_run_folder_config_is_validated_on_resume(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("student: mlp-32\nmomentum: 5\n")
    result = run_cli("train", "--resume", "--output", folder, cwd=tmp_path)
    assert result.returncode == 2
    assert "momentum must be a number in [0, 1), got 5 (in the run folder's config file" in result.stderr


def test_every_option_has_a_checked_specification():
    from kdfast.config import TrainConfig

    options = kdfast.config.OPTIONS
    for name, option in options.items():
        assert option.check(option.default) == option.default, name
    assert set(kdfast.config.RESUME_MAY_CHANGE) <= set(options)
    config = TrainConfig()
    config.momentum = 5.0  # a TrainConfig built in Python goes through the same checks in train()
    with pytest.raises(ValueError, match="momentum must be"):
        train(config, print_fn=quiet)


# ----------------------------------------------------------------------------- 6: resume rules

@pytest.mark.parametrize("change, named", [
    (dict(student="mlp-16"), "--student mlp-32 → mlp-16"),
    (dict(method="drkd"), "--method ce → drkd"),
    (dict(optimizer="adamw"), "--optimizer sgd → adamw"),
    (dict(method="pesf", teacher="mlp-64", teacher_checkpoint="TEACHER"), "--method ce → pesf"),
    (dict(method="kd", teacher="mlp-64", teacher_checkpoint="TEACHER"), "--method ce → kd"),
    (dict(batch_size=16), "--batch-size 64 → 16"),
    (dict(lr=0.2, seed=3), "--lr 0.05 → 0.2, --seed 0 → 3"),
])
def test_resume_refuses_a_changed_run(tmp_path, finished_run, small_teacher, change, named):
    """A resume that would change the run's meaning stops before writing anything, naming each change;
    the next plain --resume (a requeued job) still works."""
    folder = copy_run(finished_run, tmp_path / "run")
    (folder / "model.pt").unlink()
    before = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    change = {k: (str(small_teacher) if v == "TEACHER" else v) for k, v in change.items()}
    with pytest.raises(ValueError, match="--resume would change the run") as error:
        train(resolve_config(output=str(folder), resume=True, **change), print_fn=quiet)
    assert named in str(error.value) and "--epochs" in str(error.value)  # the changes, then what may change
    after = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file() and path.name != LOCK}
    assert after == {k: v for k, v in before.items() if k != LOCK}  # config.yaml untouched
    summary = train(resolve_config(output=str(folder), resume=True), print_fn=quiet)
    assert summary["steps"] == 38


def test_resume_refusal_on_the_command_line(tmp_path, finished_run):
    folder = copy_run(finished_run, tmp_path / "run")
    config_before = (folder / "config.yaml").read_bytes()
    result = run_cli("train", "--resume", "--student", "mlp-16", "--output", folder, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--student mlp-32 → mlp-16" in result.stderr and "nothing was written" in result.stderr
    assert (folder / "config.yaml").read_bytes() == config_before
    again = run_cli("train", "--resume", "--output", folder, cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_resume_may_change_epochs_and_logging(tmp_path, finished_run):
    folder = copy_run(finished_run, tmp_path / "run")
    summary = train(resolve_config(output=str(folder), resume=True, epochs=3, log_every=5, eval_every=0,
                                   checkpoint_every=0, keep_checkpoints=3, progress="none"), print_fn=quiet)
    assert summary["steps"] == 57 and summary["epochs"] == 3
    saved = resolve_config(output=str(folder), resume=True)
    assert (saved.epochs, saved.log_every) == (3, 5)  # config.yaml records the resumed run's options


def test_resume_with_the_same_config_file(tmp_path, finished_run):
    """The SLURM example's pattern: the same --config on every (re)start, with --resume."""
    folder = copy_run(finished_run, tmp_path / "run")
    import yaml

    (tmp_path / "same.yaml").write_text(yaml.safe_dump(resolve_config(output=str(folder), resume=True).to_dict()))
    result = run_cli("train", "--config", tmp_path / "same.yaml", "--resume", "--output", folder, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (tmp_path / "other.yaml").write_text((tmp_path / "same.yaml").read_text().replace("lr: 0.05", "lr: 0.5"))
    refused = run_cli("train", "--config", tmp_path / "other.yaml", "--resume", "--output", folder, cwd=tmp_path)
    assert refused.returncode == 2 and "--lr 0.05 → 0.5" in refused.stderr


# ----------------------------------------------------------------------------- 7: checkpoint selection

def test_foreign_newest_checkpoint_falls_back(tmp_path, finished_run, caplog):
    """A valid checkpoint of another model, or a plain state dict named like a checkpoint, is skipped."""
    folder = copy_run(finished_run, tmp_path / "run")
    other = tmp_path / "other"
    run(other, student="mlp-16")
    shutil.copy(ckpt.list_checkpoints(other)[0], folder / "checkpoint-000000099.pt")
    torch.save(weights(folder / "model.pt"), folder / "checkpoint-000000098.pt")
    summary = train(resolve_config(output=str(folder), resume=True, epochs=3, eval_every=0), print_fn=quiet)
    assert summary["steps"] == 57
    assert "checkpoint-000000099.pt is of another model: student mlp-16 (this run: mlp-32)" in caplog.text
    assert "checkpoint-000000098.pt is not a kdfast training checkpoint: a plain state dict" in caplog.text


def test_no_usable_checkpoint_stops_unless_allowed(tmp_path, finished_run):
    folder = copy_run(finished_run, tmp_path / "run")
    (folder / "model.pt").unlink()
    for path in ckpt.list_checkpoints(folder):
        path.write_bytes(path.read_bytes()[:500])
    config_before, metrics_before = (folder / "config.yaml").read_bytes(), (folder / "metrics.jsonl").read_bytes()
    result = run_cli("train", "--resume", "--output", folder, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "none of the 7 checkpoint(s)" in result.stderr and "--allow-restart" in result.stderr
    for step in (7, 14, 19, 21, 28, 35, 38):  # each file, with its reason
        assert f"\n  - checkpoint {folder}/checkpoint-{step:09d}.pt is truncated or damaged" in result.stderr
    assert (folder / "config.yaml").read_bytes() == config_before
    assert (folder / "metrics.jsonl").read_bytes() == metrics_before
    assert not (folder / "model.pt").exists()

    restarted = run_cli("train", "--resume", "--allow-restart", "--output", folder, cwd=tmp_path)
    assert restarted.returncode == 0, restarted.stderr
    assert "starting from the beginning" in restarted.stdout
    assert len(list(folder.glob("checkpoint-*.pt.unusable"))) == 7
    assert [r["step"] for r in records(folder) if r["kind"] == "train"] == list(range(1, 39))


def test_orphaned_temporary_files_are_removed(tmp_path, finished_run):
    folder = copy_run(finished_run, tmp_path / "run")
    orphans = [folder / ".checkpoint-000000042.pt.k3j4h5.tmp", folder / ".model.pt.abcdef.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"half a checkpoint")
    keep = folder / "notes.tmp"
    keep.write_text("the user's")
    train(resolve_config(output=str(folder), resume=True), print_fn=quiet)
    assert not any(orphan.exists() for orphan in orphans) and keep.exists()


def test_fresh_run_sets_the_earlier_runs_checkpoints_aside(tmp_path, finished_run):
    folder = copy_run(finished_run, tmp_path / "run")
    summary = run(folder, epochs=1, checkpoint_every=0)
    assert summary["steps"] == 19
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["checkpoint-000000019.pt"]
    assert len(list(folder.glob("checkpoint-*.pt.old"))) == 7
    assert [r["step"] for r in records(folder) if r["kind"] == "train"] == [19]  # no records of the earlier run


# ----------------------------------------------------------------------------- 8: the run folder's lock

def _start_long_run(folder: Path, cwd: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "kdfast", "train", "--student", "mlp-32", "--epochs", "500",
                                "--progress", "lines", "--log-every", "1", "--eval-every", "0", "--no-tensorboard",
                                "--output", str(folder)], cwd=cwd, env=ENV, stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True)
    for line in process.stderr:
        if "step 2/" in line:
            return process
    raise AssertionError(f"the run did not start: rc {process.wait()}")


def test_second_run_on_one_folder_is_refused(tmp_path):
    folder = tmp_path / "run"
    first = _start_long_run(folder, tmp_path)
    try:
        second = run_cli("train", "--student", "mlp-32", "--epochs", "1", "--output", folder, cwd=tmp_path)
        assert second.returncode == 2, second.stderr
        assert (f"run folder {folder} is in use by another kdfast run (pid {first.pid} on host "
                f"{socket.gethostname()}") in second.stderr
        resumed = run_cli("train", "--resume", "--output", folder, cwd=tmp_path)
        assert resumed.returncode == 2 and "is in use by another kdfast run" in resumed.stderr
        saved = resolve_config(output=str(folder), resume=True)
        assert saved.epochs == 500  # the second run did not touch the first one's config
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # SIGKILL released the lock: no stale lock to remove by hand.
    after = run_cli("train", "--resume", "--epochs", "1", "--output", folder, cwd=tmp_path)
    assert after.returncode == 0, after.stderr


def test_lock_of_a_dead_process_is_not_a_lock(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert run(folder)["steps"] == 19


def test_lock_waits_for_orphaned_children_of_a_dead_holder(tmp_path):
    """DataLoader workers forked by a killed run inherit its lock: the next run waits for them."""
    script = (f"import os, time, sys; sys.path.insert(0, {str(ROOT)!r}); from kdfast.checkpoint import RunLock\n"
              f"lock = RunLock({str(tmp_path)!r}).acquire()\n"
              "if os.fork() == 0:\n    null = os.open(os.devnull, os.O_RDWR); os.dup2(null, 1); os.dup2(null, 2)\n"
              "    time.sleep(4); os._exit(0)\n"
              "print('locked', flush=True); os._exit(0)\n")
    holder = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert holder.stdout.strip() == "locked"
    start = time.monotonic()
    with pytest.raises(ckpt.RunFolderBusy, match="processes it started still hold the lock"):
        ckpt.RunLock(tmp_path, stale_wait=0.5).acquire()
    lock = ckpt.RunLock(tmp_path, stale_wait=30).acquire()
    lock.release()
    assert time.monotonic() - start < 20


# ----------------------------------------------------------------------------- 9: metrics and summary

def test_metrics_have_each_step_once_after_a_resume(tmp_path, finished_run):
    """The records logged between the resumed checkpoint and the interruption are not repeated."""
    folder = copy_run(finished_run, tmp_path / "run")
    for name in ("checkpoint-000000035.pt", "checkpoint-000000038.pt", "model.pt", "summary.json"):
        (folder / name).unlink()  # as if killed after step 38's records, with step 28 the newest checkpoint
    with open(folder / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "epoch": 1, "st')  # a record cut by the kill
    summary = train(resolve_config(output=str(folder), resume=True), print_fn=quiet)
    steps = [r["step"] for r in records(folder) if r["kind"] == "train"]
    assert steps == list(range(1, 39))
    assert [r["step"] for r in records(folder) if r["kind"] == "eval"] == [19, 38]
    assert summary["steps"] == 38


def test_summary_is_consistent_after_resuming_past_the_end(tmp_path, finished_run):
    """Resumed with a smaller --epochs at a checkpoint after that end: best_top1 >= top1 and a real images/s."""
    folder = copy_run(finished_run, tmp_path / "run")
    (folder / "checkpoint-000000038.pt").unlink()  # newest: step 35, epoch 2 mid-way
    summary = train(resolve_config(output=str(folder), resume=True, epochs=1), print_fn=quiet)
    assert summary["steps"] == 35
    assert summary["best_top1"] >= summary["top1"] and summary["images_per_s"] > 0
    assert json.loads((folder / "summary.json").read_text()) == summary


# ----------------------------------------------------------------------------- 10: checkpoints as weights

def test_checkpoints_load_as_weights(tmp_path, finished_run):
    checkpoint_file = ckpt.list_checkpoints(finished_run)[0]  # step 38 = the final weights
    model = create_model("mlp-32", 10, in_channels=1, image_size=8)
    load_weights(model, checkpoint_file, what="checkpoint")
    expected = weights(finished_run / "model.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    with pytest.raises(ValueError, match=r"a training checkpoint of a mlp-32 student, 10 classes\) does not match"):
        load_weights(create_model("mlp-16", 10, in_channels=1, image_size=8), checkpoint_file)

    result = run_cli("eval", "--student", "mlp-32", "--checkpoint", checkpoint_file, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"top-1 {json.loads((finished_run / 'summary.json').read_text())['top1']:.2f}%" in result.stdout
    # as a teacher, and as the initial student
    kd = run(tmp_path / "kd", method="kd", teacher="mlp-32", teacher_checkpoint=str(checkpoint_file),
             student="mlp-16")
    assert kd["steps"] == 19
    init = run(tmp_path / "init", init_checkpoint=str(checkpoint_file), lr=1e-9)
    assert init["top1"] == pytest.approx(json.loads((finished_run / "summary.json").read_text())["top1"], abs=1.0)


def test_pesf_and_reskd_files_load_as_weights(tmp_path, small_teacher):
    from kdfast.reskd import load_chain

    distill = dict(teacher="mlp-64", teacher_checkpoint=str(small_teacher))
    run(tmp_path / "pesf", method="pesf", **distill)
    model = create_model("mlp-32", 10, in_channels=1, image_size=8)
    load_weights(model, ckpt.list_checkpoints(tmp_path / "pesf")[0])
    for key, value in weights(tmp_path / "pesf" / "model.pt").items():
        assert torch.equal(model.state_dict()[key], value)

    run(tmp_path / "stage0", method="reskd", student="mlp-16", **distill)
    run(tmp_path / "stage1", method="reskd", student="mlp-16", reskd_chain=str(tmp_path / "stage0" / "chain.pt"),
        **distill)
    for stage in ("stage0", "stage1"):  # a ResKD checkpoint's weights are its res-student (the stage's model.pt)
        res_student = create_model("mlp-16", 10, in_channels=1, image_size=8)
        load_weights(res_student, ckpt.list_checkpoints(tmp_path / stage)[0])
        for key, value in weights(tmp_path / stage / "model.pt").items():
            assert torch.equal(res_student.state_dict()[key], value), (stage, key)
    base = create_model("mlp-16", 10, in_channels=1, image_size=8)
    load_weights(base, tmp_path / "stage0" / "chain.pt")  # a one-stage chain is its base
    chain, _ = load_chain(tmp_path / "stage0" / "chain.pt")
    for key, value in chain.base.state_dict().items():
        assert torch.equal(base.state_dict()[key], value)
    with pytest.raises(ValueError, match=r"is a ResKD chain of 2 stages \(mlp-16 \+ mlp-16\).*--reskd-chain"):
        load_weights(base, tmp_path / "stage1" / "chain.pt")


# ----------------------------------------------------------------------------- 15: --dist-timeout

def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def test_a_stopped_rank_fails_the_job_with_a_named_collective(tmp_path):
    """torchrun, 2 gloo processes; rank 1 is SIGSTOPped mid-training: rank 0 fails after --dist-timeout
    with a message naming the collective instead of waiting forever."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kdfast",
               "train", "--student", "mlp-32", "--epochs", "500", "--batch-size", "32", "--progress", "lines",
               "--log-every", "1", "--eval-every", "0", "--no-tensorboard", "--dist-timeout", "5", "--output", "run"]
    process = subprocess.Popen(command, cwd=tmp_path, env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               text=True)
    stopped = None
    lines = []
    try:
        deadline = time.monotonic() + 180
        for line in process.stderr:
            lines.append(line)
            if stopped is None and "step 3/" in line:
                ranks = {_rank_of(pid): pid for pid in _children(process.pid)}
                stopped = ranks[1]
                os.kill(stopped, signal.SIGSTOP)
                stop_time = time.monotonic()
            if "did not complete within --dist-timeout 5 s" in line or time.monotonic() > deadline:
                break
        assert stopped is not None, "".join(lines[-30:])
        message = next((line for line in lines if "did not complete within --dist-timeout" in line), None)
        assert message is not None, "".join(lines[-30:])
        assert time.monotonic() - stop_time < 60
        assert "kdfast: error: rank 0 of 2: the collective '" in message
        assert any(name in message for name in ("DDP's gradient all-reduce (backward)", "all-reduce of the loss terms"))
        assert "PyTorch: " in message and "Timed out" in message
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGKILL)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode != 0


def test_lock_of_another_host_is_waited_for(tmp_path):
    """A lock held for a run of another host (as a network filesystem shows it) is waited for, then refused."""
    import fcntl
    import threading

    other = open(tmp_path / LOCK, "a+")
    fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    other.write(json.dumps({"pid": 1, "host": "node-that-crashed", "started": "yesterday"}))
    other.flush()
    try:
        with pytest.raises(ckpt.RunFolderBusy, match=r"\(pid 1 on host node-that-crashed, started yesterday\); "
                                                    r"still locked after 1 s"):
            ckpt.RunLock(tmp_path, remote_wait=1).acquire()
        threading.Timer(1.0, other.close).start()  # the lease expires: the lock goes
        lock = ckpt.RunLock(tmp_path, remote_wait=30).acquire()
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        other.close()
