"""The CUDA sparse inference kernels (``csrc/cuda/sparse_matmul.cu``, ``sparse_conv2d.cu``) on
CUDA tensors, called through ``torch.ops.cvsparse`` with normalized arguments.

The oracle is the dense weight each test builds before packing, multiplied or convolved in
float64 on the CPU, within the derived error bound of ``tests/sparse_oracle.py``.  The sizes
reach every tiling the kernels choose (a warp splitting each row for N ≤ 4; 4, 32 and 128
threads per output row for N ≤ 16, ≤ 128 and larger), rows longer than one staged chunk of 64
nonzeros (the running column carried across chunks), several row blocks (rows visited in order
of decreasing length), output rows whose length is not a multiple of 4, and inputs whose
storage starts one element in (the scalar path instead of vector loads).
"""

from __future__ import annotations

import pytest
import torch
from sparse_oracle import (
    CONV_GEOMETRY,
    DTYPES,
    SPARSITY_LEVELS,
    Expected,
    assert_within_bound,
    dense_conv2d,
    dense_matmul,
    sparse_weight,
)

from cvsparse import ops
from cvsparse.ops._library import has_kernel
from cvsparse.ops.sparse_format import pack

pytestmark = pytest.mark.cuda  # deselected without a GPU (tests/conftest.py)

OPS = torch.ops.cvsparse


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _on_gpu(t: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """``t`` copied to the GPU into a fresh storage starting ``offset`` elements in."""
    storage = torch.empty(t.numel() + offset, dtype=t.dtype, device="cuda")
    out = storage[offset:].view(t.shape)
    out.copy_(t)
    return out


def _packed_on_gpu(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_on_gpu(t) for t in pack(weight))


def _assert_matches(got: torch.Tensor, expected: Expected, dtype: torch.dtype) -> None:
    assert got.is_cuda and got.is_contiguous()
    assert_within_bound(got, expected, dtype)


def _check_matmul(m: int, k: int, n: int, sparsity: float, dtype: torch.dtype, with_bias: bool,
                  relu: bool, offset: int = 0) -> None:
    weight = sparse_weight((m, k), sparsity, dtype)
    x = torch.randn(k, n, dtype=torch.float64).to(dtype)
    bias = torch.randn(m, dtype=torch.float64).to(dtype) if with_bias else None
    got = OPS.sparse_matmul(_on_gpu(x, offset), *_packed_on_gpu(weight),
                            None if bias is None else _on_gpu(bias), relu)
    _assert_matches(got, dense_matmul(weight, x, bias, relu), dtype)


def _check_conv(batch: int, channels: int, size: tuple[int, int], out_channels: int,
                kernel: list[int], stride: list[int], padding: list[int], sparsity: float,
                dtype: torch.dtype, with_bias: bool, relu: bool, offset: int = 0) -> None:
    kh, kw = kernel
    weight = sparse_weight((out_channels, channels * kh * kw), sparsity, dtype)
    x = torch.randn(batch, channels, *size, dtype=torch.float64).to(dtype)
    bias = torch.randn(out_channels, dtype=torch.float64).to(dtype) if with_bias else None
    got = OPS.sparse_conv2d(_on_gpu(x, offset), *_packed_on_gpu(weight),
                            None if bias is None else _on_gpu(bias), kernel, stride, padding,
                            relu)
    expected = dense_conv2d(weight.reshape(out_channels, channels, kh, kw), x, bias, stride,
                            padding, relu)
    _assert_matches(got, expected, dtype)


def test_sparse_operators_have_cuda_kernels():
    assert has_kernel("sparse_matmul", "CUDA") and has_kernel("sparse_conv2d", "CUDA")


# ---- sparse_matmul ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITY_LEVELS)
@pytest.mark.parametrize("with_bias,relu", [(False, False), (True, False), (True, True)],
                         ids=["plain", "bias", "bias_relu"])
# Split rows (N ≤ 4), then 4, 32 and 128 threads per row.
@pytest.mark.parametrize("n", [1, 4, 5, 16, 17, 128, 129, 600])
def test_sparse_matmul_matches_dense(dtype, sparsity, with_bias, relu, n):
    _check_matmul(37, 203, n, sparsity, dtype, with_bias, relu)


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("m,k,n", [
    (1, 1, 1), (0, 5, 7), (5, 0, 7), (5, 7, 0),
    (300, 50, 3),      # 10 row blocks of 32 rows
    (7, 1000, 64),     # rows of ~500 nonzeros: 8 chunks each
    (129, 77, 256),    # 129 row blocks of one row, 2 column tiles
])
def test_sparse_matmul_shapes(m, k, n, offset):
    _check_matmul(m, k, n, 0.5, torch.float32, True, True, offset)


def test_sparse_matmul_skewed_rows():
    """Empty rows beside full ones, in several row blocks (rows visited longest first)."""
    weight = torch.randn(100, 300, dtype=torch.float64)
    weight[::3] = 0.0
    weight[1::3, 5:] = 0.0
    weight[5, :] = 0.0
    weight[5, 0] = 1.5  # a single nonzero in column 0 (first delta 0)
    x = torch.randn(300, 9, dtype=torch.float64)
    bias = torch.randn(100, dtype=torch.float64)
    got = OPS.sparse_matmul(_on_gpu(x), *_packed_on_gpu(weight), _on_gpu(bias), False)
    torch.testing.assert_close(got.cpu(), weight @ x + bias[:, None], rtol=1e-12, atol=1e-12)


def test_sparse_matmul_relu_keeps_nan():
    weight = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    x = torch.tensor([[float("nan"), 1.0], [2.0, 3.0]])
    got = OPS.sparse_matmul(_on_gpu(x), *_packed_on_gpu(weight), None, True).cpu()
    assert got[0, 0].isnan() and got[0, 1] == 1.0 and torch.equal(got[1], torch.zeros(2))


# ---- sparse_conv2d ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITY_LEVELS)
@pytest.mark.parametrize("with_bias,relu", [(False, False), (True, True)],
                         ids=["plain", "bias_relu"])
@pytest.mark.parametrize("size", [(3, 4), (9, 11), (24, 30)])  # 12, 99, 720 output pixels
def test_sparse_conv2d_matches_dense(dtype, sparsity, with_bias, relu, size):
    kernel, stride, padding = CONV_GEOMETRY["3x3_pad1"]
    _check_conv(2, 16, size, 21, kernel, stride, padding, sparsity, dtype, with_bias, relu)


@pytest.mark.parametrize("geometry", sorted(CONV_GEOMETRY))
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_sparse_conv2d_geometries(geometry, offset):
    kernel, stride, padding = CONV_GEOMETRY[geometry]
    _check_conv(3, 5, (13, 10), 40, kernel, stride, padding, 0.5, torch.float32, True, True,
                offset)


@pytest.mark.parametrize("batch,channels,size,out_channels,kernel,stride,padding", [
    (1, 1, (1, 1), 1, [1, 1], [1, 1], [0, 0]),
    (3, 2, (2, 3), 4, [3, 3], [1, 1], [1, 1]),      # kernel larger than the image
    (1, 4, (7, 5), 3, [7, 5], [1, 1], [0, 0]),      # one output pixel
    (2, 64, (8, 8), 70, [3, 3], [1, 1], [1, 1]),    # rows of ~290 nonzeros, 3 row blocks
])
def test_sparse_conv2d_shapes(batch, channels, size, out_channels, kernel, stride, padding):
    _check_conv(batch, channels, size, out_channels, kernel, stride, padding, 0.5, torch.float32,
                True, False)


# ---- the public operators, registration, errors -------------------------------------------------

def test_auto_backend_runs_the_cuda_kernels():
    weight = sparse_weight((6, 27), 0.7, torch.float32)
    packed = _packed_on_gpu(weight)
    bias = _on_gpu(torch.randn(6))
    x = _on_gpu(torch.randn(27, 19))
    assert ops.get_backend() == "auto"
    assert torch.equal(ops.sparse_matmul(x, *packed, bias, True),
                       OPS.sparse_matmul(x, *packed, bias, True))
    image = _on_gpu(torch.randn(2, 3, 8, 9))
    assert torch.equal(ops.sparse_conv2d(image, *packed, bias, 3, 2, 1, True),
                       OPS.sparse_conv2d(image, *packed, bias, [3, 3], [2, 2], [1, 1], True))


def test_opcheck_on_cuda():
    weight = sparse_weight((5, 18), 0.6, torch.float64)
    packed = _packed_on_gpu(weight)
    bias = _on_gpu(torch.randn(5, dtype=torch.float64))
    torch.library.opcheck(OPS.sparse_matmul.default,
                          (_on_gpu(torch.randn(18, 7, dtype=torch.float64)), *packed, bias, True))
    torch.library.opcheck(OPS.sparse_conv2d.default,
                          (_on_gpu(torch.randn(2, 3, 5, 6, dtype=torch.float64)), *packed, None,
                           [3, 2], [2, 1], [1, 0], False))


def test_kernels_check_what_memory_safety_depends_on():
    weight = sparse_weight((4, 6), 0.5, torch.float32)
    values, col_deltas, row_ptr = _packed_on_gpu(weight)
    x = _on_gpu(torch.randn(6, 5))
    with pytest.raises(RuntimeError, match="values has dtype"):
        OPS.sparse_matmul(x, values.double(), col_deltas, row_ptr, None, False)
    with pytest.raises(RuntimeError, match="col_deltas must be int32"):
        OPS.sparse_matmul(x, values, col_deltas.long(), row_ptr, None, False)
    with pytest.raises(RuntimeError, match="bias has"):
        OPS.sparse_matmul(x, values, col_deltas, row_ptr, _on_gpu(torch.randn(3)), False)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        OPS.sparse_matmul(x.cpu(), values, col_deltas, row_ptr, None, False)
    image = _on_gpu(torch.randn(1, 2, 2, 2))
    packed = _packed_on_gpu(sparse_weight((3, 2 * 3 * 3), 0.5, torch.float32))
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        OPS.sparse_conv2d(image, *packed, None, [3, 3], [1, 1], [0, 0], False)
