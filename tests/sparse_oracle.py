"""The float64 oracle and error bound of the sparse inference operators (``sparse_matmul``,
``sparse_conv2d``), shared by the tests of every backend: the C++ kernels and the reference
(``tests/ops/test_sparse_ops.py``), CUDA (``tests/ops/test_cuda_sparse.py``) and Triton
(``tests/kernels/test_sparse_triton.py``).

The oracle is the *dense* weight a test builds before packing it, applied by ``@`` or
``F.conv2d`` in float64 to the same (already rounded) inputs: it shares no code with the
kernels or with the packed format's decoder.

Tolerance, derived per output element.  A kernel sums the n products w·x of a row and the bias
in its math type (float32, or float64 for float64 inputs; unit roundoff u_acc = 2^-24 or 2^-53)
in any order, with or without fused multiply-adds: the standard bound of a dot product gives
|error| ≤ γ_(n+1)·S with γ_k = k·u_acc / (1 − k·u_acc) and S = Σ|w·x| + |b| (computed in
float64).  The result is then rounded once to the output dtype (u_out = 2^-24, 2^-53, 2^-11,
2^-8) to nearest, adding u_out·|y|, and ReLU never increases an error.  So
``|got − want| ≤ u_out·|want| + 1.01·γ_(n+1)·S + tiny``: 1.01 covers the float64 oracle's own
error and the rounding of the error term, ``tiny`` (the dtype's smallest subnormal) a result
that underflows.  A conversion toward zero (Triton's interpreter converts float32 to bfloat16
so) errs by up to a whole unit in the last place, 2·u_out·|y|.  NaN must stand where the oracle
has NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SPARSITY_LEVELS = [0.0, 0.5, 0.99, 1.0]
# Convolution geometries: name -> (kernel, stride, padding).
CONV_GEOMETRY = {
    "3x3_pad1": ([3, 3], [1, 1], [1, 1]),
    "1x1": ([1, 1], [1, 1], [0, 0]),
    "3x2_stride2x1_pad0x1": ([3, 2], [2, 1], [0, 1]),
    "5x5_stride2x3_pad2": ([5, 5], [2, 3], [2, 2]),
}
U_ACC = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.float16: 2.0**-24,
         torch.bfloat16: 2.0**-24}
U_OUT = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.float16: 2.0**-11,
         torch.bfloat16: 2.0**-8}
TINY = {dtype: torch.finfo(dtype).smallest_normal * U_OUT[dtype] * 2 for dtype in DTYPES}


class Expected(NamedTuple):
    """What a sparse operator must return, within :func:`assert_within_bound`."""
    want: torch.Tensor   # the exact result, float64 on the CPU
    scale: torch.Tensor  # S = Σ|w·x| + |b| per output element, float64 on the CPU
    terms: int           # n: the nonzeros of the longest weight row


def sparse_weight(shape: tuple[int, ...], sparsity: float, dtype: torch.dtype, *,
                  empty_first_row: bool = False) -> torch.Tensor:
    """A random normal weight of ``shape`` on the CPU, rounded to ``dtype``, with exactly
    round(sparsity·numel) zeros at random places (and its row 0 all zero if asked)."""
    w = torch.randn(shape, dtype=torch.float64)
    flat = w.view(-1)
    flat[torch.randperm(flat.numel())[:round(sparsity * flat.numel())]] = 0.0
    if empty_first_row and w.shape[0]:
        w[0] = 0.0
    return w.to(dtype)


def _longest_row(weight: torch.Tensor) -> int:
    rows = (weight != 0).flatten(1).sum(1)
    return int(rows.max()) if rows.numel() else 0


def dense_matmul(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                 relu: bool) -> Expected:
    """``weight`` (M, K) @ ``x`` (K, N) + ``bias`` (M,), then ReLU if asked, in float64."""
    w64, x64 = weight.double().cpu(), x.double().cpu()
    b64 = (torch.zeros(w64.shape[0], 1, dtype=torch.float64) if bias is None
           else bias.double().cpu()[:, None])
    want = w64 @ x64 + b64
    return Expected(torch.relu(want) if relu else want, w64.abs() @ x64.abs() + b64.abs(),
                    _longest_row(weight))


def dense_conv2d(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                 stride: list[int], padding: list[int], relu: bool) -> Expected:
    """``F.conv2d`` of ``x`` (B, C, H, W) by ``weight`` (M, C, kh, kw) and ``bias`` (M,), then
    ReLU if asked, in float64."""
    w64, x64 = weight.double().cpu(), x.double().cpu()
    if w64.shape[0] == 0:  # F.conv2d refuses a weight without output channels
        out_size = [(s + 2 * p - k) // st + 1 for s, p, k, st
                    in zip(x.shape[2:], padding, w64.shape[2:], stride, strict=True)]
        empty = torch.zeros(x.shape[0], 0, *out_size, dtype=torch.float64)
        return Expected(empty, empty, 0)
    b64 = None if bias is None else bias.double().cpu()
    want = F.conv2d(x64, w64, b64, stride, padding)
    scale = F.conv2d(x64.abs(), w64.abs(), None if b64 is None else b64.abs(), stride, padding)
    return Expected(torch.relu(want) if relu else want, scale, _longest_row(weight))


def assert_within_bound(got: torch.Tensor, expected: Expected, dtype: torch.dtype, *,
                        toward_zero: bool = False) -> None:
    """``got`` has ``dtype``, the oracle's shape, NaN where it has NaN, and every other element
    within the derived bound of the module docstring (``toward_zero``: for a result converted
    to ``dtype`` toward zero rather than to nearest)."""
    assert got.dtype == dtype and got.shape == expected.want.shape
    want, error = expected.want, (got.double().cpu() - expected.want).abs()
    assert torch.equal(got.cpu().isnan(), want.isnan()), "NaN where the oracle has none, or back"
    k = expected.terms + 1
    gamma = k * U_ACC[dtype] / (1 - k * U_ACC[dtype])
    rounding = U_OUT[dtype] * (2 if toward_zero else 1)
    bound = rounding * want.abs() + 1.01 * gamma * expected.scale + TINY[dtype]
    excess = torch.where(want.isnan(), 0.0, error / bound)
    if excess.numel() and excess.max() > 1:
        worst = int(excess.argmax())
        raise AssertionError(f"error {error.flatten()[worst]:.3g} at {want.flatten()[worst]:.6g} "
                             f"beyond the bound {bound.flatten()[worst]:.3g}")
