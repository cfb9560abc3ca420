"""``cvsparse_triton::mixed_partial_dot``: ``[Σ c·v·sign(w), Σ c·v·w]`` per tensor
(docs/method.md §3).

Two launches, both deterministic (no floating-point atomics):

1. one multi-tensor launch (see ``_launch.py``): each program reduces one block of one tensor
   to two partial sums, accumulated in float32 (float64 for float64 inputs), written to its own
   row of a ``(n_blocks, 2)`` buffer;
2. one program per tensor sums its blocks' partials in a fixed order, in float64, and writes
   its output row (float64 for float64 inputs, float32 otherwise).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch
from ._launch import block_span, column

_REDUCE_BLOCK = 256  # partials summed per step by a program of the second launch


@triton.jit
def _partial_sums_kernel(table_ptr, n_blocks, partial_ptr,
                         DTYPE: tl.constexpr, ACC: tl.constexpr, HAS_PRECOND: tl.constexpr,
                         BLOCK: tl.constexpr):
    # table columns: numel, first block, params, vectors, precond
    tensor, row, offs, inb = block_span(table_ptr, n_blocks, 5, BLOCK)
    w = tl.load(column(row, 0, DTYPE) + offs, mask=inb, other=0.0).to(ACC)
    q = tl.load(column(row, 1, DTYPE) + offs, mask=inb, other=0.0).to(ACC)
    if HAS_PRECOND:
        q = q * tl.load(column(row, 2, DTYPE) + offs, mask=inb, other=0.0).to(ACC)
    signed = tl.where(w > 0, q, tl.where(w < 0, -q, 0.0))
    out = partial_ptr + 2 * tl.program_id(0)
    tl.store(out, tl.sum(signed))
    tl.store(out + 1, tl.sum(q * w))


@triton.jit
def _sum_partials_kernel(table_ptr, n_blocks, partial_ptr, out_ptr,
                         OUT: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    tensor = tl.program_id(0)
    row = table_ptr + n_blocks + tensor * 5
    count = (tl.load(row) + BLOCK - 1) // BLOCK
    first = tl.load(row + 1)
    acc_sign = tl.zeros([RBLOCK], dtype=tl.float64)
    acc_w = tl.zeros([RBLOCK], dtype=tl.float64)
    for start in range(0, count, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        ptrs = partial_ptr + 2 * (first + idx)
        acc_sign += tl.load(ptrs, mask=idx < count, other=0.0).to(tl.float64)
        acc_w += tl.load(ptrs + 1, mask=idx < count, other=0.0).to(tl.float64)
    tl.store(out_ptr + 2 * tensor, tl.sum(acc_sign).to(OUT))
    tl.store(out_ptr + 2 * tensor + 1, tl.sum(acc_w).to(OUT))


@torch.library.custom_op("cvsparse_triton::mixed_partial_dot", mutates_args=(),
                         schema=_launch.schema("mixed_partial_dot"))
def mixed_partial_dot(params: list[Tensor], vectors: list[Tensor],
                      precond: list[Tensor]) -> Tensor:
    """Row l = ``[Σ c·v·sign(w), Σ c·v·w]`` over ``params[l]`` (normalized arguments of
    ``cvsparse.ops.reference.mixed_partial_dot``); shape ``(n, 2)``."""
    _launch.check_params(params)
    _launch.check_companions("vectors", vectors, params)
    if precond:
        _launch.check_companions("precond", precond, params)
    out = _output_like(params)
    block = _launch.block_size()
    table, n_blocks = _launch.launch_table([params, vectors, precond], block)
    if n_blocks == 0:
        return out.zero_()
    dtype = params[0].dtype
    partials = torch.empty(n_blocks, 2, dtype=out.dtype, device=out.device)  # dtype of ACC
    _partial_sums_kernel[(n_blocks,)](
        table, n_blocks, partials,
        DTYPE=_launch.TL_DTYPES[dtype], ACC=_launch.opmath(dtype), HAS_PRECOND=bool(precond),
        BLOCK=block,
    )
    _sum_partials_kernel[(len(params),)](
        table, n_blocks, partials, out,
        OUT=_launch.TL_DTYPES[out.dtype], BLOCK=block, RBLOCK=_REDUCE_BLOCK,
    )
    return out


@mixed_partial_dot.register_fake
def _(params, vectors, precond):
    return _output_like(params)


def _output_like(params: list[Tensor]) -> Tensor:
    """Uninitialized ``(n, 2)`` result: float64 for float64 params, float32 otherwise."""
    dtype = torch.float64 if params and params[0].dtype == torch.float64 else torch.float32
    device = params[0].device if params else torch.device("cpu")
    return torch.empty(len(params), 2, dtype=dtype, device=device)

