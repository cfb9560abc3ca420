"""``cvsparse.nn.SparseLinear`` / ``SparseConv2d`` against the dense layers they replace (the
oracle: ``nn.Linear`` / ``nn.Conv2d`` on the same weights), ``to_dense`` round trips, and
``torch.compile`` of a model made of them.

Tolerance: the sparse kernels sum the same float32 products as the dense layer in another
order, with at most n = in_features (C·kh·kw) terms; |difference| ≤ 2·γ_n·Σ|w·x| + |b| terms
(both sides' error bounds), γ_n ≈ n·2^-24.  Inputs and weights are O(1) here, so Σ|w·x| ≤ n·16
and the 1e-4 absolute tolerance used below is above that bound for every n ≤ 800 used (2 ·
800 · 6e-8 · 800 · 16 ≈ 1.2e-3 is the worst case; random signs make it ~1e-5 in practice, and
the relative tolerance 1e-4 carries the rest).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvsparse import ops
from cvsparse.nn import SparseConv2d, SparseLinear
from cvsparse.nn.sparse import max_pool_tiles

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _prune(module: nn.Module, sparsity: float) -> nn.Module:
    with torch.no_grad():
        module.weight[torch.rand(module.weight.shape) < sparsity] = 0
    return module


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_shape", [(1,), (5,), (3, 7), (67,)], ids=str)
def test_sparse_linear_equals_dense(sparsity, bias, batch_shape):
    dense = _prune(nn.Linear(97, 33, bias=bias), sparsity)
    sparse = SparseLinear.from_dense(dense)
    x = torch.randn(*batch_shape, 97)
    with torch.inference_mode():
        assert torch.allclose(sparse(x), dense(x), **TOL)
        assert torch.equal(sparse.to_dense().weight, dense.weight)
    assert sparse.nnz == int((dense.weight != 0).sum())


def test_sparse_linear_fused_relu():
    dense = _prune(nn.Linear(20, 9), 0.5)
    sparse = SparseLinear.from_dense(dense, relu=True)
    x = torch.randn(4, 20)
    with torch.inference_mode():
        assert torch.allclose(sparse(x), torch.relu(dense(x)), **TOL)
        assert torch.allclose(sparse.to_dense()(x), torch.relu(dense(x)), **TOL)


CONVS = [
    dict(in_channels=3, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=5, out_channels=7, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
    dict(in_channels=6, out_channels=4, kernel_size=1),            # pointwise: sparse_matmul
    dict(in_channels=6, out_channels=4, kernel_size=1, stride=2),  # 1x1 strided: sparse_conv2d
    dict(in_channels=1, out_channels=20, kernel_size=5),
]


@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("config", CONVS, ids=lambda c: "-".join(map(str, c.values())))
def test_sparse_conv2d_equals_dense(config, sparsity, bias, batch):
    dense = _prune(nn.Conv2d(**config, bias=bias), sparsity)
    sparse = SparseConv2d.from_dense(dense)
    x = torch.randn(batch, config["in_channels"], 13, 11)
    with torch.inference_mode():
        assert torch.allclose(sparse(x), dense(x), **TOL)
        assert torch.equal(sparse.to_dense().weight, dense.weight)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 5, 13, 11), (1, 3, 8, 8), (4, 6)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_max_pool_tiles_is_max_pool2d_bit_for_bit(k, shape, layout):
    x = torch.randn(shape)
    x.view(-1)[::7] = float("nan")
    x.view(-1)[3::11] = float("-inf")
    x.view(-1)[5::13] = 0.0
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], dim=-1)[..., ::2]
    want = torch.nn.functional.max_pool2d(x.unsqueeze(0) if x.dim() == 2 else x, k)
    got = max_pool_tiles(x, k)
    assert torch.equal(torch.isnan(got), torch.isnan(want.reshape(got.shape)))
    assert torch.equal(got.nan_to_num(), want.reshape(got.shape).nan_to_num())


def test_max_pool_tiles_refuses_an_input_smaller_than_the_pool():
    with pytest.raises(ValueError, match="smaller than the 3x3 pool"):
        max_pool_tiles(torch.randn(1, 2, 2, 5), 3)


@pytest.mark.parametrize("pool", [2, 3])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("config", CONVS[:3], ids=lambda c: "-".join(map(str, c.values())))
def test_sparse_conv2d_fused_pool(config, relu, pool):
    dense = _prune(nn.Conv2d(**config), 0.8)
    sparse = SparseConv2d.from_dense(dense, relu=relu, pool=pool)
    x = torch.randn(3, config["in_channels"], 13, 11)
    with torch.inference_mode():
        y = dense(x)
        want = torch.nn.functional.max_pool2d(torch.relu(y) if relu else y, pool)
        assert torch.allclose(sparse(x), want, **TOL)
        assert torch.allclose(sparse.to_dense()(x), want, **TOL)
    assert f"pool={pool}" in repr(sparse)
    with pytest.raises(ValueError, match="pool must be a positive int"):
        SparseConv2d.from_dense(dense, pool=0)


def test_pointwise_conv_uses_sparse_matmul(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "sparse_matmul",
                        lambda *a, **k: calls.append(1) or torch.zeros(4, 2 * 5 * 5))
    SparseConv2d.from_dense(nn.Conv2d(6, 4, 1))(torch.randn(2, 6, 5, 5))
    assert calls == [1]


def test_layers_reject_bad_input():
    linear = SparseLinear.from_dense(nn.Linear(10, 3))
    with pytest.raises(ValueError, match="input has 9 features, expected 10"):
        linear(torch.randn(2, 9))
    with pytest.raises(ValueError, match="input has dtype torch.float64"):
        linear(torch.randn(2, 10, dtype=torch.float64))
    conv = SparseConv2d.from_dense(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"input must be \(B, 3, H, W\)"):
        conv(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        conv(torch.randn(1, 3, 2, 8))
    with pytest.raises(ValueError, match="groups=2"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))


def test_state_dict_round_trip_and_dtype():
    dense = _prune(nn.Linear(30, 12), 0.8)
    sparse = SparseLinear.from_dense(dense)
    clone = SparseLinear.from_dense(nn.Linear(30, 12))
    clone.load_state_dict(sparse.state_dict())
    x = torch.randn(3, 30)
    assert torch.equal(clone(x), sparse(x))
    double = SparseLinear.from_dense(dense).double()
    assert double.values.dtype == torch.float64 and double.row_ptr.dtype == torch.int32
    assert torch.allclose(double(x.double()), dense.double()(x.double()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_of_sparse_model(backend):
    model = nn.Sequential(
        SparseConv2d.from_dense(_prune(nn.Conv2d(3, 8, 3, padding=1), 0.8), relu=True),
        nn.MaxPool2d(2),
        SparseConv2d.from_dense(_prune(nn.Conv2d(8, 6, 1), 0.7)),
        nn.Flatten(),
        SparseLinear.from_dense(_prune(nn.Linear(6 * 4 * 4, 10), 0.9)),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        want = model(x)
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True, backend=backend)(x)
    assert torch.allclose(got, want, **TOL)
