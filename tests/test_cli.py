"""The command line as a newcomer meets it: grouped help with one default each, `kdfast models`,
`kdfast eval RUN_DIR`, file lists for the splits, the demo's help, TensorBoard off by default."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdfast.cli import main as cli_main
from kdfast.config import OPTIONS, resolve_config
from kdfast.train import train
from helpers import small_digits_folder

ROOT = Path(__file__).resolve().parents[1]


def quiet(*_):
    pass


def run_module(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def help_entries(text: str) -> dict[str, str]:
    """Each ``--flag``'s help text in an argparse help page (wrapped lines joined)."""
    entries, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (--[\w-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("      "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_train_help_is_grouped_with_one_default_each(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: kdfast train [--config FILE] [options]")
    for group in ("data:", "models:", "method and loss:", "optimization:", "execution:", "output:"):
        assert f"\n{group}\n" in text, group
    entries = help_entries(text)
    assert "--checkpoint" not in entries  # kdfast eval's
    for flag, entry in entries.items():
        assert entry.lower().count("default") <= 1, entry
        assert "(default: None)" not in entry, entry
    assert "resnet18" in entries["--student"] and "wrn_<depth>_<widen>" in entries["--student"]
    assert "(default: off)" in entries["--tensorboard"]
    assert entries["--image-size"].endswith("(default: 224; digits: 8)")


def test_eval_help_has_only_what_eval_reads(capsys):
    with pytest.raises(SystemExit):
        cli_main(["eval", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: kdfast eval [RUN_DIR] [--checkpoint FILE] [options]")
    entries = help_entries(text)
    for flag in ("--data", "--student", "--checkpoint", "--image-size", "--val-file-list", "--batch-size", "--amp"):
        assert flag in entries, flag
    for flag in ("--method", "--lr", "--teacher", "--epochs", "--temperature", "--output", "--train-file-list"):
        assert flag not in entries, flag


def test_models_lists_every_family(capsys):
    assert cli_main(["models"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"resnet18\s+11,689,512", text) and re.search(r"resnet32x4\s+7,433,860", text)
    assert re.search(r"wrn_40_2\s+2,255,156", text) and "mlp-32" in text


def test_demo_help_names_the_module_and_its_defaults():
    result = run_module("kdfast.demo", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m kdfast.demo")
    assert "(default: 60)" in result.stdout and "(default: runs/demo)" in result.stdout


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The digits as a 16 px JPEG folder, and a 2-epoch run trained on it at 12 px."""
    root = tmp_path_factory.mktemp("cli")
    data = small_digits_folder(root / "digits", 16, 20)
    output = root / "run"
    summary = train(resolve_config(data=str(data), loader="torch", workers=0, image_size=12, student="resnet8",
                                   epochs=2, batch_size=32, lr=0.05, progress="none", eval_every=0,
                                   output=str(output)), print_fn=quiet)
    return data, output, summary


def test_eval_run_dir_reads_the_runs_settings(folder_run, capsys):
    data, output, summary = folder_run
    assert cli_main(["eval", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "at 12 px" in printed and f"top-1 {summary['top1']:.2f}%" in printed
    # --checkpoint with a config.yaml beside it reads it too; flags win over it.
    assert cli_main(["eval", "--checkpoint", str(output / "model.pt")]) == 0
    assert f"top-1 {summary['top1']:.2f}%" in capsys.readouterr().out
    assert cli_main(["eval", str(output), "--image-size", "16"]) == 0
    assert "at 16 px" in capsys.readouterr().out


def test_eval_without_a_run_or_weights_says_what_it_needs(tmp_path, capsys):
    assert cli_main(["eval"]) == 2
    assert "needs a run folder (kdfast eval RUN_DIR) or the weights (--checkpoint FILE" in capsys.readouterr().err
    assert cli_main(["eval", str(tmp_path)]) == 2
    assert "is not a kdfast run folder (it has no config.yaml)" in capsys.readouterr().err


def test_file_lists_for_both_splits(folder_run, tmp_path, capsys):
    """A training list in the folder's order trains the same weights bit for bit; a flat
    validation folder with a list scores as DATA/val does."""
    from kdfast.data.folder import index_split

    data, output, summary = folder_run
    train_index = index_split(data, "train")
    train_list = tmp_path / "train.txt"
    train_list.write_text("".join(f"{os.path.relpath(path, tmp_path)} {label}\n"
                                  for path, label in zip(train_index.files, train_index.labels)))
    listed = train(resolve_config(data=str(data), loader="torch", workers=0, image_size=12, student="resnet8",
                                  epochs=2, batch_size=32, lr=0.05, progress="none", eval_every=0,
                                  train_file_list=str(train_list), output=str(tmp_path / "listed")), print_fn=quiet)
    expected = torch.load(output / "model.pt", weights_only=True)
    got = torch.load(tmp_path / "listed" / "model.pt", weights_only=True)
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert listed["top1"] == summary["top1"]

    val_index = index_split(data, "val")
    flat = tmp_path / "flat" / "val"
    flat.mkdir(parents=True)
    lines = []
    for number, (path, label) in enumerate(zip(val_index.files, val_index.labels)):
        name = f"val_{number:05d}.jpg"  # ImageNet's flat layout: no class folders
        shutil.copy(path, flat / name)
        lines.append(f"val/{name} {label}\n")
    (tmp_path / "flat" / "val.txt").write_text("".join(reversed(lines)))
    assert cli_main(["eval", str(output), "--val-file-list", str(tmp_path / "flat" / "val.txt")]) == 0
    printed = capsys.readouterr().out
    assert f"top-1 {summary['top1']:.2f}%" in printed and "val.txt" in printed
    with pytest.raises(ValueError, match="val_file_list lists image files of a dataset folder"):
        resolve_config(val_file_list=str(train_list))


def test_tensorboard_is_off_by_default_and_silent(folder_run, caplog):
    _, output, _ = folder_run
    assert OPTIONS["tensorboard"].default is False
    assert not (output / "tensorboard").exists()
    assert "tensorboard" not in caplog.text


def test_plot_draws_runs_overlaid(folder_run, tmp_path, capsys):
    from kdfast.plot import read_metrics

    _, output, _ = folder_run
    train_records, eval_records = read_metrics(output)
    assert train_records and len(eval_records) == 1  # eval_every=0: the final evaluation only
    image = tmp_path / "curves.png"
    assert cli_main(["plot", str(output), str(output), "--labels", "a", "b", "--output", str(image)]) == 0
    assert image.stat().st_size > 20_000 and f"wrote {image}" in capsys.readouterr().out
    assert cli_main(["plot", str(tmp_path), "--output", str(image)]) == 2
    assert "not a kdfast run folder with metrics" in capsys.readouterr().err
