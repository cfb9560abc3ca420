"""``imagefolder:<path>`` datasets: a folder laid out for torchvision's ``ImageFolder``, read
once into the in-memory :class:`cvsparse.images.Dataset` record (docs/data.md).

    <path>/train/<class>/**/<image>      training images (the validation split is held out
    <path>/val/<class>/**/<image>        of these); val/ is the test set

Classes are the sorted names of the folders in ``train/`` (label = position), images the files
with an :data:`IMG_EXTENSIONS` suffix below each class folder, walked in sorted order: the
labels and order of ``torchvision.datasets.ImageFolder``.  Every image is decoded with PIL,
converted to RGB, resized (bilinear) so its shorter side is :func:`resize_side` pixels and
center-cropped to ``image_size`` × ``image_size``: torchvision's ``Resize`` + ``CenterCrop``.
Folders whose decoded images would exceed :data:`MAX_DECODED_BYTES` are refused before any
image is decoded.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch

from cvsparse.images import Dataset, channel_stats

#: Prefix of a dataset name that is an image folder.
PREFIX = "imagefolder:"
#: ``data.image_size`` when unset: the side of the square images (pixels).
DEFAULT_IMAGE_SIZE = 224
#: Largest decoded size (uint8 bytes of train/ and val/ together) a folder may have.
MAX_DECODED_BYTES = 4 * 2**30
#: File suffixes read as images (torchvision's ``IMG_EXTENSIONS``), compared in lower case.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")


def is_image_folder(dataset: str) -> bool:
    """Whether the dataset name ``dataset`` is ``imagefolder:<path>``."""
    return dataset.startswith(PREFIX)


def folder_path(dataset: str) -> Path:
    """The folder ``imagefolder:<path>`` names (``~`` expanded)."""
    return Path(dataset[len(PREFIX):]).expanduser()


def resize_side(image_size: int) -> int:
    """Shorter side (pixels) images are resized to before the center crop: 8/7 of
    ``image_size``, rounded (256 for 224)."""
    return round(image_size * 8 / 7)


def crop_padding(image_size: int) -> int:
    """Zero padding (pixels per side) of the random-crop augmentation of training batches:
    an eighth of the side, at least 1 (4 for 32, CIFAR's; 28 for 224)."""
    return max(1, round(image_size / 8))


def _class_folders(split: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split) if entry.is_dir())


def check_folder(root: Path) -> list[str]:
    """The class names of the image folder ``root``; ValueError (one line) if it is missing,
    lacks ``train/`` or ``val/``, or their class folders are absent or differ."""
    where = f"imagefolder {root}"
    if not root.is_dir():
        raise ValueError(f"{where}: no such folder")
    classes: dict[str, list[str]] = {}
    for split in SPLITS:
        if not (root / split).is_dir():
            raise ValueError(f"{where}: no {split}/ folder (it needs train/ and val/, each "
                             "with one folder per class)")
        classes[split] = _class_folders(root / split)
        if not classes[split]:
            raise ValueError(f"{where}: {split}/ holds no class folders")
    if classes["train"] != classes["val"]:
        differ = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise ValueError(f"{where}: train/ and val/ have different class folders "
                         f"({', '.join(differ[:5])} in only one of them)")
    return classes["train"]


def list_images(root: Path, classes: list[str]) -> dict[str, list[tuple[Path, int]]]:
    """``(file, label)`` of every image of each split, in ImageFolder's order; ValueError
    naming a class folder without images."""
    samples: dict[str, list[tuple[Path, int]]] = {}
    for split in SPLITS:
        samples[split] = []
        for label, name in enumerate(classes):
            found = [Path(dirpath) / f
                     for dirpath, _, files in sorted(os.walk(root / split / name, followlinks=True))
                     for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
            if not found:
                raise ValueError(f"imagefolder {root}: {split}/{name}/ holds no images "
                                 f"({', '.join(IMG_EXTENSIONS)})")
            samples[split] += [(path, label) for path in found]
    return samples


def _decode(data: bytes, image_size: int, where: Path) -> np.ndarray:
    """uint8 ``(3, S, S)``: the image in ``data`` as RGB, shorter side resized to
    :func:`resize_side` (bilinear), center-cropped to ``image_size``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{where}: not a readable image ({exc})") from None
    w, h = image.size
    side = resize_side(image_size)
    size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    left = int(round((size[0] - image_size) / 2.0))
    top = int(round((size[1] - image_size) / 2.0))
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def load(name: str, root: Path, image_size: int) -> Dataset:
    """The image folder ``root`` as a :class:`Dataset` called ``name`` (``train/`` → training
    images, ``val/`` → test images), its ``digest`` the SHA-256 of every file's relative path,
    size and content in order.  ValueError (one line) for a bad folder, an unreadable image or
    a decoded size above :data:`MAX_DECODED_BYTES`."""
    classes = check_folder(root)
    samples = list_images(root, classes)
    count = sum(len(s) for s in samples.values())
    decoded = count * 3 * image_size * image_size
    if decoded > MAX_DECODED_BYTES:
        raise ValueError(f"imagefolder {root}: {count:,} images of 3x{image_size}x{image_size} "
                         f"take {decoded / 2**20:,.0f} MiB decoded, above the "
                         f"{MAX_DECODED_BYTES / 2**20:,.0f} MiB limit; use a smaller "
                         "--image-size (data.image_size) or fewer images")
    digest = hashlib.sha256()
    arrays = {}
    for split, items in samples.items():
        images = torch.empty(len(items), 3, image_size, image_size, dtype=torch.uint8)
        for i, (path, _) in enumerate(items):
            data = path.read_bytes()
            digest.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
            digest.update(data)
            images.numpy()[i] = _decode(data, image_size, path)
        labels = torch.tensor([label for _, label in items], dtype=torch.int64)
        arrays[split] = (images, labels)
    mean, std = channel_stats(arrays["train"][0])
    return Dataset(name=name, x_train=arrays["train"][0], y_train=arrays["train"][1],
                   x_test=arrays["val"][0], y_test=arrays["val"][1], mean=mean, std=std,
                   num_classes=len(classes), source=root, digest=digest.hexdigest())
