"""``cvsparse_triton::prox_sgd_``: fused proximal SGD step with momentum (docs/method.md §2).

One launch updates every tensor of the list (see ``_launch.py``); each program updates one block
of one tensor in opmath, stores ``w`` (and ``v``) back in the tensor dtype, and adds the block's
count of stored nonzeros to its tensor's entry of the int64 output with an atomic add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch
from ._launch import block_span, column, scalar


@triton.jit
def _prox_sgd_kernel(table_ptr, n_blocks, lambda1_ptr, lambda2_ptr, counts_ptr,
                     lr: tl.float64, momentum: tl.float64,
                     DTYPE: tl.constexpr, OPMATH: tl.constexpr, HAS_BUFS: tl.constexpr,
                     HAS_MASKS: tl.constexpr, BLOCK: tl.constexpr):
    # table columns: numel, first block, params, grads, momentum_bufs, masks
    tensor, row, offs, inb = block_span(table_ptr, n_blocks, 6, BLOCK)
    w_ptr = column(row, 0, DTYPE)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(OPMATH)
    g = tl.load(column(row, 1, DTYPE) + offs, mask=inb, other=0.0).to(OPMATH)
    lam1 = tl.load(lambda1_ptr + tensor).to(OPMATH)
    lam2 = tl.load(lambda2_ptr + tensor).to(OPMATH)
    step = scalar(lr, OPMATH)

    d = g + lam2 * w
    if HAS_BUFS:
        v_ptr = column(row, 2, DTYPE)
        v = scalar(momentum, OPMATH) * tl.load(v_ptr + offs, mask=inb, other=0.0).to(OPMATH) + d
    else:
        v = d
    z = w - step * v
    shrunk = tl.maximum(tl.abs(z) - step * lam1, 0.0, propagate_nan=tl.PropagateNan.ALL)
    w = tl.where(z < 0, -shrunk, shrunk)
    if HAS_MASKS:
        keep = tl.load(column(row, 3, tl.int8) + offs, mask=inb, other=0) != 0
        w = tl.where(keep, w, 0.0)
        v = tl.where(keep, v, 0.0)

    stored = w.to(DTYPE)
    tl.store(w_ptr + offs, stored, mask=inb)
    if HAS_BUFS:
        tl.store(v_ptr + offs, v.to(DTYPE), mask=inb)
    nonzero = tl.sum(((stored != 0) & inb).to(tl.int32))
    tl.atomic_add(counts_ptr + tensor, nonzero.to(tl.int64))


@torch.library.custom_op("cvsparse_triton::prox_sgd_", mutates_args=("params", "momentum_bufs"),
                         schema=_launch.schema("prox_sgd_"))
def prox_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_bufs: list[Tensor],
    masks: list[Tensor],
    lambda1: Tensor,
    lambda2: Tensor,
    lr: float,
    momentum: float,
) -> Tensor:
    """Proximal SGD step on every tensor of ``params``, in place (normalized arguments of
    ``cvsparse.ops.reference.prox_sgd_``); returns the int64 ``(n,)`` nonzero counts."""
    _launch.check_params(params)
    _launch.check_companions("grads", grads, params)
    if momentum_bufs:
        _launch.check_companions("momentum_bufs", momentum_bufs, params)
    if masks:
        _launch.check_companions("masks", masks, params, dtype=torch.bool)
    _launch.check_lambda("lambda1", lambda1, params)
    _launch.check_lambda("lambda2", lambda2, params)
    counts = _launch.counts_like(params)
    block = _launch.block_size()
    table, n_blocks = _launch.launch_table([params, grads, momentum_bufs, masks], block)
    if n_blocks == 0:
        return counts
    dtype = params[0].dtype
    _prox_sgd_kernel[(n_blocks,)](
        table, n_blocks, lambda1, lambda2, counts, float(lr), float(momentum),
        DTYPE=_launch.TL_DTYPES[dtype], OPMATH=_launch.opmath(dtype),
        HAS_BUFS=bool(momentum_bufs), HAS_MASKS=bool(masks), BLOCK=block,
    )
    return counts


@prox_sgd_.register_fake
def _(params, grads, momentum_bufs, masks, lambda1, lambda2, lr, momentum):
    return _launch.counts_like(params)
