"""``cvsparse_triton::sparse_conv2d``: direct sparse convolution (groups 1, zero padding,
stride), bias and ReLU fused, NCHW.

The weight is packed per output channel (``cvsparse/ops/sparse_format.py``) over the columns
``(c, i, j)`` of a ``C × kh × kw`` filter.  One program computes ``BLOCK_P`` consecutive output
pixels (flattened ``oh·Wo + ow``) of one output channel of one image: it walks the channel's
nonzeros ``BLOCK_NZ`` at a time, decodes their columns (prefix sum of the deltas), splits each
column into ``(c, i, j)``, and gathers ``input[b, c, oh·sh − ph + i, ow·sw − pw + j]`` for its
pixels (zero in the padding), accumulating in opmath.  No im2col buffer is built.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch
from .sparse_matmul import block_shape, check_grid, check_weight, decode_columns, epilogue


@triton.jit
def _sparse_conv2d_kernel(x_ptr, val_ptr, delta_ptr, row_ptr, bias_ptr, out_ptr, rows,
                          channels, height, width, out_w, pixels, kw, taps,
                          stride_h, stride_w, pad_h, pad_w,
                          HAS_BIAS: tl.constexpr, RELU: tl.constexpr, OPMATH: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_NZ: tl.constexpr):
    row = tl.program_id(0)
    batch = tl.program_id(2).to(tl.int64)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    live = p < pixels
    top = (p // out_w) * stride_h - pad_h
    left = (p % out_w) * stride_w - pad_w
    image = x_ptr + batch * channels * height * width
    begin = tl.load(row_ptr + row)
    end = tl.load(row_ptr + row + 1)
    acc = tl.zeros([BLOCK_P], dtype=OPMATH)
    carry = begin - begin  # the channel's running column (int32 zero)
    for start in range(begin, end, BLOCK_NZ):
        k = start + tl.arange(0, BLOCK_NZ)
        nz = k < end
        col, carry = decode_columns(delta_ptr, k, nz, carry)
        c = col // taps
        tap = col % taps
        ih = top[None, :] + (tap // kw)[:, None]
        iw = left[None, :] + (tap % kw)[:, None]
        inside = (nz[:, None] & live[None, :] & (ih >= 0) & (ih < height) & (iw >= 0)
                  & (iw < width))
        offset = (c.to(tl.int64)[:, None] * height + ih) * width + iw
        x = tl.load(image + offset, mask=inside, other=0.0).to(OPMATH)
        v = tl.load(val_ptr + k, mask=nz, other=0.0).to(OPMATH)
        acc += tl.sum(v[:, None] * x, axis=0)
    acc = epilogue(acc, bias_ptr, row, HAS_BIAS, RELU)
    out = out_ptr + (batch * rows + row) * pixels
    tl.store(out + p, acc.to(out_ptr.dtype.element_ty), mask=live)


def _output_size(input: Tensor, kernel_size: list[int], stride: list[int],
                 padding: list[int]) -> tuple[int, int]:
    """``(Ho, Wo)``; raises on a bad input rank, parameters or a kernel larger than the padded
    input."""
    if input.dim() != 4:
        raise ValueError(f"input must be (B, C, H, W), got shape {tuple(input.shape)}")
    if len(kernel_size) != 2 or len(stride) != 2 or len(padding) != 2:
        raise ValueError("kernel_size, stride and padding take two values each")
    if min(kernel_size) < 1 or min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"kernel_size and stride must be >= 1 and padding >= 0, got "
                         f"{kernel_size}, {stride}, {padding}")
    sizes = []
    for size, k, s, p in zip(input.shape[2:], kernel_size, stride, padding, strict=True):
        if size + 2 * p < k:
            raise ValueError(f"kernel {kernel_size} is larger than the padded input "
                             f"{tuple(input.shape[2:])} + 2 × {padding}")
        sizes.append((size + 2 * p - k) // s + 1)
    return sizes[0], sizes[1]


@torch.library.custom_op("cvsparse_triton::sparse_conv2d", mutates_args=(),
                         schema=_launch.schema("sparse_conv2d"))
def sparse_conv2d(input: Tensor, values: Tensor, col_deltas: Tensor, row_ptr: Tensor,
                  bias: Tensor | None, kernel_size: list[int], stride: list[int],
                  padding: list[int], relu: bool) -> Tensor:
    """Convolution of ``input`` ``(B, C, H, W)`` with the packed weight (M × C·kh·kw)
    (+ ``bias``) (then ReLU); output ``(B, M, Ho, Wo)`` contiguous in input's dtype
    (normalized arguments of ``cvsparse.ops.reference.sparse_conv2d``)."""
    out_h, out_w = _output_size(input, kernel_size, stride, padding)
    batch, channels, height, width = input.shape
    kh, kw = kernel_size
    rows = check_weight(input, values, col_deltas, row_ptr, bias, channels * kh * kw)
    out = torch.empty((batch, rows, out_h, out_w), dtype=input.dtype, device=input.device)
    if out.numel() == 0:
        return out
    pixels = out_h * out_w
    block_p, block_nz = block_shape(pixels)
    check_grid(triton.cdiv(pixels, block_p), "pixel blocks")
    check_grid(batch, "images")
    _sparse_conv2d_kernel[(rows, triton.cdiv(pixels, block_p), batch)](
        input, values, col_deltas, row_ptr, input if bias is None else bias, out, rows,
        channels, height, width, out_w, pixels, kw, kh * kw,
        stride[0], stride[1], padding[0], padding[1],
        HAS_BIAS=bias is not None, RELU=bool(relu), OPMATH=_launch.opmath(input.dtype),
        BLOCK_P=block_p, BLOCK_NZ=block_nz,
    )
    return out


@sparse_conv2d.register_fake
def _(input, values, col_deltas, row_ptr, bias, kernel_size, stride, padding, relu):
    out_h, out_w = _output_size(input, kernel_size, stride, padding)
    return input.new_empty((input.shape[0], row_ptr.shape[0] - 1, out_h, out_w))
