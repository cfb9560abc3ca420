"""``cvsparse_triton::sparse_matmul``: sparse × dense product ``W @ input`` (+ bias, ReLU) for
Linear layers and 1×1 convolutions.

``W`` (M × K) is packed per output row (``cvsparse/ops/sparse_format.py``): ``values``,
``col_deltas`` (a row's first column, then the distance to the previous one) and ``row_ptr``.
One program computes a block of ``BLOCK_N`` outputs of one row: it walks the row's nonzeros
``BLOCK_NZ`` at a time, decodes their columns with a prefix sum of the deltas (plus the last
column of the previous block), gathers the ``BLOCK_NZ`` input rows at those columns (each a
contiguous run of ``BLOCK_N`` elements), and accumulates ``Σ v · x`` in opmath (float32, or
float64 for float64).  Bias and ReLU are applied before the only store.  Row is the fastest
grid axis, so programs running together read the same input columns (L2 reuse).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cvsparse.ops import _checks

from . import _launch

MAX_GRID_YZ = 65535  # CUDA's limit on the second and third grid dimensions
GPU_BLOCK_N, GPU_BLOCK_NZ = 128, 16
INTERPRETER_BLOCK_N, INTERPRETER_BLOCK_NZ = 512, 64  # the interpreter: few, large programs


def block_shape(n: int) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_NZ)``: output columns per program (a power of two between 16 and the
    default) and nonzeros per step.  A narrower block (small N, e.g. a Linear layer at batch 1)
    takes up to 4× more nonzeros per step, so a step still gathers a tile of similar size."""
    cap_n = INTERPRETER_BLOCK_N if _launch.INTERPRETED else GPU_BLOCK_N
    block_nz = INTERPRETER_BLOCK_NZ if _launch.INTERPRETED else GPU_BLOCK_NZ
    block_n = max(16, min(cap_n, triton.next_power_of_2(max(n, 1))))
    return block_n, block_nz * max(1, min(4, cap_n // block_n))


@triton.jit
def decode_columns(delta_ptr, k, nz, carry):
    """Absolute columns of the nonzeros ``k`` (``nz``: inside the row) and the row's running
    column after them, from the deltas and the running column ``carry`` before them."""
    d = tl.load(delta_ptr + k, mask=nz, other=0)
    return carry + tl.cumsum(d, axis=0), carry + tl.sum(d, axis=0)


@triton.jit
def epilogue(acc, bias_ptr, row, HAS_BIAS: tl.constexpr, RELU: tl.constexpr):
    """``acc`` (+ ``bias[row]``) (then ReLU, ``y < 0 → 0`` so that NaN stays NaN)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + row).to(acc.dtype)
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc).to(acc.dtype)
    return acc


@triton.jit
def _sparse_matmul_kernel(x_ptr, val_ptr, delta_ptr, row_ptr, bias_ptr, out_ptr, n,
                          HAS_BIAS: tl.constexpr, RELU: tl.constexpr, OPMATH: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_NZ: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = cols < n
    begin = tl.load(row_ptr + row)
    end = tl.load(row_ptr + row + 1)
    acc = tl.zeros([BLOCK_N], dtype=OPMATH)
    carry = begin - begin  # the row's running column (int32 zero)
    for start in range(begin, end, BLOCK_NZ):
        k = start + tl.arange(0, BLOCK_NZ)
        nz = k < end
        col, carry = decode_columns(delta_ptr, k, nz, carry)
        v = tl.load(val_ptr + k, mask=nz, other=0.0).to(OPMATH)
        x = tl.load(x_ptr + col.to(tl.int64)[:, None] * n + cols[None, :],
                    mask=nz[:, None] & live[None, :], other=0.0).to(OPMATH)
        acc += tl.sum(v[:, None] * x, axis=0)
    acc = epilogue(acc, bias_ptr, row, HAS_BIAS, RELU)
    tl.store(out_ptr + row.to(tl.int64) * n + cols, acc.to(out_ptr.dtype.element_ty), mask=live)


def check_weight(input: Tensor, values: Tensor, col_deltas: Tensor, row_ptr: Tensor,
                 bias: Tensor | None, num_columns: int) -> int:
    """The metadata the kernels rely on (dtypes, devices, shapes, layouts; the public operator
    has checked the index values) and the device; returns the number of rows M."""
    rows = _checks.sparse_weight(input, values, col_deltas, row_ptr, bias, num_columns,
                                 check_format=False)
    _launch.tl_dtype("input", input)
    _launch.check_device(input.device)
    return rows


def check_grid(size: int, what: str) -> None:
    """Raise when ``size`` programs exceed a secondary grid dimension."""
    if size > MAX_GRID_YZ:
        raise ValueError(f"{size} {what} exceed the grid limit of {MAX_GRID_YZ} programs")


def _check_input(input: Tensor) -> None:
    if input.dim() != 2:
        raise ValueError(f"input must be (K, N), got shape {tuple(input.shape)}")


@torch.library.custom_op("cvsparse_triton::sparse_matmul", mutates_args=(),
                         schema=_launch.schema("sparse_matmul"))
def sparse_matmul(input: Tensor, values: Tensor, col_deltas: Tensor, row_ptr: Tensor,
                  bias: Tensor | None, relu: bool) -> Tensor:
    """``W @ input`` (+ ``bias[m]`` on row m) (then ReLU): input ``(K, N)`` contiguous, the
    packed ``W`` (M × K), output ``(M, N)`` contiguous in input's dtype (normalized arguments of
    ``cvsparse.ops.reference.sparse_matmul``)."""
    _check_input(input)
    rows = check_weight(input, values, col_deltas, row_ptr, bias, input.shape[0])
    n = input.shape[1]
    out = torch.empty((rows, n), dtype=input.dtype, device=input.device)
    if out.numel() == 0:
        return out
    block_n, block_nz = block_shape(n)
    check_grid(triton.cdiv(n, block_n), "column blocks")
    _sparse_matmul_kernel[(rows, triton.cdiv(n, block_n))](
        input, values, col_deltas, row_ptr, input if bias is None else bias, out, n,
        HAS_BIAS=bias is not None, RELU=bool(relu), OPMATH=_launch.opmath(input.dtype),
        BLOCK_N=block_n, BLOCK_NZ=block_nz,
    )
    return out


@sparse_matmul.register_fake
def _(input, values, col_deltas, row_ptr, bias, relu):
    _check_input(input)
    return input.new_empty((row_ptr.shape[0] - 1, input.shape[1]))
