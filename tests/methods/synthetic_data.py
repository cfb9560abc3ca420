"""A small synthetic in-memory classification task for the method tests."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def synthetic(n: int, seed: int) -> TensorDataset:
    """``n`` 1×8×8 images whose class (of 3) is the quadrant-sum pattern of the image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4, :4].sum((1, 2)) > 0).long() + (x[:, 0, 4:, 4:].sum((1, 2)) > 0).long()
    return TensorDataset(x, y)
