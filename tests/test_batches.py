"""BatchLoader against direct computations: normalization, order and coverage, reproducible
shuffles, and augmented images that are crops (and flips) of the right source image."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cvsparse.batches import CROP_PADDING, BatchLoader
from cvsparse.data import split_indices


def make_loader(n=50, shape=(3, 6, 6), **kwargs):
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8)
    labels = torch.arange(n)
    args = {"shuffle": False, "augment": False, "mean": (0.1, 0.2, 0.3)[: shape[0]],
            "std": (0.5, 0.25, 0.2)[: shape[0]], "generator": None}
    args.update(kwargs)
    indices = args.pop("indices", torch.arange(n))
    batch_size = args.pop("batch_size", 8)
    return BatchLoader(images, labels, indices, batch_size, **args), images


def test_loader_normalizes_and_keeps_order():
    loader, images = make_loader()
    xs, ys = zip(*loader, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    mean = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.25, 0.2], dtype=torch.float64).view(1, 3, 1, 1)
    expected = (images.double() / 255 - mean) / std
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    # float32 ``shift + pixel·scale``: scale, shift, product and sum each rounded once
    # (2⁻²⁴ relative), so the error is at most 2⁻²⁴·(2·|pixel·scale| + |shift| + |result|)
    bound = 2.0**-24 * (2 * images.double() / (255 * std) + (mean / std).abs() + expected.abs())
    assert bool(((x.double() - expected).abs() <= bound).all())
    assert torch.equal(y, torch.arange(50))


def test_loader_covers_every_index_once_per_pass():
    train, _ = split_indices(103, 20, seed=3)
    g = torch.Generator().manual_seed(0)
    loader, _ = make_loader(n=103, indices=train, batch_size=16, shuffle=True, generator=g)
    assert len(loader) == 6
    for _ in range(2):
        ys = [y for _, y in loader]
        assert [len(y) for y in ys] == [16] * 5 + [3]
        assert torch.equal(torch.cat(ys).sort().values, train)
    dropped, _ = make_loader(n=103, indices=train, batch_size=16, shuffle=True, generator=g,
                             drop_last=True)
    ys = torch.cat([y for _, y in dropped])
    assert len(dropped) == 5 and len(ys) == 80 and len(ys.unique()) == 80
    assert torch.isin(ys, train).all()


def test_loader_shuffle_is_reproducible_from_generator_state():
    g = torch.Generator().manual_seed(11)
    loader, _ = make_loader(shuffle=True, augment=True, generator=g)
    global_state = torch.get_rng_state()
    state = g.get_state()
    first = list(loader)
    second = list(loader)
    g.set_state(state)
    replay = list(loader)
    assert torch.equal(torch.get_rng_state(), global_state)  # only the given generator is used
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in second]))
    for (x1, y1), (x2, y2) in zip(first, replay, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def all_crops(image: torch.Tensor, pad: int) -> torch.Tensor:
    """Every pad-and-crop window of ``image`` (C, H, W), unflipped and flipped: (2·(2p+1)², C,
    H, W), built by slicing (independent of the loader's gather)."""
    c, h, w = image.shape
    padded = F.pad(image, (pad, pad, pad, pad))
    crops = [padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * pad + 1)
             for dx in range(2 * pad + 1)]
    crops += [crop.flip(-1) for crop in crops]
    return torch.stack(crops)


def marked_images(n: int, h: int, w: int) -> torch.Tensor:
    """(n, 2, h, w) uint8 images: channel 0 numbers the pixels 1..h·w (no two windows or mirror
    images alike), channel 1 holds the image's index mod 250, plus one (which image it is)."""
    position = (torch.arange(h * w) + 1).view(1, h, w).expand(n, h, w)
    marker = (torch.arange(n) % 250 + 1).view(n, 1, 1).expand(n, h, w)
    return torch.stack([position, marker], dim=1).to(torch.uint8).contiguous()


def crop_indices(loader: BatchLoader, images: torch.Tensor, pad: int) -> list[int]:
    """For every image the loader yields, the index in :func:`all_crops` of the one window of
    the image its label names that it equals (the loader normalizes with mean 0, std 1)."""
    found = []
    for x, y in loader:
        out = (x * 255).round().to(torch.uint8)
        for image, label in zip(out, y, strict=True):
            matches = (all_crops(images[label], pad) == image).flatten(1).all(1)
            assert matches.sum() == 1, "output is not a crop/flip of the image its label names"
            found.append(int(matches.nonzero()))
    return found


def test_augmentation_is_a_random_crop_and_flip_of_the_right_image():
    n = 300
    images = marked_images(n, 8, 8)
    labels = torch.arange(n)
    kwargs = {"mean": (0.0, 0.0), "std": (1.0, 1.0), "generator": torch.Generator().manual_seed(0)}

    plain = BatchLoader(images, labels, torch.arange(n), 64, shuffle=True, augment=False, **kwargs)
    for x, y in plain:
        assert torch.equal((x * 255).round().to(torch.uint8), images[y])

    loader = BatchLoader(images, labels, torch.arange(n), 64, shuffle=True, augment=True, **kwargs)
    seen = crop_indices(loader, images, CROP_PADDING)
    # flips ~ Binomial(n, 1/2): within 5 standard deviations (√n/2) of n/2
    flips = sum(k >= 81 for k in seen)
    assert abs(flips - n / 2) < 5 * math.sqrt(n) / 2
    # 81 offsets drawn uniformly n = 300 times cover 81·(1 − (80/81)^300) ≈ 79 of them on
    # average; a fixed offset covers 1, and fewer than 70 has probability 4e-8 (occupancy law)
    assert len({k % 81 for k in seen}) >= 70


def test_unflipped_augmentation_is_a_shift_of_the_right_image():
    """``flip=False`` with ``crop_padding=2`` (MNIST's ``data.mnist_shift``): every image is a
    translation by at most 2 pixels each way, never mirrored; all 25 offsets occur."""
    n, pad = 200, 2
    images = marked_images(n, 7, 7)
    loader = BatchLoader(images, torch.arange(n), torch.arange(n), 50, shuffle=True,
                         augment=True, mean=(0.0, 0.0), std=(1.0, 1.0), crop_padding=pad,
                         flip=False, generator=torch.Generator().manual_seed(1))
    offsets = crop_indices(loader, images, pad)
    assert max(offsets) < (2 * pad + 1) ** 2, "an image was flipped"
    assert len(set(offsets)) == (2 * pad + 1) ** 2


@pytest.mark.parametrize("padding", [-1, 1.5, True])
def test_loader_rejects_bad_crop_padding(padding):
    with pytest.raises(ValueError, match="crop_padding"):
        make_loader(crop_padding=padding)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"images_u8": torch.zeros(4, 3, 6, 6)}, "images_u8"),
        ({"images_u8": torch.zeros(4, 18, 6, dtype=torch.uint8)}, "images_u8"),
        ({"labels": torch.zeros(3, dtype=torch.int64)}, "labels"),
        ({"labels": torch.zeros(4, dtype=torch.int32)}, "labels"),
        ({"indices": torch.tensor([0, 4])}, "indices"),
        ({"indices": torch.tensor([0.0, 1.0])}, "indices"),
        ({"batch_size": 0}, "batch_size"),
        ({"mean": (0.5,)}, "mean"),
        ({"std": (1.0, 0.0, 1.0)}, "std"),
        ({"generator": 0}, "generator"),
    ],
)
def test_loader_rejects_bad_arguments(change, match):
    args = {"images_u8": torch.zeros(4, 3, 6, 6, dtype=torch.uint8),
            "labels": torch.zeros(4, dtype=torch.int64), "indices": torch.arange(4),
            "batch_size": 2, "shuffle": False, "augment": False, "mean": (0.0,) * 3,
            "std": (1.0,) * 3, "generator": None}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        BatchLoader(**args)
