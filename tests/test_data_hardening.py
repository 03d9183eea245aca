"""Bad files in image folders (issue 12): found when a split is indexed (a structural check,
cached per file), named by both loaders and by ``kdfast data verify``, left out with
``exclude``; PNG content under a JPEG name; DALI failures that name no file."""

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdfast import cli
from kdfast.data import DatasetError, dali_version, index_split, make_loader, verify_dataset
from kdfast.data import check as image_check
from kdfast.data.check import check_file
from kdfast.data.torch_loader import to_rgb

needs_dali = pytest.mark.skipif(dali_version() is None, reason="NVIDIA DALI is not installed")
LOADERS = [pytest.param("dali", marks=needs_dali), "torch"]
CLASSES = ("a", "b", "c")
COUNTS = {"train": 6, "val": 2}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def check_cache(tmp_path, monkeypatch):
    """Each test its own, empty cache of image checks."""
    folder = tmp_path / "check-cache"
    monkeypatch.setenv("KDFAST_CACHE_DIR", str(folder))
    return folder


_PHOTOS = []


def _photo(number, size=(32, 32)) -> Image.Image:
    """A small crop of one of scikit-learn's two photographs (real JPEG content)."""
    if not _PHOTOS:
        from sklearn.datasets import load_sample_images

        _PHOTOS.extend(Image.fromarray(photo) for photo in load_sample_images().images)
    left, top = 37 * number % 300, 23 * number % 150
    return _PHOTOS[number % 2].resize(size, Image.BILINEAR, box=(left, top, left + 320, top + 240))


def _write_folder(root: Path) -> Path:
    """root/{train,val}/{a,b,c}/*.jpg: 32-px JPEGs, 6 per training class, 2 per validation class."""
    number = 0
    for split, count in COUNTS.items():
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                _photo(number).save(root / split / name / f"{index:02d}.jpg", quality=95)
                number += 1
    return root


def _make_bad(path: Path, kind: str, good: Path) -> None:
    if kind == "truncated":  # the case: the first 546 bytes of a 32-px JPEG (inside its tables)
        path.write_bytes(good.read_bytes()[:546])
    elif kind == "random":
        path.write_bytes(b"\x17" + np.random.default_rng(0).bytes(4999))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "loop":  # ln -s loop.jpg loop.jpg
        os.symlink(path.name, path)
    elif kind == "broken-link":
        os.symlink("nowhere.jpg", path)
    else:
        raise AssertionError(kind)


BAD_KINDS = {"truncated": "truncated JPEG", "random": "not an image", "empty": "empty file (0 bytes)",
             "loop": "unreadable (Too many levels of symbolic links)", "broken-link": "broken symbolic link"}


@pytest.fixture(params=list(BAD_KINDS))
def bad_dataset(request, tmp_path):
    """(root, bad file's path, kind): the folder with one bad file in train/b."""
    root = _write_folder(tmp_path / "photos")
    bad = root / "train/b/bad.jpg"
    _make_bad(bad, request.param, root / "train/b/00.jpg")
    return root, str(bad), request.param


# ----------------------------------------------------------------------------- the check


def _variants(folder: Path) -> dict[str, Path]:
    """Odd but valid files, each decoded by Pillow and by DALI."""
    photo = _photo(3, (40, 30))
    paths = {}

    def save(name, image, **options):
        paths[name] = folder / f"{name}.jpg"
        image.save(paths[name], **options)

    save("baseline", photo, format="JPEG", quality=90)
    save("progressive", photo, format="JPEG", progressive=True)
    save("grayscale", photo.convert("L"), format="JPEG")
    save("cmyk", photo.convert("CMYK"), format="JPEG")  # ImageNet has a few CMYK JPEGs
    save("big-exif", photo, format="JPEG", exif=b"Exif\x00\x00" + bytes(20_000))  # a 20 KB APP1 segment
    save("png", photo, format="PNG")
    save("png-rgba", photo.convert("RGBA"), format="PNG")
    save("png-palette", photo.convert("P"), format="PNG")
    save("png-16bit", Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257), format="PNG")
    baseline = paths["baseline"].read_bytes()
    paths["trailing-garbage"] = folder / "trailing-garbage.jpg"  # ImageNet has some: bytes after FF D9
    paths["trailing-garbage"].write_bytes(baseline + bytes(3000) + np.random.default_rng(1).bytes(6000))
    sof = baseline.index(b"\xff\xc0")
    paths["fill-bytes"] = folder / "fill-bytes.jpg"  # FF FF fill before a marker: allowed
    paths["fill-bytes"].write_bytes(baseline[:sof] + b"\xff\xff" + baseline[sof:])
    return paths


def test_check_passes_odd_files_that_both_decoders_read(tmp_path):
    for name, path in _variants(tmp_path).items():
        found, reason = check_file(str(path))
        assert reason is None, (name, reason)
        assert found == ("PNG" if name.startswith("png") else "JPEG")
        with Image.open(path) as image:
            image.load()


def test_check_names_what_is_wrong(tmp_path):
    good = tmp_path / "good.jpg"
    _photo(1, (64, 48)).save(good, quality=90)
    data = good.read_bytes()
    sof = data.index(b"\xff\xc0")
    cases = {
        "no-eoi": (data[:-2], "truncated JPEG: no end-of-image marker"),
        "mid-scan": (data[:len(data) * 2 // 3], "truncated JPEG: no end-of-image marker"),
        "header": (data[:sof + 10], "truncated JPEG: the SOF0 segment"),
        "stray": (data[:sof] + b"\x12\x34" + data[sof:], "2 stray byte(s) before the marker"),  # DALI's parser fails
        "no-frame": (data[:sof] + data[sof + 2 + int.from_bytes(data[sof + 2:sof + 4], "big"):],
                     "without a frame header"),
        "zero-size": (data[:sof + 5] + b"\x00\x00" + data[sof + 7:], "image size"),
        "random": (b"\x17" + np.random.default_rng(0).bytes(4999), "not an image: it starts with 17"),
        "empty": (b"", "empty file (0 bytes)"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(content)
        assert reason in (check_file(str(path))[1] or ""), name
    _photo(1).save(tmp_path / "gif.jpg", format="GIF")
    found, reason = check_file(str(tmp_path / "gif.jpg"))
    assert found == "GIF" and "GIF content with a JPEG name" in reason and "convert it to JPEG" in reason
    os.symlink("loop.jpg", tmp_path / "loop.jpg")
    assert check_file(str(tmp_path / "loop.jpg")) == (None, "unreadable (Too many levels of symbolic links)")


def test_every_truncation_is_caught(tmp_path):
    for kind in ("JPEG", "PNG"):
        source = tmp_path / f"whole.{kind}"
        _photo(2, (24, 16)).save(source, format=kind)
        data = source.read_bytes()
        assert check_file(str(source)) == (kind, None)
        path = tmp_path / "cut.jpg"
        for length in range(len(data)):
            path.write_bytes(data[:length])
            assert check_file(str(path))[1] is not None, (kind, length)


# ----------------------------------------------------------------------------- verify and the loaders


def test_verify_reports_the_bad_file(bad_dataset, capsys):
    root, bad, kind = bad_dataset
    report = verify_dataset(root, workers=1)
    assert [path for path, _ in report.corrupt] == [bad] and BAD_KINDS[kind] in report.corrupt[0][1]
    assert report.checked == {"train": 19, "val": 6} and not report.ok
    output = root.parent / "bad.txt"
    assert cli.main(["data", "verify", str(root), "--output", str(output), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT {bad}: " in out and "1 image(s) cannot be decoded" in out
    assert output.read_text() == f"{bad}\n"
    # One split's folder alone (the self-referential link crashed verify there).
    assert cli.main(["data", "verify", str(root / "train"), "--workers", "1"]) == 1
    assert f"CORRUPT {bad}: " in capsys.readouterr().out


@pytest.mark.parametrize("loader", LOADERS)
def test_loaders_name_the_bad_file_when_indexing(bad_dataset, loader, tmp_path):
    root, bad, kind = bad_dataset
    with pytest.raises(DatasetError) as caught:
        make_loader(root, "train", batch_size=4, loader=loader, image_size=16, num_workers=1)
    message = str(caught.value)
    assert f"{bad}: {BAD_KINDS[kind]}" in message or (bad in message and BAD_KINDS[kind] in message)
    assert "kdfast data verify" in message and "kdfast train ... --exclude bad.txt" in message
    assert "exclude: bad.txt" in message
    # What verify writes, passed as exclude, makes the run go through.
    listing = tmp_path / "bad.txt"
    listing.write_text(f"# kdfast data verify\n{bad}\n")
    data = make_loader(root, "train", batch_size=4, loader=loader, image_size=16, num_workers=1, exclude=listing)
    assert data.num_samples == 18 and sum(len(b.labels) for b in data) == 16


def _kdfast(*args, cwd, env):
    return subprocess.run([sys.executable, "-m", "kdfast", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@needs_dali
@pytest.mark.parametrize("kind", ["truncated", "random", "empty"])
def test_dali_training_run_names_the_bad_file_instead_of_crashing(kind, tmp_path, check_cache):
    """The issue's command: before, a segmentation fault (rc 139) in most runs."""
    root = _write_folder(tmp_path / "photos")
    bad = root / "train/b/zz.jpg"
    _make_bad(bad, kind, root / "train/b/00.jpg")
    env = {**os.environ, "KDFAST_CACHE_DIR": str(check_cache), "PYTHONPATH": str(REPO)}
    command = ["train", "--data", str(root), "--loader", "dali", "--image-size", "16", "--batch-size", "4",
               "--student", "resnet8", "--epochs", "1", "--threads", "1", "--workers", "1",
               "--output", str(tmp_path / "run")]
    result = _kdfast(*command, cwd=tmp_path, env=env)
    assert result.returncode not in (139, -11), result.stderr[-2000:]
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(bad) in result.stderr and BAD_KINDS[kind] in result.stderr
    assert "--exclude bad.txt" in result.stderr
    if kind == "truncated":
        from kdfast.config import TrainConfig

        if "exclude" not in {field.name for field in dataclasses.fields(TrainConfig)}:
            pytest.skip("kdfast train has no --exclude yet")
        (tmp_path / "bad.txt").write_text("train/b/zz.jpg\n")  # relative to the dataset root
        result = _kdfast(*command, "--exclude", "bad.txt", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr[-2000:]


def _png_dataset(tmp_path):
    """The folder with a PNG named like ImageNet's n02105855_2933.JPEG in val/b."""
    root = _write_folder(tmp_path / "photos")
    png = root / "val/b/n02105855_2933.JPEG"
    _photo(40, (48, 40)).save(png, format="PNG")
    return root, str(png)


def test_verify_lists_png_content_under_a_jpeg_name(tmp_path, caplog):
    root, png = _png_dataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger="kdfast.data"):
        report = verify_dataset(root, workers=1)
    assert report.ok and report.misnamed == [(png, "PNG")] and report.checked == {"train": 18, "val": 7}
    assert f"NOT JPEG {png}: PNG content with a JPEG name" in caplog.text
    assert any(line.startswith(f"NOT JPEG {png}") for line in report.lines())
    assert index_split(root, "val").misnamed == [(png, "PNG")]


@needs_dali
def test_both_loaders_decode_png_content_alike(tmp_path):
    root, png = _png_dataset(tmp_path)
    loaders = [make_loader(root, "val", batch_size=7, loader=name, image_size=32, num_workers=1)
               for name in ("dali", "torch")]
    position = loaders[0].index.files.index(png)
    dali, fallback = (next(iter(loader)) for loader in loaders)
    assert torch.equal(dali.sample_indices, fallback.sample_indices)
    difference = (dali.images[position] - fallback.images[position]).abs().mean()
    assert difference < 0.1  # the same picture; the two resize filters differ a little
    assert fallback.images[position].std() > 0.3  # a photograph, not a blank


def test_torch_loader_scales_16_bit_png_as_dali_does():
    wide = np.array([[0, 257, 1530, 65535]], dtype=np.uint16)
    converted = np.asarray(to_rgb(Image.fromarray(wide)))
    assert converted.shape == (1, 4, 3) and converted[0, :, 0].tolist() == [0, 1, 6, 255]


# ----------------------------------------------------------------------------- failures after indexing


_DAMAGE_AFTER_INDEXING = """
import sys
from pathlib import Path
from kdfast.data import DatasetError, make_loader

root, loader, damage = sys.argv[1:]
victim = Path(root) / "train/b/03.jpg"
data = make_loader(root, "train", batch_size=6, loader=loader, image_size=16, num_workers=1)
content = victim.read_bytes()
victim.write_bytes(content[:len(content) * 2 // 3] if damage == "mid-scan" else b"")
try:
    for _ in data:
        pass
except DatasetError as error:
    print(error)
    sys.exit(0)
sys.exit(3)
"""


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("damage", ["mid-scan", "empty"])
def test_a_file_damaged_after_indexing_is_named(tmp_path, loader, damage, check_cache):
    """A file that changed after indexing reaches the decoder: both loaders name it. In a
    subprocess: DALI's native code is what this guards against (and a failed DALI pipeline
    left alive by the test's traceback would hang DataLoader workers forked after it)."""
    root = _write_folder(tmp_path / "photos")
    victim = root / "train/b/03.jpg"
    _photo(99, (64, 48)).save(victim, quality=90)  # headers intact when cut: DALI's parser is safe on it
    env = {**os.environ, "KDFAST_CACHE_DIR": str(check_cache), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", _DAMAGE_AFTER_INDEXING, str(root), loader, damage], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-2000:]
    assert str(victim) in result.stdout and "--exclude bad.txt" in result.stdout


@needs_dali
def test_dali_failures_that_name_no_file_are_traced_to_it(tmp_path):
    root = _write_folder(tmp_path / "photos")
    data = make_loader(root, "train", batch_size=6, loader="dali", image_size=16, num_workers=1)
    victim = data.index.files[4]
    Path(victim).write_bytes(b"\x17" + bytes(4999))  # what DALI 2.4 reports as "nvImageCodec failure: '#3'"
    data._feed.start([np.arange(6), np.arange(6, 12)], 0)
    for batch in data._feed:
        pass
    unnamed = RuntimeError("Critical error in pipeline:\n\x1b[0;31m[ERROR] \x1b[0m\nnvImageCodec failure: '#3'")
    mapped = data._decode_error(unnamed, delivered=0)
    assert isinstance(mapped, DatasetError)
    assert f"{victim} (not an image" in str(mapped) and "nvImageCodec failure: '#3'" in str(mapped)
    assert data._decode_error(unnamed, delivered=1) is not None  # not in the later batch: the batch is named
    assert "DALI failed reading a batch of" in str(data._decode_error(unnamed, delivered=1))
    assert data._decode_error(RuntimeError("CUDA error: out of memory"), delivered=1) is None  # not about a file


# ----------------------------------------------------------------------------- the cache


def test_checks_are_cached_by_size_and_modification_time(tmp_path, monkeypatch, check_cache):
    root = _write_folder(tmp_path / "photos")
    calls = []
    real = image_check.check_file
    monkeypatch.setattr(image_check, "check_file", lambda path, size=None: calls.append(path) or real(path, size))
    index_split(root, "train")
    assert len(calls) == 18 and len(list(check_cache.rglob("*.json"))) == 1
    calls.clear()
    index_split(root, "train")
    assert calls == []  # warm: only a stat per file
    victim = root / "train/c/01.jpg"
    victim.write_bytes(victim.read_bytes()[:546])  # changed size and modification time: checked again
    with pytest.raises(DatasetError, match=rf"{victim}: truncated JPEG"):
        index_split(root, "train")
    assert calls == [str(victim)]
    calls.clear()
    with pytest.raises(DatasetError, match=rf"{victim}: truncated JPEG"):  # a bad verdict is cached too
        index_split(root, "train")
    assert calls == []
    _photo(5).save(victim, quality=95)
    assert len(index_split(root, "train")) == 18 and calls == [str(victim)]


def test_without_a_writable_cache_every_file_is_checked(tmp_path, monkeypatch, caplog):
    root = _write_folder(tmp_path / "photos")
    monkeypatch.setenv("KDFAST_CACHE_DIR", "off")
    assert len(index_split(root, "train")) == 18
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KDFAST_CACHE_DIR", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="kdfast.data"):
        assert len(index_split(root, "train")) == 18
    assert "cannot cache the image checks" in caplog.text


# ----------------------------------------------------------------------------- exclude


@pytest.mark.parametrize("form", ["absolute", "dataset-relative", "cwd-relative", "iterable"])
def test_exclude_is_honoured_by_every_loader(tmp_path, monkeypatch, form):
    root = _write_folder(tmp_path / "photos")
    left_out = [root / "train/a/02.jpg", root / "val/c/01.jpg"]
    monkeypatch.chdir(tmp_path)
    if form == "iterable":
        exclude = [str(path) for path in left_out]
    else:
        lines = {"absolute": [str(p) for p in left_out],
                 "dataset-relative": [str(p.relative_to(root)) for p in left_out],
                 "cwd-relative": [str(p.relative_to(tmp_path)) for p in left_out]}[form]
        exclude = tmp_path / "bad.txt"
        exclude.write_text("# written by kdfast data verify\n\n" + "".join(f"{line}\n" for line in lines))
    for split, expected in (("train", 17), ("val", 5)):
        reads = []
        for loader in ("dali", "torch") if dali_version() else ("torch",):
            data = make_loader(root, split, batch_size=5, loader=loader, image_size=16, num_workers=1,
                               exclude=exclude)
            assert data.num_samples == expected and not set(map(str, left_out)) & set(data.index.files)
            reads.append(torch.cat([b.sample_indices for b in data]))
        assert all(torch.equal(read, reads[0]) for read in reads)


def test_exclude_errors_and_warnings(tmp_path, caplog):
    root = _write_folder(tmp_path / "photos")
    with pytest.raises(DatasetError, match="cannot read the exclude list"):
        make_loader(root, "train", batch_size=4, loader="torch", exclude=tmp_path / "missing.txt")
    typo = tmp_path / "typo.txt"
    typo.write_text("train/a/99.jpg\n")
    with caplog.at_level(logging.WARNING, logger="kdfast.data"):
        assert make_loader(root, "train", batch_size=4, loader="torch", exclude=typo).num_samples == 18
    assert "1 excluded path(s) name no file" in caplog.text and "train/a/99.jpg" in caplog.text
    with pytest.raises(ValueError, match="data='digits' is held in memory"):
        make_loader("digits", "train", batch_size=4, exclude=typo)
