"""The sparse inference operators (``sparse_matmul``, ``sparse_conv2d``) and the packed format.

Every backend is compared with the float64 oracle of ``tests/sparse_oracle.py`` (the dense
weight the packed one was made from, applied to the same inputs) within its derived bound.
Sizes are odd (partial SIMD blocks, scalar tails, N = 1), masks are 0%, 50%, 99% and 100%
sparse with an empty first row, with and without bias and ReLU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sparse_oracle import (
    DTYPES,
    SPARSITY_LEVELS,
    assert_within_bound,
    dense_conv2d,
    dense_matmul,
    sparse_weight,
)

from cvsparse import ops
from cvsparse.ops import reference, sparse_format
from cvsparse.ops.schemas import SCHEMAS

DTYPE = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
SPARSITY = pytest.mark.parametrize("sparsity", SPARSITY_LEVELS)
EPILOGUE = pytest.mark.parametrize("with_bias,relu", [(True, True), (False, False),
                                                      (True, False)],
                                   ids=["bias_relu", "plain", "bias"])
# (M, K, N): odd sizes; N = 1 (batch-1 Linear), N below, across and past the vector blocks.
MATMUL_SHAPES = [(1, 1, 1), (7, 13, 1), (33, 65, 17), (20, 100, 67), (5, 300, 130), (9, 31, 3)]
# (B, C, H, W, M, kernel, stride, padding)
CONV_CASES = [
    (2, 3, 9, 7, 5, (3, 3), (1, 1), (1, 1)),
    (1, 4, 8, 8, 6, (3, 3), (2, 2), (1, 1)),
    (3, 2, 11, 10, 4, (5, 5), (1, 1), (0, 0)),
    (2, 3, 7, 9, 5, (3, 2), (2, 3), (1, 0)),
    (1, 16, 20, 19, 17, (3, 3), (1, 1), (1, 1)),
    (2, 8, 2, 2, 9, (3, 3), (1, 1), (1, 1)),
    (1, 5, 6, 5, 3, (1, 1), (1, 1), (0, 0)),
    (1, 3, 4, 6, 2, (2, 4), (1, 2), (2, 3)),
    (2, 3, 5, 5, 0, (3, 3), (1, 1), (1, 1)),   # no output channel
]


@pytest.fixture(params=["cpp", "reference", pytest.param("cuda", marks=pytest.mark.cuda)])
def backend(request):
    """Selects a backend for the test (``auto`` restored after), yields its name."""
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend("auto")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _device(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" else "cpu")


def _sparse_weight(shape, sparsity: float, dtype) -> torch.Tensor:
    """Random weight with exactly round(sparsity·numel) zeros and the first row empty."""
    return sparse_weight(shape, sparsity, dtype, empty_first_row=True)


@DTYPE
@SPARSITY
@EPILOGUE
@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sparse_matmul_matches_dense(backend, dtype, sparsity, with_bias, relu, shape):
    m, k, n = shape
    device = _device(backend)
    weight = _sparse_weight((m, k), sparsity, dtype)
    x = torch.randn(k, n, dtype=torch.float64).to(dtype)
    bias = torch.randn(m, dtype=torch.float64).to(dtype) if with_bias else None
    values, deltas, row_ptr = sparse_format.pack(weight)
    got = ops.sparse_matmul(x.to(device), values.to(device), deltas.to(device),
                            row_ptr.to(device), None if bias is None else bias.to(device), relu)
    assert_within_bound(got, dense_matmul(weight, x, bias, relu), dtype)


@DTYPE
@pytest.mark.parametrize("with_bias,relu", [(True, True), (False, False)], ids=["bias_relu",
                                                                                "plain"])
@pytest.mark.parametrize("shape", [(7, 13, 1), (33, 65, 17), (5, 300, 130), (6, 20, 200)],
                         ids=lambda s: "x".join(map(str, s)))
def test_sparse_matmul_takes_a_transposed_batch(backend, dtype, with_bias, relu, shape):
    """``input`` given as ``x.t()`` of a contiguous batch ``x`` (N, K) — what a Linear layer
    has — is within the bound on every backend, and in the C++ kernel (which copies it to
    (K, N) in tiles) bitwise the result of the contiguous ``x.t().contiguous()`` (N = 130 and
    200 cover whole 64-lane blocks, the AVX-512 rows where the CPU has them, and the tails; an
    odd row count leaves the last row of a two-row step alone)."""
    m, k, n = shape
    device = _device(backend)
    weight = _sparse_weight((m, k), 0.5, dtype)
    batch = torch.randn(n, k, dtype=torch.float64).to(dtype).to(device)
    bias = torch.randn(m, dtype=torch.float64).to(dtype).to(device) if with_bias else None
    packed = [t.to(device) for t in sparse_format.pack(weight)]
    transposed = ops.sparse_matmul(batch.t(), *packed, bias, relu)
    contiguous = ops.sparse_matmul(batch.t().contiguous(), *packed, bias, relu)
    assert transposed.is_contiguous()
    if backend == "cpp":
        assert torch.equal(transposed, contiguous)
    assert_within_bound(transposed, dense_matmul(weight, batch.t(), bias, relu), dtype)


@DTYPE
@SPARSITY
@EPILOGUE
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_sparse_conv2d_matches_dense(backend, dtype, sparsity, with_bias, relu, case):
    b, c, h, w, m, kernel, stride, padding = case
    device = _device(backend)
    weight = _sparse_weight((m, c, *kernel), sparsity, dtype)
    x = torch.randn(b, c, h, w, dtype=torch.float64).to(dtype)
    bias = torch.randn(m, dtype=torch.float64).to(dtype) if with_bias else None
    values, deltas, row_ptr = sparse_format.pack(weight.flatten(1))
    got = ops.sparse_conv2d(x.to(device), values.to(device), deltas.to(device),
                            row_ptr.to(device), None if bias is None else bias.to(device),
                            kernel, stride, padding, relu)
    assert_within_bound(got, dense_conv2d(weight, x, bias, stride, padding, relu), dtype)


def test_cpp_is_selected_on_this_cpu():
    """The C++ kernels are registered (the parametrized 'cpp' cases test them, not a fallback)."""
    assert ops._library.has_kernel("sparse_matmul", "CPU")
    assert ops._library.has_kernel("sparse_conv2d", "CPU")


def test_relu_passes_nan_like_torch():
    """ReLU keeps NaN (as torch.relu); a NaN input meets only the stored nonzeros (a structural
    zero is absent, not 0 · NaN — the dense reference differs there)."""
    values, deltas, row_ptr = sparse_format.pack(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    x = torch.tensor([[float("nan")] * 9, [2.0] * 9])
    ops.set_backend("cpp")
    try:
        y = ops.sparse_matmul(x, values, deltas, row_ptr, None, True)
    finally:
        ops.set_backend("auto")
    assert torch.isnan(y[0]).all() and (y[1] == 0).all()


# ---- the packed format ----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 300), (3, 0), (0, 5)])
@SPARSITY
def test_pack_unpack_round_trip(shape, sparsity):
    weight = _sparse_weight(shape, sparsity, torch.float32) if min(shape) else torch.zeros(shape)
    values, deltas, row_ptr = sparse_format.pack(weight)
    assert values.dtype == weight.dtype and deltas.dtype == row_ptr.dtype == torch.int32
    assert row_ptr.numel() == shape[0] + 1 and values.numel() == int((weight != 0).sum())
    assert torch.equal(sparse_format.unpack(values, deltas, row_ptr, shape[1]), weight)


def test_pack_encodes_deltas_within_rows():
    weight = torch.tensor([[0.0, 2.0, 0.0, 3.0, 4.0], [0.0] * 5, [5.0, 0.0, 0.0, 0.0, 6.0]])
    values, deltas, row_ptr = sparse_format.pack(weight)
    assert values.tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert deltas.tolist() == [1, 2, 1, 0, 4]
    assert row_ptr.tolist() == [0, 3, 3, 5]
    assert sparse_format.columns(deltas, row_ptr).tolist() == [1, 3, 4, 0, 4]


# ---- registration: schemas, opcheck, compile -------------------------------------------------

@pytest.mark.parametrize("name", ["sparse_matmul", "sparse_conv2d"])
def test_schema_matches_python(name):
    assert str(getattr(torch.ops.cvsparse, name).default._schema) == f"cvsparse::{SCHEMAS[name]}"


def _packed(shape, sparsity=0.7, dtype=torch.float32):
    return sparse_format.pack(_sparse_weight(shape, sparsity, dtype))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_sparse_matmul(with_bias, dtype):
    values, deltas, row_ptr = _packed((9, 20), dtype=dtype)
    for batch in (torch.randn(20, 11), torch.randn(11, 20).t()):   # contiguous, transposed
        args = (batch.to(dtype), values, deltas, row_ptr,
                torch.randn(9).to(dtype) if with_bias else None, True)
        torch.library.opcheck(torch.ops.cvsparse.sparse_matmul.default, args)


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_sparse_conv2d(with_bias):
    values, deltas, row_ptr = _packed((6, 4 * 3 * 3))
    args = (torch.randn(2, 4, 7, 8), values, deltas, row_ptr,
            torch.randn(6) if with_bias else None, [3, 3], [2, 1], [1, 1], False)
    torch.library.opcheck(torch.ops.cvsparse.sparse_conv2d.default, args)


def test_ops_compile_fullgraph():
    values, deltas, row_ptr = _packed((9, 3 * 2 * 2))
    bias = torch.randn(9)
    linear = _packed((5, 9 * 4 * 4))

    def fn(x):
        y = ops.sparse_conv2d(x, values, deltas, row_ptr, bias, 2, 1, 0, True)
        flat = y.reshape(y.shape[0], -1)
        return ops.sparse_matmul(flat.t().contiguous(), *linear, None, False)

    x = torch.randn(2, 3, 5, 5)
    want = fn(x)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(got, want)


# ---- bad input: one ValueError naming the problem, before any backend runs -------------------

# Packs to deltas [0, 2, 2, 1, 4, 3], row_ptr [0, 0, 3, 5, 6].
GOOD_WEIGHT = torch.tensor([[0.0, 0, 0, 0, 0, 0], [1, 0, 2, 0, 3, 0], [0, 4, 0, 0, 0, 5],
                            [0, 0, 0, 6, 0, 0]])


def _good():
    values, deltas, row_ptr = sparse_format.pack(GOOD_WEIGHT)
    return dict(input=torch.randn(6, 3), values=values, col_deltas=deltas, row_ptr=row_ptr,
                bias=torch.randn(4))


def _call(args):
    return ops.sparse_matmul(args["input"], args["values"], args["col_deltas"], args["row_ptr"],
                             args["bias"], args.get("relu", False))


BAD_MATMUL = {
    "int input": (lambda a: a | {"input": a["input"].int()}, "input has dtype"),
    "1-D input": (lambda a: a | {"input": a["input"][:, 0]}, "2-D tensor"),
    "non-contiguous input": (lambda a: a | {"input": torch.randn(6, 6)[:, ::2]},
                             "not contiguous"),
    "wrong K": (lambda a: a | {"input": torch.randn(5, 3)}, "out of range for 5 columns"),
    "values dtype": (lambda a: a | {"values": a["values"].double()}, "values has dtype"),
    "deltas int64": (lambda a: a | {"col_deltas": a["col_deltas"].long()},
                     "col_deltas has dtype"),
    "row_ptr int64": (lambda a: a | {"row_ptr": a["row_ptr"].long()}, "row_ptr has dtype"),
    "length mismatch": (lambda a: a | {"col_deltas": a["col_deltas"][:-1]},
                        "col_deltas has .* entries but values"),
    "row_ptr end": (lambda a: a | {"row_ptr": torch.cat([a["row_ptr"][:-1],
                                                         a["row_ptr"][-1:] + 1])},
                    r"row_ptr\[-1\] must equal"),
    "row_ptr start": (lambda a: a | {"row_ptr": a["row_ptr"] + 1}, r"row_ptr\[0\] must be 0"),
    "row_ptr decreasing": (lambda a: a | {"row_ptr": torch.tensor(
        [0, a["values"].numel(), 0, a["values"].numel(), a["values"].numel()],
        dtype=torch.int32)}, "row_ptr decreases at row 1"),
    "zero delta": (lambda a: a | {"col_deltas": torch.where(
        torch.arange(a["values"].numel()) == 1, 0, a["col_deltas"]).int()}, "col_deltas"),
    "negative first": (lambda a: a | {"col_deltas": torch.where(
        torch.arange(a["values"].numel()) == 0, -1, a["col_deltas"]).int()},
        "first column must be >= 0"),
    "bias shape": (lambda a: a | {"bias": torch.randn(5)}, r"bias must have shape \(4,\)"),
    "bias dtype": (lambda a: a | {"bias": a["bias"].double()}, "bias has dtype"),
    "relu not bool": (lambda a: a | {"relu": 1}, "relu must be a bool"),
    "values 2-D": (lambda a: a | {"values": a["values"][None]}, "values must be 1-D"),
    "not a tensor": (lambda a: a | {"values": [1.0]}, "values must be a Tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD_MATMUL))
def test_sparse_matmul_rejects(case):
    edit, message = BAD_MATMUL[case]
    args = edit(_good())  # "zero delta" edits entry 1, the second of row 1
    with pytest.raises(ValueError, match=message):
        _call(args)


def test_sparse_conv2d_rejects():
    values, deltas, row_ptr = _packed((4, 2 * 3 * 3))
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="4-D tensor"):
        ops.sparse_conv2d(x[0], values, deltas, row_ptr, None, 3, 1, 1)
    with pytest.raises(ValueError, match="out of range for 18 columns"):  # a 3-channel filter
        ops.sparse_conv2d(x, *_packed((4, 3 * 3 * 3), sparsity=0.0), None, 3, 1, 1)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        ops.sparse_conv2d(x, values, deltas, row_ptr, None, 3, 0, 1)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        ops.sparse_conv2d(x, values, deltas, row_ptr, None, (3, 3, 3), 1, 1)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        ops.sparse_conv2d(torch.randn(1, 2, 1, 5), values, deltas, row_ptr, None, 3, 1, 0)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        ops.sparse_conv2d(x, values, deltas, row_ptr, None, 3, 1, -1)
    with pytest.raises(ValueError, match="not contiguous"):
        ops.sparse_conv2d(x.transpose(2, 3), values, deltas, row_ptr, None, 3, 1, 1)


def test_kernel_guards_memory_without_python_checks():
    """A direct torch.ops call with indices out of range fails cleanly in C++ too."""
    values, deltas, row_ptr = sparse_format.pack(GOOD_WEIGHT)
    with pytest.raises(RuntimeError, match="leave the 5 columns"):
        torch.ops.cvsparse.sparse_matmul(torch.randn(5, 3), values, deltas, row_ptr, None, False)
    bad = deltas.clone()
    bad[0] = -3
    with pytest.raises(RuntimeError, match="col_deltas"):
        torch.ops.cvsparse.sparse_matmul(torch.randn(6, 3), values, bad, row_ptr, None, False)


def test_kernel_checks_a_weight_again_once_its_indices_change():
    """The C++ kernels walk a weight's indices only the first time they see it valid for a
    column count; an in-place change (version counter), another column count, and an
    inference-mode weight (no version counter: never cached) are all checked again."""
    values, deltas, row_ptr = sparse_format.pack(GOOD_WEIGHT)   # its columns are < 6
    for _ in range(2):   # the second call finds the weight validated
        torch.ops.cvsparse.sparse_matmul(torch.randn(6, 3), values, deltas, row_ptr, None, False)
    with pytest.raises(RuntimeError, match="leave the 5 columns"):
        torch.ops.cvsparse.sparse_matmul(torch.randn(5, 3), values, deltas, row_ptr, None, False)
    deltas[-1] += 100   # in place: the last nonzero moves out of the matrix
    with pytest.raises(RuntimeError, match="leave the 6 columns"):
        torch.ops.cvsparse.sparse_matmul(torch.randn(6, 3), values, deltas, row_ptr, None, False)
    with torch.inference_mode():
        frozen = [t.clone() for t in sparse_format.pack(GOOD_WEIGHT)]
        torch.ops.cvsparse.sparse_matmul(torch.randn(6, 3), *frozen, None, False)
        frozen[1][0] = 50
        with pytest.raises(RuntimeError, match="leave the 6 columns"):
            torch.ops.cvsparse.sparse_matmul(torch.randn(6, 3), *frozen, None, False)


def test_reference_is_the_decoded_dense_product():
    weight = _sparse_weight((6, 10), 0.6, torch.float32)
    x = torch.randn(10, 4)
    got = reference.sparse_matmul(x, *sparse_format.pack(weight), None, False)
    assert torch.allclose(got, weight @ x, rtol=1e-6, atol=1e-6)


def test_conv_offset_cache_follows_changes_to_the_weight():
    """The C++ kernel keeps decoded offsets per weight: an in-place change of the indices, a new
    weight in the freed memory of an old one, and another image size must all be seen."""
    conv = dict(kernel_size=3, stride=1, padding=1)

    def check(weight, x):
        packed = sparse_format.pack(weight.reshape(weight.shape[0], -1))
        got = ops.sparse_conv2d(x, *packed, None, **conv)
        assert torch.allclose(got, F.conv2d(x, weight, padding=1), rtol=1e-5, atol=1e-5)
        return packed

    x = torch.randn(1, 4, 6, 6)
    w1 = _sparse_weight((5, 4, 3, 3), 0.8, torch.float32)
    values, deltas, row_ptr = check(w1, x)
    # Same tensors, indices changed in place (the row's first nonzero moves one column right,
    # where w1 has a zero): the version counter changes, so the offsets are decoded again.
    row = int((row_ptr[1:] > row_ptr[:-1]).nonzero()[0])
    first = int(row_ptr[row])
    col = int(deltas[first])
    w2 = w1.reshape(5, -1).clone()
    assert col + 1 < w2.shape[1] and w2[row, col + 1] == 0  # holds for seed 0's weight
    w2[row, col + 1], w2[row, col] = w2[row, col], 0.0
    deltas[first] += 1
    if first + 1 < int(row_ptr[row + 1]):
        deltas[first + 1] -= 1
    got = ops.sparse_conv2d(x, values, deltas, row_ptr, None, **conv)
    assert torch.allclose(got, F.conv2d(x, w2.reshape(5, 4, 3, 3), padding=1), rtol=1e-5,
                          atol=1e-5)
    # Freed and reallocated weights of the same size, and other image sizes.
    for seed in range(3):
        del values, deltas, row_ptr
        torch.manual_seed(100 + seed)
        values, deltas, row_ptr = check(_sparse_weight((5, 4, 3, 3), 0.8, torch.float32),
                                        torch.randn(2, 4, 5 + seed, 7))
