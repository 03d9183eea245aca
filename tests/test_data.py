"""kdfast.data: dataset indexing and its errors, sample order and sharding, the DALI (CPU-only
mode) and PyTorch loaders, the in-memory digits, corrupt files, the dataset CLI."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from kdfast import cli
from kdfast.data import DatasetError, dali_version, index_split, make_loader, verify_dataset, write_digits_folder
from kdfast.data.common import SampleOrder
from kdfast.data.folder import read_file_list, scan_folder
from kdfast.data.torch_loader import center_crop_box, random_resized_crop_box

needs_dali = pytest.mark.skipif(dali_version() is None, reason="NVIDIA DALI is not installed")
LOADERS = [pytest.param("dali", marks=needs_dali), "torch"]
CLASSES = ("cat", "dog", "emu")


@pytest.fixture(autouse=True)
def _check_cache(tmp_path_factory, monkeypatch):
    """The image checks' cache (kdfast.data.check) in the session's temporary folder, not ~/.cache."""
    monkeypatch.setenv("KDFAST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "check-cache"))
IMAGES_PER_CLASS = {"train": 7, "val": 3}


def _photo_crops(count, seed, size=(64, 48)):
    """Small crops of scikit-learn's two sample photographs (real JPEG content)."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(photo) for photo in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for number in range(count):
        photo = photos[number % 2]
        left, top = int(rng.integers(0, 300)), int(rng.integers(0, 150))
        yield photo.resize(size, Image.BILINEAR, box=(left, top, left + 320, top + 240))


def _write_dataset(root):
    """root/{train,val}/{cat,dog,emu}/*.jpg; one image grayscale, one with an upper-case
    extension; a PNG and a text file in class folders (not JPEGs: skipped)."""
    for split, count in IMAGES_PER_CLASS.items():
        crops = _photo_crops(count * len(CLASSES), seed=len(split))
        for name in CLASSES:
            os.makedirs(root / split / name)
            for number in range(count):
                next(crops).save(root / split / name / f"{number:02d}.jpg", quality=90)
    Image.open(root / "train/dog/01.jpg").convert("L").save(root / "train/dog/01.jpg")
    os.rename(root / "train/emu/06.jpg", root / "train/emu/06.JPG")
    Image.new("RGB", (8, 8)).save(root / "train/cat/extra.png")
    (root / "val/emu/README.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("photos"))


def _truncate(path, keep=1500):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep])


@pytest.fixture
def corrupt_dataset(tmp_path):
    """The dataset with one truncated JPEG in the training split."""
    root = _write_dataset(tmp_path / "photos")
    _truncate(root / "train/dog/03.jpg")
    return root, str(root / "train/dog/03.jpg")


# ----------------------------------------------------------------------------- indexing


def test_index_lists_sorted_classes_and_files(dataset, caplog):
    with caplog.at_level(logging.WARNING, logger="kdfast.data"):
        train = index_split(dataset, "train")
    assert train.classes == list(CLASSES)
    assert len(train) == 21 and train.labels == [0] * 7 + [1] * 7 + [2] * 7
    assert train.files[-1].endswith("emu/06.JPG")  # extensions are case-insensitive
    assert train.files == sorted(train.files, key=lambda p: (CLASSES.index(p.split(os.sep)[-2]), p))
    assert [os.path.basename(p) for p in train.skipped] == ["extra.png"]  # counted, logged skip
    assert "skipped 1 non-JPEG file" in caplog.text
    val = index_split(dataset, "val")
    assert len(val) == 9 and val.classes == train.classes and len(val.skipped) == 1


def test_missing_folders_raise_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        index_split(tmp_path / "nowhere", "train")
    tmp_path.joinpath("data").mkdir()
    with pytest.raises(DatasetError, match=r"data/train does not exist"):
        index_split(tmp_path / "data", "train")
    tmp_path.joinpath("data/train").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        index_split(tmp_path / "data", "train")
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        index_split(tmp_path / "data", "test")


def test_empty_class_folder_is_an_error(dataset, tmp_path):
    root = _write_dataset(tmp_path / "d")
    os.makedirs(root / "train/fox")
    with pytest.raises(DatasetError, match=r"class folder .*train/fox has no JPEG images"):
        index_split(root, "train")
    Image.new("RGB", (8, 8)).save(root / "train/fox/only.png")  # no JPEG among its files either
    with pytest.raises(DatasetError, match="fox has no JPEG images"):
        index_split(root, "train")


def test_mismatched_train_and_val_classes(tmp_path):
    root = _write_dataset(tmp_path / "d")
    os.rename(root / "val/emu", root / "val/owl")
    with pytest.raises(DatasetError, match=r"different classes \(only in train: \['emu'\]; only in val: \['owl'\]\)"):
        index_split(root, "val")


def test_exclude_list_leaves_files_out(dataset, tmp_path):
    full = index_split(dataset, "train")
    listing = tmp_path / "bad.txt"
    listing.write_text(f"# from kdfast data verify\n{full.files[3]}\n")
    assert index_split(dataset, "train", exclude=listing).files == full.files[:3] + full.files[4:]
    assert len(scan_folder(dataset / "train", exclude=[full.files[0], full.files[1]])) == len(full) - 2


def test_file_list(dataset, tmp_path):
    listing = dataset / "val_list.txt"
    listing.write_text("val/dog/00.jpg 1\n\n# comment\nval/cat/02.jpg 0\nval/emu/README.txt 2\n")
    index = index_split(dataset, "val", file_list=listing)
    assert index.classes == list(CLASSES)  # named after train/'s folders
    assert [os.path.relpath(p, dataset) for p in index.files] == ["val/dog/00.jpg", "val/cat/02.jpg"]
    assert index.labels == [1, 0] and len(index.skipped) == 1
    bad = tmp_path / "bad.txt"
    for text, message in [("a.jpg\n", r"bad.txt:1: expected '<relative path> <class index>'"),
                          ("missing.jpg 0\n", "missing.jpg does not exist"),
                          ("x.png 0\n", "names no JPEG images")]:
        bad.write_text(text)
        with pytest.raises(DatasetError, match=message):
            read_file_list(bad)
    with pytest.raises(DatasetError, match="class index 5 but only 3 classes"):
        listing.write_text("val/dog/00.jpg 5\n")
        index_split(dataset, "val", file_list=listing)
    os.remove(listing)


# ----------------------------------------------------------------------------- order and sharding


@pytest.mark.parametrize("num_samples,batch_size,world_size", [(23, 4, 1), (23, 4, 2), (50, 3, 4), (8, 8, 1)])
def test_train_order_shards_global_batches(num_samples, batch_size, world_size):
    orders = [SampleOrder(num_samples, batch_size, "train", r, world_size, seed=3) for r in range(world_size)]
    steps = num_samples // (batch_size * world_size)
    assert all(len(o.indices(0)) == steps * batch_size and o.num_batches == steps for o in orders)
    everything = np.concatenate([o.indices(0) for o in orders])
    assert len(set(everything.tolist())) == len(everything)  # nothing read twice in an epoch
    # A global batch holds the same samples however many ranks share it.
    single = SampleOrder(num_samples, batch_size * world_size, "train", 0, 1, seed=3).indices(0)
    for step in range(steps):
        together = np.concatenate([o.indices(0)[step * batch_size:(step + 1) * batch_size] for o in orders])
        np.testing.assert_array_equal(together, single[step * batch_size * world_size:(step + 1) * batch_size * world_size])
    assert not np.array_equal(orders[0].indices(0), orders[0].indices(1))  # reshuffled every epoch
    np.testing.assert_array_equal(orders[0].indices(1), orders[0].indices(1))


@pytest.mark.parametrize("num_samples,world_size", [(9, 1), (9, 2), (10, 3), (7, 5), (3, 4)])
def test_val_order_reads_every_sample_once(num_samples, world_size):
    orders = [SampleOrder(num_samples, 2, "val", r, world_size, seed=0) for r in range(world_size)]
    np.testing.assert_array_equal(np.concatenate([o.indices(5) for o in orders]), np.arange(num_samples))
    assert all(o.num_batches == -(-len(o.indices(0)) // 2) for o in orders)


def test_order_arguments_are_checked():
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        SampleOrder(10, 0, "train", 0, 1, 0)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, world_size=2\)"):
        SampleOrder(10, 2, "train", 2, 2, 0)
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        SampleOrder(10, 2, "train", 0, 0, 0)
    with pytest.raises(ValueError, match="larger than the 10 training samples"):
        SampleOrder(10, 6, "train", 0, 2, 0)


# ----------------------------------------------------------------------------- loaders


def test_random_resized_crop_box_stays_inside_the_image():
    rng = np.random.default_rng(0)
    for width, height in [(500, 375), (64, 48), (10, 300), (1, 1)]:
        for _ in range(50):
            left, top, right, bottom = random_resized_crop_box(width, height, rng)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
    # A very elongated image falls back to the central crop with the ratio clamped to 3/4.
    assert random_resized_crop_box(10, 300, np.random.default_rng(1), area=(0.9, 1.0)) == (0, 143, 10, 156)
    assert center_crop_box(500, 375, 224, 256) == pytest.approx((85.9375, 23.4375, 414.0625, 351.5625))


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_loader_batches(dataset, loader, split):
    data = make_loader(dataset, split, batch_size=4, loader=loader, image_size=32, num_workers=1)
    batches = list(data)
    count = 21 if split == "train" else 9
    sizes = [4] * (count // 4) if split == "train" else [4, 4, 1]
    assert [len(b.labels) for b in batches] == sizes and len(data) == len(sizes)
    assert data.num_classes == 3 and data.classes == list(CLASSES) and data.image_shape == (3, 32, 32)
    for images, labels, indices in batches:
        assert images.shape == (len(labels), 3, 32, 32) and images.dtype == torch.float32
        assert images.is_contiguous() and torch.isfinite(images).all()
        assert labels.dtype == indices.dtype == torch.int64
        assert torch.equal(labels, torch.tensor(data.index.labels)[indices])
    everything = torch.cat([b.sample_indices for b in batches])
    if split == "val":
        assert torch.equal(everything, torch.arange(9))
        images = torch.cat([b.images for b in batches])
        # Normalized with ImageNet's statistics: natural photographs land near 0 ± 1.
        assert images.mean().abs() < 0.6 and 0.5 < images.std() < 1.6
    else:
        assert len(set(everything.tolist())) == len(everything)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loader_dtype_and_channels_last(dataset, loader, dtype):
    data = make_loader(dataset, "val", batch_size=4, loader=loader, image_size=24, dtype=dtype, channels_last=True,
                       num_workers=0 if loader == "torch" else 1)
    reference = make_loader(dataset, "val", batch_size=4, loader=loader, image_size=24, num_workers=0 if loader == "torch" else 1)
    for batch, full in zip(data, reference):
        assert batch.images.dtype == dtype and batch.images.shape == full.images.shape
        assert batch.images.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(batch.images.float(), full.images, atol=0.05, rtol=0.01)


@needs_dali
@pytest.mark.parametrize("split", ["train", "val"])
def test_dali_and_torch_loaders_read_the_same_batches(dataset, split):
    dali = make_loader(dataset, split, batch_size=4, loader="dali", image_size=40, seed=7, num_workers=2)
    fallback = make_loader(dataset, split, batch_size=4, loader="torch", image_size=40, seed=7, num_workers=2)
    for epoch in range(2):
        dali.set_epoch(epoch)
        fallback.set_epoch(epoch)
        pairs = list(zip(dali, fallback, strict=True))
        for a, b in pairs:
            assert torch.equal(a.sample_indices, b.sample_indices) and torch.equal(a.labels, b.labels)
            if split == "val":  # same crop; the two resize filters and JPEG decoders differ a little
                assert (a.images - b.images).abs().mean() < 0.1


@pytest.mark.parametrize("loader", LOADERS)
def test_training_augmentation_is_random_and_reproducible(dataset, loader):
    def first_epochs(seed):
        data = make_loader(dataset, "train", batch_size=4, loader=loader, image_size=32, seed=seed, num_workers=1)
        out = {}
        for epoch in range(2):
            data.set_epoch(epoch)
            for batch in data:
                for index, image in zip(batch.sample_indices.tolist(), batch.images):
                    out[(epoch, index)] = image
        return out

    first, again, other = first_epochs(0), first_epochs(0), first_epochs(1)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)  # same seed, same images
    shared = [(e, i) for e, i in first if (1 - e, i) in first]
    assert any(not torch.allclose(first[(0, i)], first[(1, i)]) for e, i in shared if e == 0)  # new crops
    assert any(not torch.equal(first[k], other[k]) for k in first.keys() & other.keys())


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_validation_reads_every_sample_once(dataset, loader, world_size):
    seen = []
    for rank in range(world_size):
        data = make_loader(dataset, "val", batch_size=2, loader=loader, image_size=16, rank=rank,
                           world_size=world_size, num_workers=0 if loader == "torch" else 1)
        seen += [i for b in data for i in b.sample_indices.tolist()]
    assert sorted(seen) == list(range(9)) and len(seen) == 9


@pytest.mark.parametrize("loader", LOADERS)
def test_resuming_mid_epoch_skips_what_was_read(dataset, loader):
    data = make_loader(dataset, "train", batch_size=4, loader=loader, image_size=16, num_workers=1)
    whole = [b.sample_indices for b in data.iterate(3)]
    first = next(iter(data.iterate(3)))  # an epoch left unfinished
    assert torch.equal(first.sample_indices, whole[0])
    rest = [b.sample_indices for b in data.iterate(3, start_batch=2)]
    assert len(rest) == len(whole) - 2 and all(torch.equal(a, b) for a, b in zip(rest, whole[2:]))
    with pytest.raises(ValueError, match="start_batch must be in"):
        data.iterate(0, start_batch=len(data) + 1)


@pytest.mark.parametrize("loader", LOADERS)
def test_corrupt_jpeg_stops_the_loader_with_its_name(corrupt_dataset, loader):
    root, bad = corrupt_dataset
    # Found when the split is indexed, before any decoder sees it (tests/test_data_hardening.py
    # has every kind of bad file, and files damaged after indexing).
    with pytest.raises(DatasetError, match=rf"(?s){bad}: truncated JPEG.*kdfast data verify.*--exclude bad.txt"):
        make_loader(root, "train", batch_size=4, loader=loader, image_size=16, num_workers=1)
    # Excluding what `kdfast data verify` lists makes the run go through.
    report = verify_dataset(root, workers=1)
    assert [path for path, _ in report.corrupt] == [bad] and "truncated" in report.corrupt[0][1]
    data = make_loader(root, "train", batch_size=4, loader=loader, image_size=16, num_workers=1, exclude=[bad])
    assert sum(len(b.labels) for b in data) == 20


def test_loader_arguments_are_checked(dataset):
    with pytest.raises(ValueError, match="loader must be one of"):
        make_loader(dataset, batch_size=2, loader="pil")
    with pytest.raises(ValueError, match="dtype must be one of"):
        make_loader(dataset, batch_size=2, loader="torch", dtype=torch.float64)
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        make_loader(dataset, batch_size=2, image_size=0)
    with pytest.raises(ValueError, match="resize_size must be >= image_size"):
        make_loader(dataset, batch_size=2, image_size=64, resize_size=32)
    with pytest.raises(ValueError, match="not even one training step"):
        make_loader(dataset, batch_size=16, world_size=2)


# ----------------------------------------------------------------------------- digits


def test_digits_in_memory():
    train = make_loader("digits", "train", batch_size=100)
    val = make_loader("digits", "val", batch_size=100)
    assert train.num_samples + val.num_samples == 1797 and train.num_classes == 10
    assert len(train) == train.num_samples // 100 and train.image_shape == (1, 8, 8)
    batches = list(val)
    images = torch.cat([b.images for b in batches])
    assert torch.equal(torch.cat([b.sample_indices for b in batches]), torch.arange(val.num_samples))
    assert images.shape == (val.num_samples, 1, 8, 8) and abs(images.mean()) < 0.1
    labels = torch.cat([b.labels for b in batches])
    assert torch.bincount(labels).min() >= 50  # a stratified split: every digit is there
    first, again = next(iter(train)), next(iter(train))
    assert torch.equal(first.images, again.images)  # the same seed and epoch: the same shifts
    train.set_epoch(1)
    assert not torch.equal(next(iter(train)).sample_indices, first.sample_indices)


def test_digits_training_shifts_by_at_most_one_pixel():
    train = make_loader("digits", "train", batch_size=64)
    plain = make_loader("digits", "val", batch_size=64)  # unshifted reference for the same pipeline
    batch = next(iter(train))
    from kdfast.data.digits import digits_split

    images, _, _ = digits_split("train")
    mean, std = images.mean(), images.std()
    originals = (torch.from_numpy(images[batch.sample_indices.numpy()]) - mean) / std
    background = float(-mean / std)
    padded = torch.nn.functional.pad(originals, (1, 1, 1, 1), value=background)
    for image, original in zip(batch.images[:, 0], padded):
        assert any(torch.allclose(image, original[1 + dy:9 + dy, 1 + dx:9 + dx])
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    assert plain.image_shape == (1, 8, 8)
    resized = make_loader("digits", "val", batch_size=8, image_size=16, dtype=torch.bfloat16, channels_last=True)
    batch = next(iter(resized))
    assert batch.images.shape == (8, 1, 16, 16) and batch.images.dtype == torch.bfloat16


def test_digits_refuse_a_file_loader():
    with pytest.raises(ValueError, match="kdfast data demo DIR"):
        make_loader("digits", batch_size=8, loader="dali")


@pytest.mark.parametrize("loader", LOADERS)
def test_digits_jpeg_folder(tmp_path, loader):
    counts = write_digits_folder(tmp_path / "digits", size=16)
    assert counts == {"train": 1257, "val": 540}
    val = make_loader(tmp_path / "digits", "val", batch_size=64, loader=loader, image_size=16, resize_size=16,
                      num_workers=1)
    memory = make_loader("digits", "val", batch_size=540)
    assert val.classes == [str(d) for d in range(10)] and val.num_samples == 540
    # The folder holds the same split: per class, the same number of validation samples.
    labels = torch.cat([b.labels for b in val])
    assert torch.equal(torch.bincount(labels), torch.bincount(next(iter(memory)).labels))


# ----------------------------------------------------------------------------- CLI


def test_cli_demo_and_verify(tmp_path, capsys):
    assert cli.main(["data", "demo", str(tmp_path / "d"), "--size", "12"]) == 0
    assert "wrote 1257 training and 540 validation images" in capsys.readouterr().out
    assert cli.main(["data", "verify", str(tmp_path / "d"), "--workers", "2"]) == 0
    assert "decoded 1797 images (train: 1257, val: 540), 10 classes" in capsys.readouterr().out
    bad = tmp_path / "d/val/3/"
    victim = sorted(bad.iterdir())[0]
    _truncate(victim, keep=200)
    output = tmp_path / "bad.txt"
    assert cli.main(["data", "verify", str(tmp_path / "d"), "--output", str(output)]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT {victim}" in out and "1 image(s) cannot be decoded" in out
    assert output.read_text() == f"{victim}\n"
    assert cli.main(["data", "verify", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["data", "demo", str(tmp_path / "e"), "--size", "4"]) == 2
