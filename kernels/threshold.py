"""``cvsparse_triton::threshold_``: magnitude pruning of a tensor list, in place
(docs/method.md §4).

One multi-tensor launch (see ``_launch.py``): each program computes ``keep = |w| ≥ τ and mask``
for one block of one tensor, multiplies ``w`` (and ``v``) by it, rewrites the mask, and adds
its kept count to its tensor's entry of the int64 output with an atomic add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch
from ._launch import block_span, column, scalar


@triton.jit
def _threshold_kernel(table_ptr, n_blocks, counts_ptr, tau: tl.float64,
                      DTYPE: tl.constexpr, OPMATH: tl.constexpr, HAS_BUFS: tl.constexpr,
                      BLOCK: tl.constexpr):
    # table columns: numel, first block, params, momentum_bufs, masks
    tensor, row, offs, inb = block_span(table_ptr, n_blocks, 5, BLOCK)
    w_ptr = column(row, 0, DTYPE)
    mask_ptr = column(row, 2, tl.int8)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(OPMATH)
    keep = (tl.abs(w) >= scalar(tau, OPMATH)) & (tl.load(mask_ptr + offs, mask=inb, other=0) != 0)
    factor = keep.to(OPMATH)  # multiply (not select) like Tensor.mul_: NaN·0 stays NaN
    tl.store(w_ptr + offs, (w * factor).to(DTYPE), mask=inb)
    if HAS_BUFS:
        v_ptr = column(row, 1, DTYPE)
        v = tl.load(v_ptr + offs, mask=inb, other=0.0).to(OPMATH)
        tl.store(v_ptr + offs, (v * factor).to(DTYPE), mask=inb)
    tl.store(mask_ptr + offs, keep.to(tl.int8), mask=inb)
    kept = tl.sum((keep & inb).to(tl.int32))
    tl.atomic_add(counts_ptr + tensor, kept.to(tl.int64))


@torch.library.custom_op("cvsparse_triton::threshold_",
                         mutates_args=("params", "momentum_bufs", "masks"),
                         schema=_launch.schema("threshold_"))
def threshold_(params: list[Tensor], momentum_bufs: list[Tensor], masks: list[Tensor],
               tau: float) -> Tensor:
    """Prune ``|w| < tau`` in place (normalized arguments of
    ``cvsparse.ops.reference.threshold_``); returns the int64 ``(n,)`` kept counts."""
    _launch.check_params(params)
    if momentum_bufs:
        _launch.check_companions("momentum_bufs", momentum_bufs, params)
    _launch.check_companions("masks", masks, params, dtype=torch.bool)
    counts = _launch.counts_like(params)
    block = _launch.block_size()
    table, n_blocks = _launch.launch_table([params, momentum_bufs, masks], block)
    if n_blocks == 0:
        return counts
    dtype = params[0].dtype
    _threshold_kernel[(n_blocks,)](
        table, n_blocks, counts, float(tau),
        DTYPE=_launch.TL_DTYPES[dtype], OPMATH=_launch.opmath(dtype),
        HAS_BUFS=bool(momentum_bufs), BLOCK=block,
    )
    return counts


@threshold_.register_fake
def _(params, momentum_bufs, masks, tau):
    return _launch.counts_like(params)
