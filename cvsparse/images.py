"""An image set held in memory (:class:`Dataset`) and its per-channel statistics: what the
built-in sets (:mod:`cvsparse.data`) and image folders (:mod:`cvsparse.imagefolder`) load into."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Dataset:
    """A whole dataset in memory.

    ``x_train``/``x_test``: uint8 ``(N, C, H, W)``; ``y_train``/``y_test``: int64 ``(N,)`` in
    ``[0, num_classes)``; ``mean``/``std``: per-channel statistics of the training images on the
    [0, 1] scale (population std over all training pixels); ``source``: the file or directory
    the data was read from; ``digest``: for an image folder, the SHA-256 of its files (names,
    sizes, contents; provenance compares it on resume), None otherwise.
    """

    name: str
    x_train: Tensor = field(repr=False)
    y_train: Tensor = field(repr=False)
    x_test: Tensor = field(repr=False)
    y_test: Tensor = field(repr=False)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    source: Path
    digest: str | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        _, c, h, w = self.x_train.shape
        return (c, h, w)


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 ``(N, C, H, W)`` images on the [0, 1]
    scale, computed exactly (float64) from a 256-bin histogram of each channel."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for ch in range(images.shape[1]):
        hist = torch.bincount(images[:, ch].reshape(-1), minlength=256).to(torch.float64)
        total = hist.sum()
        mean = (hist * values).sum() / total
        var = (hist * (values - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)
