"""``cvsparse_triton::max_abs``: the largest ``|x|`` of every tensor of a list (NaN for a tensor
holding a NaN, 0 for an empty one).

Two launches, like ``mixed_partial_dot``:

1. one multi-tensor launch (see ``_launch.py``): each program reduces one block of one tensor
   to its largest ``|x|`` in float32 (float64 for float64 inputs) and a NaN flag, written to its
   own slot;
2. one program per tensor takes the maximum of its blocks' slots (NaN if any is flagged) and
   writes its output entry (float64 for float64 inputs, float32 otherwise).

``tl.max`` does not promise to propagate NaN, so NaN is carried as a separate flag.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch
from ._launch import block_span, column

_REDUCE_BLOCK = 256  # partials reduced per step by a program of the second launch


@triton.jit
def _partial_max_kernel(table_ptr, n_blocks, partial_ptr, nan_ptr,
                        DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # table columns: numel, first block, tensors
    tensor, row, offs, inb = block_span(table_ptr, n_blocks, 3, BLOCK)
    x = tl.load(column(row, 0, DTYPE) + offs, mask=inb, other=0.0).to(ACC)
    is_nan = x != x
    largest = tl.max(tl.where(is_nan, 0.0, tl.abs(x)), axis=0)
    tl.store(partial_ptr + tl.program_id(0), largest)
    tl.store(nan_ptr + tl.program_id(0), tl.max(is_nan.to(tl.int32), axis=0))


@triton.jit
def _finish_kernel(table_ptr, n_blocks, partial_ptr, nan_ptr, out_ptr,
                   OUT: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    tensor = tl.program_id(0)
    row = table_ptr + n_blocks + tensor * 3
    count = (tl.load(row) + BLOCK - 1) // BLOCK
    first = tl.load(row + 1)
    acc = tl.zeros([RBLOCK], dtype=OUT)
    flag = tl.zeros([RBLOCK], dtype=tl.int32)
    for start in range(0, count, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        acc = tl.maximum(acc, tl.load(partial_ptr + first + idx, mask=idx < count, other=0.0))
        flag = tl.maximum(flag, tl.load(nan_ptr + first + idx, mask=idx < count, other=0))
    largest = tl.max(acc, axis=0)
    nan = tl.full([], float("nan"), OUT)
    tl.store(out_ptr + tensor, tl.where(tl.max(flag, axis=0) > 0, nan, largest))


@torch.library.custom_op("cvsparse_triton::max_abs", mutates_args=(),
                         schema=_launch.schema("max_abs"))
def max_abs(tensors: list[Tensor]) -> Tensor:
    """Largest ``|x|`` per tensor (normalized arguments of ``cvsparse.ops.reference.max_abs``);
    shape ``(n,)``."""
    _launch.check_params(tensors)
    out = _output_like(tensors)
    block = _launch.block_size()
    table, n_blocks = _launch.launch_table([tensors], block)
    if n_blocks == 0:
        return out.zero_()
    partials = torch.empty(n_blocks, dtype=out.dtype, device=out.device)
    flags = torch.empty(n_blocks, dtype=torch.int32, device=out.device)
    _partial_max_kernel[(n_blocks,)](
        table, n_blocks, partials, flags,
        DTYPE=_launch.TL_DTYPES[tensors[0].dtype], ACC=_launch.opmath(tensors[0].dtype),
        BLOCK=block,
    )
    _finish_kernel[(len(tensors),)](
        table, n_blocks, partials, flags, out,
        OUT=_launch.TL_DTYPES[out.dtype], BLOCK=block, RBLOCK=_REDUCE_BLOCK,
    )
    return out


@max_abs.register_fake
def _(tensors):
    return _output_like(tensors)


def _output_like(tensors: list[Tensor]) -> Tensor:
    """Uninitialized ``(n,)`` result: float64 for float64 tensors, float32 otherwise."""
    dtype = torch.float64 if tensors and tensors[0].dtype == torch.float64 else torch.float32
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.empty(len(tensors), dtype=dtype, device=device)
