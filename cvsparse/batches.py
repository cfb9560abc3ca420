"""A fast loader of mini-batches from images held in memory, with the standard CIFAR
augmentation (random crop after zero padding, horizontal flip) applied to whole batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: Zero padding (pixels per side) of the random-crop augmentation.
CROP_PADDING = 4


def random_crop_flip(
    images: Tensor,
    padding: int = CROP_PADDING,
    generator: torch.Generator | None = None,
    *,
    flip: bool = True,
) -> Tensor:
    """Standard CIFAR augmentation of a whole uint8 ``(N, C, H, W)`` batch: zero-pad by
    ``padding`` pixels, crop a random H×W window, then (``flip``) flip horizontally with
    probability 1/2; independent draws per image (from ``generator``; three ``randint`` calls
    per batch, two without ``flip``).  Without ``flip`` this is a random translation by up to
    ``padding`` pixels in each direction (MNIST's digit-safe augmentation).
    Returns a new ``(N, C, H, W)`` tensor."""
    n, c, h, w = images.shape
    span = 2 * padding + 1
    dy = torch.randint(0, span, (n,), generator=generator)
    dx = torch.randint(0, span, (n,), generator=generator)
    cols = torch.arange(w).expand(n, w)
    if flip:
        flipped = torch.randint(0, 2, (n,), generator=generator).bool()
        cols = torch.where(flipped[:, None], w - 1 - cols, cols)
    cols = cols + dx[:, None]
    rows = dy[:, None] + torch.arange(h)
    flat = rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]
    padded = F.pad(images, (padding, padding, padding, padding)).reshape(n, c, -1)
    out = padded.gather(2, flat.reshape(n, 1, h * w).expand(n, c, h * w))
    return out.view(n, c, h, w)


class BatchLoader:
    """Mini-batches ``(x, y)`` from in-memory data: ``x`` float32 ``(B, C, H, W)`` normalized
    as ``(pixel / 255 − mean) / std`` per channel, ``y`` int64 ``(B,)``.

    ``images_u8`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``, ``indices`` the int64
    positions to serve (e.g. one side of :func:`cvsparse.data.split_indices`).  Each pass
    covers every index once: in the given order, or, with ``shuffle``, in an order drawn
    (``randperm``) from ``generator`` when the pass starts.  ``augment`` applies
    :func:`random_crop_flip` (padding ``crop_padding`` ≥ 0 pixels, horizontal flips if
    ``flip``) to each batch, drawing from the same generator.  Restoring the generator's state
    before a pass therefore reproduces that pass exactly.  ``generator=None`` uses torch's
    global generator.  Batches stay on the CPU.
    """

    def __init__(
        self,
        images_u8: Tensor,
        labels: Tensor,
        indices: Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        mean: Sequence[float],
        std: Sequence[float],
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        crop_padding: int = CROP_PADDING,
        flip: bool = True,
    ) -> None:
        if not isinstance(images_u8, Tensor) or images_u8.dtype != torch.uint8:
            raise ValueError("images_u8 must be a uint8 tensor")
        if images_u8.dim() != 4:
            raise ValueError(f"images_u8 must be (N, C, H, W), got shape {tuple(images_u8.shape)}")
        n, c = images_u8.shape[:2]
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != (n,):
            raise ValueError(f"labels must be an int64 tensor of shape ({n},)")
        if (
            not isinstance(indices, Tensor)
            or indices.dim() != 1
            or indices.dtype not in (torch.int64, torch.int32)
        ):
            raise ValueError("indices must be a 1-D int64 (or int32) tensor")
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise ValueError(f"indices must lie in [0, {n})")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {crop_padding!r}")
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean and std must have {c} entries (one per channel)")
        if any(not s > 0 for s in std):
            raise ValueError(f"std entries must be positive, got {tuple(std)}")
        if generator is not None and (
            not isinstance(generator, torch.Generator) or generator.device.type != "cpu"
        ):
            raise ValueError("generator must be a CPU torch.Generator or None")
        self.images = images_u8
        self.labels = labels
        self.indices = indices.to(torch.int64, copy=True)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.crop_padding = crop_padding
        self.flip = flip
        self.generator = generator
        self.drop_last = drop_last
        std_t = torch.tensor(std, dtype=torch.float64)
        mean_t = torch.tensor(mean, dtype=torch.float64)
        self._scale = (1.0 / (255.0 * std_t)).float().view(1, c, 1, 1)
        self._shift = (-mean_t / std_t).float().view(1, c, 1, 1)

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.indices
        if self.shuffle:
            order = order[torch.randperm(len(order), generator=self.generator)]
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.images.index_select(0, idx)
            if self.augment:
                x = random_crop_flip(x, self.crop_padding, self.generator, flip=self.flip)
            yield torch.addcmul(self._shift, x.float(), self._scale), self.labels.index_select(
                0, idx
            )
