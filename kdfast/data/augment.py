"""The training augmentation of image folders, drawn and applied in one place.

:func:`train_augmentation` draws a sample's random-resized-crop box and horizontal flip
from ``(seed, epoch, sample index, width, height)`` alone, and :func:`apply_augmentation`
turns a decoded image, a box and a flip into the ``image_size`` × ``image_size`` uint8
crop. The PyTorch loader (:mod:`kdfast.data.torch_loader`) trains online with these two
functions, and the offline teacher (:mod:`kdfast.cache`) records the boxes and flips that
:func:`train_augmentation` draws and feeds its teacher the crops that
:func:`apply_augmentation` makes of them: a cache's recorded crops are exactly those that
online torch-loader training draws with the same seed.

The rule (torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip``, written on
Pillow): ``rng = numpy.random.default_rng([seed, epoch, index])``, then
:func:`random_resized_crop_box` (area 8–100 %, aspect ratio 3/4–4/3 log-uniform, ten tries
then the largest central crop within the ratios), then ``rng.random() < 0.5`` for the flip.
The crop is resized with Pillow's antialiased bilinear filter straight from the box.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from kdfast.data.folder import EXCLUDE_HINT, DatasetError

#: What :func:`train_augmentation` and :func:`apply_augmentation` do, as recorded in a
#: teacher cache's manifest (a change to the rule must change this description).
TRAIN_TRANSFORM = {
    "kind": "random_resized_crop+hflip",
    "area": [0.08, 1.0],
    "ratio": [3 / 4, 4 / 3],
    "attempts": 10,
    "flip_probability": 0.5,
    "rng": "numpy.random.default_rng([seed, epoch, index]): crop box, then random() < 0.5 flips",
    "resize": "pillow bilinear (antialiased) from the box in source pixels",
    "decoder": "pillow",
}


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, area=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop covering ``area`` of the image at an
    aspect ratio drawn log-uniformly from ``ratio``; after ten misses, the largest central
    crop whose aspect ratio is within ``ratio``."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = width * height * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    image_ratio = width / height
    if image_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif image_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def train_augmentation(seed: int, epoch: int, index: int, width: int, height: int
                       ) -> tuple[tuple[int, int, int, int], bool]:
    """The crop box (left, top, right, bottom, in source pixels) and the flip of sample
    ``index`` in ``epoch`` for an image of ``width`` × ``height`` (see the module doc)."""
    rng = np.random.default_rng([seed, epoch, index])
    box = random_resized_crop_box(width, height, rng)
    return box, bool(rng.random() < 0.5)


def center_crop_box(width: int, height: int, image_size: int, resize_size: int) -> tuple[float, float, float, float]:
    """The region of the original image that resize-shorter-side + center-crop keeps."""
    side = image_size * min(width, height) / resize_size
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a decoded image. Pillow's own conversion clips 16-bit and 32-bit
    grayscale (PNG) to 255; these are scaled by 255/65535 instead, as DALI does."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        wide = np.asarray(image, dtype=np.int64).clip(0, 65535)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    return image.convert("RGB")


def decode_rgb(path: str) -> Image.Image:
    """The whole file decoded as 8-bit RGB; DatasetError naming the file when it does not decode."""
    try:
        with Image.open(path) as image:
            return to_rgb(image)  # decodes the whole file: a truncated one raises here
    except Exception as error:  # noqa: BLE001 - whatever Pillow raises, the file is what to report
        raise DatasetError(f"cannot decode {path} ({type(error).__name__}: {error}). {EXCLUDE_HINT}") from error


def apply_augmentation(image: Image.Image, box, flip: bool, image_size: int) -> np.ndarray:
    """uint8 [image_size, image_size, 3]: ``box`` of ``image`` resized (bilinear), then
    mirrored left-right when ``flip``."""
    image = image.resize((image_size, image_size), Image.BILINEAR, box=tuple(box))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(image)
