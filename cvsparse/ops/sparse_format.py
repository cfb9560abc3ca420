"""The packed sparse-weight format of ``sparse_matmul`` / ``sparse_conv2d``.

A weight matrix ``W`` of shape ``(M, K)`` (M output channels; K inputs, or the flattened
``(c, i, j)`` of a ``C × kh × kw`` filter) is stored per output row, as in XNNPACK's sparse
inference (Elsen et al. 2020):

* ``values`` ``(nnz,)``: the nonzeros, row by row, columns increasing, in W's dtype;
* ``col_deltas`` ``(nnz,)`` int32: the first entry of a row is its first column index, each
  later entry the difference to the previous nonzero's column (≥ 1);
* ``row_ptr`` ``(M + 1,)`` int32: row m's nonzeros are ``[row_ptr[m], row_ptr[m + 1])``.

Plain PyTorch; every function works on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack", "unpack", "columns"]


def pack(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Packs a 2-D weight ``(M, K)``; returns ``(values, col_deltas, row_ptr)``.

    Exact zeros are dropped (``-0.0`` too); every other value, NaN included, is kept.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"pack takes a 2-D weight (M, K), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else weight!r}")
    w = weight.detach()
    mask = w != 0
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order: rows sorted, columns increasing
    values = w[rows, cols].contiguous()
    counts = mask.sum(dim=1)
    row_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.int64, device=w.device)
    row_ptr[1:] = counts.cumsum(0)
    deltas = cols.clone()
    if cols.numel() > 1:
        same_row = rows[1:] == rows[:-1]
        deltas[1:] = torch.where(same_row, cols[1:] - cols[:-1], cols[1:])
    if w.shape[0] * w.shape[1] >= 2**31:
        raise ValueError(f"weight {tuple(w.shape)} has 2**31 or more entries; int32 indices "
                         "cannot address it")
    return values, deltas.to(torch.int32).contiguous(), row_ptr.to(torch.int32).contiguous()


def columns(col_deltas: Tensor, row_ptr: Tensor) -> Tensor:
    """The absolute column index of every nonzero, int64 ``(nnz,)`` (decodes the deltas)."""
    running = col_deltas.to(torch.int64).cumsum(0)
    before = torch.cat([running.new_zeros(1), running])[row_ptr[:-1].to(torch.int64)]
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    return running - torch.repeat_interleave(before, counts, output_size=col_deltas.numel())


def unpack(values: Tensor, col_deltas: Tensor, row_ptr: Tensor, num_columns: int,
           dtype: torch.dtype | None = None) -> Tensor:
    """The dense ``(M, num_columns)`` weight (in ``dtype``, default ``values.dtype``) of a packed
    one; ``M = row_ptr.numel() - 1``."""
    m = row_ptr.numel() - 1
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(m, device=values.device), counts,
                                   output_size=values.numel())
    cols = columns(col_deltas, row_ptr)
    dense = torch.zeros(m, num_columns, dtype=dtype or values.dtype, device=values.device)
    dense[rows, cols] = values.to(dense.dtype)
    return dense
