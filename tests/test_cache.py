"""The offline teacher cache (kdfast.cache): build, verify, replay, kill-safety, ranks, sparse teacher."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdfast.cache import (CacheError, CacheMismatchError, SparseTeacher, TeacherCache, build_cache, cache_info,
                          verify_cache)
from kdfast.cli import main as cli_main
from kdfast.data import make_loader
from kdfast.data.torch_loader import normalize, random_resized_crop_box
from kdfast.models import create_model
from helpers import random_teacher_file, small_digits_folder

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SEED = 3
PER_CLASS = 12  # JPEG folder: training images kept per class


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The digits as a 16×16 JPEG folder, PER_CLASS training images per class."""
    return small_digits_folder(tmp_path_factory.mktemp("digits-jpeg"), 16, PER_CLASS)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("teachers")
    return {"folder": random_teacher_file(tmp, "resnet8", 3, 16), "digits": random_teacher_file(tmp, "resnet8", 1, 8),
            "mlp": random_teacher_file(tmp, "mlp-32", 1, 8)}


def _files(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


def _digits_options(teacher: Path, output: Path, **changes) -> dict:
    options = dict(data="digits", teacher="resnet8", teacher_checkpoint=teacher, output=output, epochs=2, top_k=4,
                   seed=SEED, batch_size=32, shard_samples=100, threads=1, progress="none")
    options.update(changes)
    return options


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teachers) -> Path:
    """An uninterrupted one-process build of the digits (26 shards), to compare others with."""
    output = tmp_path_factory.mktemp("reference") / "cache"
    build_cache(**_digits_options(teachers["digits"], output))
    return output


def test_build_verify_info_and_replay_of_the_torch_loader(folder, teachers, tmp_path, capsys):
    output = tmp_path / "cache"
    image_size, epochs = 16, 2
    build_cache(folder, "resnet8", teachers["folder"], output, epochs=epochs, top_k=10, image_size=image_size,
                seed=SEED, batch_size=16, progress="none")
    assert verify_cache(output).ok
    assert cli_main(["cache", "verify", str(output)]) == 0
    assert cli_main(["cache", "info", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "bytes per sample per epoch: 64 (" in printed and "ok (2 shards" in printed
    cache = TeacherCache.open(output, dataset=folder, num_classes=10, image_size=image_size, teacher="resnet8")
    assert cache.top_k == cache.num_classes == 10  # k = C: the stored row is the whole row

    teacher = create_model("resnet8", 10, 3, image_size)
    teacher.load_state_dict(torch.load(teachers["folder"]))
    teacher.eval()
    loader = make_loader(folder, "train", batch_size=20, loader="torch", image_size=image_size, seed=SEED,
                         num_workers=0)
    files = loader.index.files
    seen = 0
    for epoch in range(epochs):
        for images, _, indices in loader.iterate(epoch):
            cached = cache.read(epoch, indices)
            assert cached.epoch == epoch
            rebuilt = []
            for row, index in enumerate(indices.tolist()):
                with Image.open(files[index]) as image:
                    image = image.convert("RGB")
                # The rule online training has always used, written out here on purpose.
                rng = np.random.default_rng([SEED, epoch, index])
                box = random_resized_crop_box(*image.size, rng)
                flip = rng.random() < 0.5
                assert cached.boxes[row].tolist() == list(box) and bool(cached.flips[row]) == flip
                crop = image.resize((image_size, image_size), Image.BILINEAR, box=box)
                if flip:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                rebuilt.append(np.asarray(crop))
            # The recorded box and flip reproduce the loader's images bit for bit.
            assert torch.equal(normalize(torch.from_numpy(np.stack(rebuilt)), torch.float32), images)
            with torch.no_grad():
                online = teacher(images)
            stored = cached.teacher.dense(1.0)
            # fp16 values: equal to the online logits within fp16 rounding (plus the ~1e-6 by which
            # a float32 forward differs between batch shapes).
            assert ((stored - online).abs() <= online.abs() * 2.0**-11 + 1e-5).all()
            for column, tau in enumerate(cache.temperatures):
                expected = torch.logsumexp(online / tau, dim=1)
                torch.testing.assert_close(cached.teacher.log_sum_exp[:, column], expected, rtol=1e-5, atol=1e-5)
            seen += len(indices)
    assert seen == epochs * len(loader) * 20
    assert cache.read(epochs + 1, torch.tensor([0])).epoch == 1  # epochs beyond E cycle e mod E


def test_digits_cache_records_the_digits_loaders_shifts(teachers, tmp_path):
    output = tmp_path / "cache"
    build_cache("digits", "mlp-32", teachers["mlp"], output, epochs=1, top_k=10, seed=SEED, batch_size=64,
                values_dtype="float32", progress="none")
    cache = TeacherCache.open(output, dataset="digits", num_classes=10, image_size=8)
    teacher = create_model("mlp-32", 10, 1, 8)
    teacher.load_state_dict(torch.load(teachers["mlp"]))
    teacher.eval()
    loader = make_loader("digits", "train", batch_size=100, seed=SEED)
    images, _, indices = next(iter(loader))
    cached = cache.read(0, indices)
    assert not cached.flips.any()  # the digits loader never flips
    left, top, right, bottom = cached.boxes.unbind(1)
    assert ((right - left) == 8).all() and ((bottom - top) == 8).all() and left.abs().max() <= 1
    assert len({tuple(b) for b in cached.boxes.tolist()}) > 1  # the shifts vary
    rendered = loader.render(indices, np.stack([top.numpy(), left.numpy()], 1))
    assert torch.equal(rendered, images)  # the recorded box reproduces the loader's image
    with torch.no_grad():
        online = teacher(images)
    torch.testing.assert_close(cached.teacher.dense(4.0), online, rtol=1e-5, atol=1e-5)  # float32 values


def _kill_after_first_shard(command: list[str], output: Path) -> bool:
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if any(output.glob("epoch-*.npy")):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode == -signal.SIGKILL


def _cli_args(options: dict) -> list[str]:
    args = []
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_a_killed_build_resumes_to_the_same_bytes(teachers, reference, tmp_path, capsys):
    output = tmp_path / "cache"
    options = _digits_options(teachers["digits"], output)
    command = [sys.executable, "-m", "kdfast", "cache", "build", *_cli_args(options)]
    killed = _kill_after_first_shard(command, output)
    assert killed, "the build finished before it could be killed"
    built = sorted(output.glob("epoch-*.npy"))
    assert built and len(built) < 26
    report = verify_cache(output)
    assert not report.ok and any("unfinished" in p for p in report.problems)
    assert any("missing" in p for p in report.problems)
    build_cache(**options)
    assert _files(output) == _files(reference)

    # A truncated shard is named by verify, and the next build repairs it.
    victim = output / "epoch-0001.part-00003.npy"
    victim.write_bytes(victim.read_bytes()[:-64])
    capsys.readouterr()
    assert cli_main(["cache", "verify", str(output)]) == 1
    assert "epoch-0001.part-00003.npy: damaged" in capsys.readouterr().out
    (output / "epoch-0000.part-00005.npy").unlink()
    report = verify_cache(output)
    assert any(p.startswith("epoch-0000.part-00005.npy: missing") for p in report.problems)
    with pytest.raises(CacheError, match="epoch-0001.part-00003.npy: damaged"):
        TeacherCache.open(output, checksums=True)
    build_cache(**options)
    assert _files(output) == _files(reference)


def test_two_processes_write_the_same_bytes_as_one(teachers, reference, tmp_path):
    """torchrun, 2 gloo-free CPU processes (they never communicate): byte-identical to 1 process."""
    output = tmp_path / "cache"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kdfast",
               "cache", "build", *_cli_args(_digits_options(teachers["digits"], output))]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _files(output) == _files(reference)


def test_the_bytes_do_not_depend_on_workers_or_resume_points(folder, teachers, tmp_path):
    common = dict(epochs=1, top_k=3, image_size=16, seed=SEED, batch_size=16, shard_samples=50, threads=1,
                  progress="none")
    first, second = tmp_path / "a", tmp_path / "b"
    build_cache(folder, "resnet8", teachers["folder"], first, workers=0, **common)
    build_cache(folder, "resnet8", teachers["folder"], second, workers=2, rank=1, world_size=3, **common)
    build_cache(folder, "resnet8", teachers["folder"], second, workers=1, **common)  # finishes the rest
    assert _files(first) == _files(second)


def test_mismatches_are_refused_naming_what_differs(folder, teachers, reference, tmp_path):
    with pytest.raises(CacheMismatchError, match=r"num_classes: cache 10, expected 11"):
        TeacherCache.open(reference, num_classes=11)
    with pytest.raises(CacheMismatchError, match=r"image_size: cache 8, expected 16"):
        TeacherCache.open(reference, image_size=16)
    with pytest.raises(CacheMismatchError, match=r"dataset kind: cache 'digits', expected 'folder'"):
        TeacherCache.open(reference, dataset=folder)
    with pytest.raises(CacheMismatchError, match=r"transform kind"):
        TeacherCache.open(reference, transform={"kind": "random_resized_crop+hflip"})
    TeacherCache.open(reference, dataset="digits", num_classes=10, image_size=8)

    output = tmp_path / "cache"
    build_cache(folder, "resnet8", teachers["folder"], output, epochs=1, top_k=3, image_size=16, seed=SEED,
                progress="none")
    changed = tmp_path / "changed"
    (changed / "train").mkdir(parents=True)
    for class_folder in (folder / "train").iterdir():
        (changed / "train" / class_folder.name).mkdir()
        for image in sorted(class_folder.iterdir())[:-1]:  # one image fewer per class
            (changed / "train" / class_folder.name / image.name).write_bytes(image.read_bytes())
    with pytest.raises(CacheMismatchError, match=r"dataset samples: cache 120, expected 110.*dataset sha256"):
        TeacherCache.open(output, dataset=changed)
    # A resume with other settings is refused too, naming them.
    with pytest.raises(CacheError, match=r"batch_size: cache 64, requested 32"):
        build_cache(folder, "resnet8", teachers["folder"], output, epochs=1, top_k=3, image_size=16, seed=SEED,
                    batch_size=32, progress="none")
    with pytest.raises(CacheError, match="cannot be recorded"):
        build_cache(folder, "resnet8", teachers["folder"], tmp_path / "dali", epochs=1, top_k=3, loader="dali")


def test_an_unfinished_cache_is_not_opened(teachers, tmp_path):
    """Rank 1 of 2 alone: its shards, and no finished manifest (rank 0 writes it)."""
    output = tmp_path / "cache"
    build_cache(**_digits_options(teachers["digits"], output, epochs=1, rank=1, world_size=2))
    with pytest.raises(CacheError, match="unfinished"):
        TeacherCache.open(output)
    assert not verify_cache(output).ok
    assert "UNFINISHED" in cache_info(output)[0]
    with pytest.raises(CacheError, match=r"no shard appeared for 0.3 s \(4 missing: epoch-0000.part-00002.npy"):
        build_cache(**_digits_options(teachers["digits"], output, epochs=1, rank=0, world_size=3, wait_timeout=0.3))


# --------------------------------------------------------------------------- SparseTeacher

def _sparse(logits: torch.Tensor, k: int, temperatures=(1.0, 4.0)) -> SparseTeacher:
    ordered = logits.sort(dim=1, descending=True, stable=True)
    lse = torch.stack([torch.logsumexp(logits.double() / t, dim=1).float() for t in temperatures], 1)
    return SparseTeacher(ordered.indices[:, :k], ordered.values[:, :k], lse, temperatures, logits.shape[1])


@pytest.mark.parametrize("classes", [1, 7, 100])
def test_dense_at_k_equal_c_keeps_every_softmax(classes):
    logits = torch.randn(5, classes) * 3
    dense = _sparse(logits, classes).dense(4.0)
    for tau in (0.5, 1.0, 4.0, 10.0):
        torch.testing.assert_close((dense / tau).softmax(1), (logits / tau).softmax(1), rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 3, 29])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dense_below_c_keeps_the_top_k_and_spreads_the_rest(k, tau):
    classes = 30
    logits = torch.randn(6, classes) * 2
    sparse = _sparse(logits, k)
    probabilities = (sparse.dense(tau).double() / tau).softmax(1)
    exact = (logits.double() / tau).softmax(1)
    top = sparse.indices
    torch.testing.assert_close(probabilities.gather(1, top), exact.gather(1, top), rtol=1e-5, atol=1e-7)
    rest = torch.ones_like(probabilities, dtype=torch.bool).scatter_(1, top, False)
    tail = probabilities[rest].view(6, classes - k)
    expected = (1 - exact.gather(1, top).sum(1, keepdim=True)) / (classes - k)
    # The remaining mass 1 − Σ q_j comes from float32 inputs: absolute error of a few float32 ulps.
    torch.testing.assert_close(tail, expected.expand_as(tail), rtol=1e-4, atol=2e-6)
    with pytest.raises(ValueError, match="temperature 2 has no stored log-sum-exp"):
        sparse.dense(2.0)


def test_bad_sparse_teachers_are_refused():
    logits = torch.randn(3, 10)
    good = _sparse(logits, 4)
    with pytest.raises(ValueError, match=r"indices must be in \[0, num_classes=10\), got 10"):
        SparseTeacher(good.indices.clone().fill_(10), good.values, good.log_sum_exp, (1.0, 4.0), 10)
    with pytest.raises(ValueError, match=r"indices must be in \[0, num_classes=10\), got -"):
        SparseTeacher(-good.indices, good.values, good.log_sum_exp, (1.0, 4.0), 10)
    duplicated = good.indices.clone()
    duplicated[2, 3] = duplicated[2, 0]
    with pytest.raises(ValueError, match="indices must be distinct within a row, got a duplicated class in row 2"):
        SparseTeacher(duplicated, good.values, good.log_sum_exp, (1.0, 4.0), 10)
    with pytest.raises(ValueError, match="indices must be an int64"):
        SparseTeacher(good.indices.int(), good.values, good.log_sum_exp, (1.0, 4.0), 10)
    with pytest.raises(ValueError, match="values must be"):
        SparseTeacher(good.indices, good.values[:, :3], good.log_sum_exp, (1.0, 4.0), 10)
    with pytest.raises(ValueError, match="log_sum_exp must be"):
        SparseTeacher(good.indices, good.values, good.log_sum_exp[:, :1], (1.0, 4.0), 10)
    with pytest.raises(ValueError, match="k <= num_classes"):
        SparseTeacher(good.indices, good.values, good.log_sum_exp, (1.0, 4.0), 3)


def test_bfloat16_values_read_back_as_the_teachers_rounded_logits(teachers, tmp_path):
    output = tmp_path / "cache"
    build_cache("digits", "resnet8", teachers["digits"], output, epochs=1, top_k=3, seed=SEED, batch_size=64,
                values_dtype="bfloat16", progress="none")
    assert "bytes per sample per epoch: 36 (" in "\n".join(cache_info(output))
    teacher = create_model("resnet8", 10, 1, 8)
    teacher.load_state_dict(torch.load(teachers["digits"]))
    teacher.eval()
    images, _, indices = next(iter(make_loader("digits", "train", batch_size=64, seed=SEED)))
    with torch.no_grad():
        online = teacher(images)
    cached = TeacherCache.open(output).read(0, indices).teacher
    ordered = online.sort(dim=1, descending=True, stable=True)
    assert torch.equal(cached.indices, ordered.indices[:, :3])
    # Within bfloat16 rounding (8 significant bits) of the online logits; the float32 logits of
    # the cache's forward differ from the loader batch's in the last bits (another batch shape).
    top = ordered.values[:, :3]
    assert ((cached.values - top).abs() <= top.abs() * 2.0**-8 + 1e-5).all()
