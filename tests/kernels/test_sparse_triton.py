"""The Triton sparse inference operators ``cvsparse_triton::sparse_matmul`` and
``cvsparse_triton::sparse_conv2d`` (``kernels/sparse_matmul.py``, ``kernels/sparse_conv2d.py``).

Without a GPU they run in Triton's interpreter on CPU tensors (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``), so sizes stay small and odd.  The oracle is the dense weight the test
itself builds before packing, multiplied (``@``) or convolved (``F.conv2d``) in float64, within
the derived error bound of ``tests/sparse_oracle.py``; ``cvsparse.ops.reference`` is checked
too.  Covered: the four dtypes, 0 / 50 / 99 / 100 % sparsity, bias and ReLU, rows longer than
one block of nonzeros (the running column carried across blocks), rows of very different
lengths, strides, paddings and non-square kernels, the public operators on the ``triton``
backend, ``opcheck``, the fakes under ``torch.compile``, argument errors, and that the kernels
compile for a GPU.
"""

from __future__ import annotations

import importlib
import os

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
from triton_compile import compiled_for_gpu

from cvsparse import ops
from cvsparse.ops import reference
from cvsparse.ops._backend import triton_ops
from cvsparse.ops.sparse_format import pack

TRITON = triton_ops()  # imports cvsparse.kernels: registers torch.ops.cvsparse_triton
_matmul_module = importlib.import_module("cvsparse.kernels.sparse_matmul")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
EPILOGUES = [(False, False), (True, False), (True, True), (False, True)]
EPILOGUE_IDS = ["plain", "bias", "bias_relu", "relu"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_blocks(monkeypatch):
    """16 outputs and 4 nonzeros per program step: every row below spans several steps and
    every output row several programs."""
    for prefix in ("INTERPRETER", "GPU"):
        monkeypatch.setattr(_matmul_module, f"{prefix}_BLOCK_N", 16)
        monkeypatch.setattr(_matmul_module, f"{prefix}_BLOCK_NZ", 4)


@pytest.fixture
def triton_backend():
    """The public operators on the ``triton`` backend for the test, the previous one after."""
    previous = ops.get_backend()
    ops.set_backend("triton")
    yield
    ops.set_backend(previous)


def _sparse_weight(rows: int, cols: int, sparsity: float, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, cols) weight in ``dtype`` on the test's device, ``sparsity`` of it zero."""
    return sparse_weight((rows, cols), sparsity, dtype).to(DEVICE)


def _randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).to(dtype).to(DEVICE)


def _assert_matches(got: torch.Tensor, expected: Expected, dtype: torch.dtype, *,
                    kernel: bool = True) -> None:
    """``got`` (the Triton kernel's result, or with ``kernel`` False the reference's) within the
    oracle's bound; Triton's interpreter converts a bfloat16 result toward zero."""
    assert got.is_contiguous()
    assert_within_bound(got, expected, dtype,
                        toward_zero=kernel and INTERPRETED and dtype == torch.bfloat16)


def _check_matmul(m: int, k: int, n: int, sparsity: float, dtype: torch.dtype, with_bias: bool,
                  relu: bool) -> None:
    weight = _sparse_weight(m, k, sparsity, dtype)
    x = _randn(k, n, dtype=dtype)
    bias = _randn(m, dtype=dtype) if with_bias else None
    values, col_deltas, row_ptr = pack(weight)
    got = TRITON.sparse_matmul(x, values, col_deltas, row_ptr, bias, relu)

    expected = dense_matmul(weight, x, bias, relu)
    _assert_matches(got, expected, dtype)
    ref = reference.sparse_matmul(x, values, col_deltas, row_ptr, bias, relu)
    _assert_matches(ref, expected, dtype, kernel=False)


def _check_conv(batch: int, channels: int, size: tuple[int, int], out_channels: int,
                kernel: list[int], stride: list[int], padding: list[int], sparsity: float,
                dtype: torch.dtype, with_bias: bool, relu: bool) -> None:
    kh, kw = kernel
    weight = _sparse_weight(out_channels, channels * kh * kw, sparsity, dtype)
    x = _randn(batch, channels, *size, dtype=dtype)
    bias = _randn(out_channels, dtype=dtype) if with_bias else None
    values, col_deltas, row_ptr = pack(weight)
    got = TRITON.sparse_conv2d(x, values, col_deltas, row_ptr, bias, kernel, stride, padding,
                               relu)

    expected = dense_conv2d(weight.reshape(out_channels, channels, kh, kw), x, bias, stride,
                            padding, relu)
    _assert_matches(got, expected, dtype)
    ref = reference.sparse_conv2d(x, values, col_deltas, row_ptr, bias, kernel, stride, padding,
                                  relu)
    _assert_matches(ref, expected, dtype, kernel=False)


# ---- sparse_matmul ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITY_LEVELS)
@pytest.mark.parametrize("with_bias,relu", EPILOGUES, ids=EPILOGUE_IDS)
def test_sparse_matmul_matches_dense(dtype, sparsity, with_bias, relu):
    _check_matmul(7, 37, 53, sparsity, dtype, with_bias, relu)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (13, 5, 1), (3, 301, 17), (33, 64, 130),
                                   (0, 4, 3), (5, 0, 3), (5, 4, 0)])
def test_sparse_matmul_shapes(m, k, n):
    _check_matmul(m, k, n, 0.5, torch.float32, True, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
def test_sparse_matmul_many_programs_and_steps(small_blocks, dtype, sparsity):
    _check_matmul(9, 97, 45, sparsity, dtype, True, True)


def test_sparse_matmul_skewed_rows(small_blocks):
    """Empty, single-entry, full and first-column-zero rows in one weight."""
    weight = torch.randn(6, 50, dtype=torch.float64)
    weight[0] = 0.0                       # empty row
    weight[1, :] = 0.0
    weight[1, 49] = 2.0                   # one entry, in the last column
    weight[3, 1:] = 0.0                   # one entry, in column 0 (first delta 0)
    weight[4, ::7] = 0.0                  # nearly full
    x = torch.randn(50, 21, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    values, col_deltas, row_ptr = pack(weight)
    got = TRITON.sparse_matmul(x, values, col_deltas, row_ptr, bias, False)
    torch.testing.assert_close(got, weight @ x + bias[:, None], rtol=1e-13, atol=1e-13)


def test_sparse_matmul_relu_keeps_nan():
    """ReLU is ``torch.relu``: a NaN in the product stays NaN."""
    weight = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    x = torch.tensor([[float("nan"), 1.0], [2.0, 3.0]])
    got = TRITON.sparse_matmul(x, *pack(weight), None, True)
    assert got[0, 0].isnan() and got[0, 1] == 1.0 and torch.equal(got[1], torch.zeros(2))


# ---- sparse_conv2d ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITY_LEVELS)
@pytest.mark.parametrize("with_bias,relu", [(False, False), (True, True)],
                         ids=["plain", "bias_relu"])
def test_sparse_conv2d_matches_dense(dtype, sparsity, with_bias, relu):
    kernel, stride, padding = CONV_GEOMETRY["3x3_pad1"]
    _check_conv(2, 3, (9, 11), 5, kernel, stride, padding, sparsity, dtype, with_bias, relu)


@pytest.mark.parametrize("geometry", sorted(CONV_GEOMETRY))
@pytest.mark.parametrize("with_bias,relu", EPILOGUES, ids=EPILOGUE_IDS)
def test_sparse_conv2d_geometries(geometry, with_bias, relu):
    kernel, stride, padding = CONV_GEOMETRY[geometry]
    _check_conv(2, 3, (9, 11), 5, kernel, stride, padding, 0.5, torch.float32, with_bias, relu)


@pytest.mark.parametrize("batch,channels,size,out_channels,kernel,stride,padding", [
    (1, 1, (1, 1), 1, [1, 1], [1, 1], [0, 0]),
    (3, 2, (2, 3), 4, [3, 3], [1, 1], [1, 1]),     # kernel larger than the image
    (1, 4, (7, 5), 3, [7, 5], [1, 1], [0, 0]),     # one output pixel
    (0, 3, (5, 5), 2, [3, 3], [1, 1], [1, 1]),     # empty batch
    (2, 3, (5, 5), 0, [3, 3], [1, 1], [1, 1]),     # no output channel
])
def test_sparse_conv2d_shapes(batch, channels, size, out_channels, kernel, stride, padding):
    _check_conv(batch, channels, size, out_channels, kernel, stride, padding, 0.5, torch.float32,
                True, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.99])
def test_sparse_conv2d_many_programs_and_steps(small_blocks, dtype, sparsity):
    _check_conv(2, 4, (8, 7), 6, [3, 3], [1, 1], [1, 1], sparsity, dtype, True, True)


# ---- the public operators on the triton backend ---------------------------------------------

def test_public_operators_run_the_triton_kernels(triton_backend):
    weight = _sparse_weight(6, 3 * 3 * 3, 0.7, torch.float32)
    values, col_deltas, row_ptr = pack(weight)
    bias = _randn(6, dtype=torch.float32)
    x = _randn(27, 19, dtype=torch.float32)
    assert torch.equal(ops.sparse_matmul(x, values, col_deltas, row_ptr, bias, True),
                       TRITON.sparse_matmul(x, values, col_deltas, row_ptr, bias, True))
    image = _randn(2, 3, 8, 9, dtype=torch.float32)
    assert torch.equal(
        ops.sparse_conv2d(image, values, col_deltas, row_ptr, bias, 3, 2, 1, True),
        TRITON.sparse_conv2d(image, values, col_deltas, row_ptr, bias, [3, 3], [2, 2], [1, 1],
                             True))


# ---- registration: opcheck and the fakes under torch.compile ----------------------------------

def _matmul_args(with_bias: bool) -> tuple:
    weight = _sparse_weight(5, 11, 0.6, torch.float64)
    return (_randn(11, 7, dtype=torch.float64), *pack(weight),
            _randn(5, dtype=torch.float64) if with_bias else None, True)


def _conv_args(with_bias: bool) -> tuple:
    weight = _sparse_weight(4, 3 * 3 * 2, 0.6, torch.float64)
    return (_randn(2, 3, 5, 6, dtype=torch.float64), *pack(weight),
            _randn(4, dtype=torch.float64) if with_bias else None, [3, 2], [2, 1], [1, 0], False)


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_sparse_matmul(with_bias):
    torch.library.opcheck(TRITON.sparse_matmul.default, _matmul_args(with_bias))


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_sparse_conv2d(with_bias):
    torch.library.opcheck(TRITON.sparse_conv2d.default, _conv_args(with_bias))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_sparse_ops_compile_fullgraph(backend):
    matmul_args, conv_args = _matmul_args(True), _conv_args(True)

    def both(x, image):
        return (TRITON.sparse_matmul(x, *matmul_args[1:]),
                TRITON.sparse_conv2d(image, *conv_args[1:]))

    torch._dynamo.reset()
    got = torch.compile(both, fullgraph=True, backend=backend)(matmul_args[0], conv_args[0])
    assert torch.equal(got[0], TRITON.sparse_matmul(*matmul_args))
    assert torch.equal(got[1], TRITON.sparse_conv2d(*conv_args))


# ---- argument errors --------------------------------------------------------------------------

def test_sparse_matmul_rejects_bad_arguments():
    x, values, col_deltas, row_ptr, bias, _ = _matmul_args(True)
    with pytest.raises(ValueError, match="values has dtype"):
        TRITON.sparse_matmul(x, values.float(), col_deltas, row_ptr, bias, False)
    with pytest.raises(ValueError, match="col_deltas has dtype"):
        TRITON.sparse_matmul(x, values, col_deltas.long(), row_ptr, bias, False)
    with pytest.raises(ValueError, match="bias must have shape"):
        TRITON.sparse_matmul(x, values, col_deltas, row_ptr, bias[:-1], False)
    with pytest.raises(ValueError, match="input must be"):
        TRITON.sparse_matmul(x[None], values, col_deltas, row_ptr, bias, False)
    with pytest.raises(ValueError, match="input is not contiguous"):
        TRITON.sparse_matmul(x.t().contiguous().t(), values, col_deltas, row_ptr, bias, False)
    with pytest.raises(ValueError, match="input has dtype"):
        TRITON.sparse_matmul(x.int(), values, col_deltas, row_ptr, bias, False)


def test_sparse_conv2d_rejects_bad_arguments():
    image, values, col_deltas, row_ptr, bias, kernel, stride, padding, _ = _conv_args(True)
    with pytest.raises(ValueError, match="larger than the padded input"):
        TRITON.sparse_conv2d(image[:, :, :1], values, col_deltas, row_ptr, bias, kernel,
                             stride, [0, 0], False)
    with pytest.raises(ValueError, match="stride"):
        TRITON.sparse_conv2d(image, values, col_deltas, row_ptr, bias, kernel, [0, 1], padding,
                             False)
    with pytest.raises(ValueError, match="input must be"):
        TRITON.sparse_conv2d(image[0], values, col_deltas, row_ptr, bias, kernel, stride,
                             padding, False)
    with pytest.raises(ValueError, match="bias has dtype"):
        TRITON.sparse_conv2d(image, values, col_deltas, row_ptr, bias.float(), kernel, stride,
                             padding, False)


@pytest.mark.cpu_only  # checks the message for CPU tensors; deselected with a GPU
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(importlib.import_module("cvsparse.kernels._launch"), "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        TRITON.sparse_matmul(*_matmul_args(False))


# ---- the kernels compile for a GPU (the interpreter accepts more than the compiler) ------------

_KERNEL_CASES = """
    from cvsparse.kernels import sparse_conv2d, sparse_matmul

    CASES = []
    for dtype, ptr, opmath in (("fp16", "*fp16", tl.float32), ("bf16", "*bf16", tl.float32),
                               ("fp32", "*fp32", tl.float32), ("fp64", "*fp64", tl.float64)):
        weight = {"x_ptr": ptr, "val_ptr": ptr, "delta_ptr": "*i32", "row_ptr": "*i32",
                  "bias_ptr": ptr, "out_ptr": ptr}
        flags = {"HAS_BIAS": True, "RELU": True, "OPMATH": opmath, "BLOCK_NZ": 16}
        CASES.append((sparse_matmul._sparse_matmul_kernel, {**weight, "n": "i32"},
                      {**flags, "BLOCK_N": 128}))
        geometry = {name: "i32" for name in ("rows", "channels", "height", "width", "out_w",
                                             "pixels", "kw", "taps", "stride_h", "stride_w",
                                             "pad_h", "pad_w")}
        CASES.append((sparse_conv2d._sparse_conv2d_kernel, {**weight, **geometry},
                      {**flags, "BLOCK_P": 128}))
"""


def test_sparse_kernels_compile_for_gpu():
    assert compiled_for_gpu(_KERNEL_CASES) == 8


def test_grids_beyond_the_cuda_limit_are_refused(small_blocks, monkeypatch):
    monkeypatch.setattr(_matmul_module, "MAX_GRID_YZ", 1)
    with pytest.raises(ValueError, match="column blocks exceed the grid limit"):
        TRITON.sparse_matmul(_randn(3, 40, dtype=torch.float32),
                             *pack(_sparse_weight(2, 3, 0.0, torch.float32)), None, False)
    packed = pack(_sparse_weight(2, 3, 0.0, torch.float32))
    with pytest.raises(ValueError, match="images exceed the grid limit"):
        TRITON.sparse_conv2d(_randn(2, 3, 2, 2, dtype=torch.float32), *packed, None, [1, 1],
                             [1, 1], [0, 0], False)
