"""``cvsparse.export.sparsify``: which layers it replaces (sparse enough AND measured faster),
what it folds (eval-mode BatchNorm, ReLU), that the model's outputs do not change (oracle: the
model before sparsify), the report, and ``torch.compile`` of the result.

The timing decision is made deterministic where a test asserts it, by replacing the timer
(``_time_pair``) with one that declares a chosen winner; one test keeps the real timer and checks
only what holds whatever the machine measures.  Output tolerance: the sparse kernels sum the
same float32 products in another order (and BN is folded into the weights, one extra rounding
per weight); relative 1e-4 of the output scale bounds both for these sizes (≤ 4,608 terms of
O(1), γ_n·Σ|w·x| ≈ 4608·6e-8 ≈ 3e-4 relative to Σ|w·x| in the very worst case, ~1e-5 typical).
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

from cvsparse.export import sparsify
from cvsparse.nn import SparseConv2d, SparseLinear

sparsify_mod = importlib.import_module("cvsparse.export.sparsify")


def _prune(module: nn.Module, sparsity: float) -> nn.Module:
    with torch.no_grad():
        w = module.weight.view(-1)
        w[torch.randperm(w.numel())[: round(sparsity * w.numel())]] = 0
    return module


def _trained_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        _prune(nn.Conv2d(3, 16, 3, padding=1, bias=False), 0.9),   # 0: eligible, BN + ReLU
        _trained_bn(nn.BatchNorm2d(16)),                          # 1
        nn.ReLU(),                                                # 2
        _prune(nn.Conv2d(16, 16, 3, padding=1), 0.5),             # 3: too dense
        nn.ReLU(),                                                # 4
        _prune(nn.Conv2d(16, 8, 1), 0.8),                         # 5: eligible, 1x1
        nn.MaxPool2d(2),                                          # 6
        nn.Flatten(),                                             # 7
        _prune(nn.Linear(8 * 4 * 4, 32), 0.95),                   # 8: eligible, ReLU
        nn.ReLU(),                                                # 9
        _prune(nn.Linear(32, 10), 0.75),                          # 10: eligible
    ).eval()


def _fake_timer(winner_of):
    """A ``_time_pair`` whose result says ``winner_of(call index)`` ("sparse" or "dense")."""
    calls = []

    def timer(dense, sparse, x, min_time):
        dense(x)
        sparse(x)
        calls.append(1)
        return (2.0, 1.0) if winner_of(len(calls) - 1) == "sparse" else (1.0, 2.0)

    return timer


def _assert_same_outputs(before, after, x):
    with torch.inference_mode():
        want, got = before(x), after(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_replaces_exactly_the_eligible_layers(monkeypatch):
    monkeypatch.setattr(sparsify_mod, "_time_pair", _fake_timer(lambda i: "sparse"))
    before = _model()
    after = copy.deepcopy(before)
    x = torch.randn(2, 3, 8, 8)
    report = sparsify(after, min_sparsity=0.7, example_input=x)
    assert report.replaced == ["0", "5", "8", "10"]
    assert isinstance(after[0], SparseConv2d) and after[0].relu
    assert isinstance(after[1], nn.Identity) and isinstance(after[2], nn.Identity)  # folded
    assert type(after[3]) is nn.Conv2d and type(after[4]) is nn.ReLU
    assert isinstance(after[5], SparseConv2d) and after[5].pointwise and not after[5].relu
    assert after[5].pool == 2 and isinstance(after[6], nn.Identity)   # the pool is fused
    assert after[0].pool == 1
    assert isinstance(after[8], SparseLinear) and after[8].relu
    assert isinstance(after[9], nn.Identity) and isinstance(after[10], SparseLinear)
    choices = {c.name: c for c in report.layers}
    assert choices["3"].reason == "sparsity below 70%" and not choices["3"].replaced
    assert choices["0"].fused == ["BatchNorm2d", "ReLU"] and choices["8"].fused == ["ReLU"]
    assert choices["5"].fused == ["MaxPool2d"]
    assert choices["0"].input_shape == (2, 3, 8, 8) and choices["8"].input_shape == (2, 128)
    assert choices["0"].sparsity == pytest.approx(0.9, abs=1 / 432)
    assert choices["0"].dense_ms == 2.0 and choices["0"].sparse_ms == 1.0
    _assert_same_outputs(before, after, x)
    _assert_same_outputs(before, after, torch.randn(5, 3, 8, 8))  # another batch size


def _conv_then(*followers: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(_prune(nn.Conv2d(3, 6, 3), 0.8), *followers).eval()


@pytest.mark.parametrize("followers, fused, pool, relu", [
    ((_trained_bn(nn.BatchNorm2d(6)), nn.ReLU(), nn.MaxPool2d(2)),
     ["BatchNorm2d", "ReLU", "MaxPool2d"], 2, True),
    ((nn.MaxPool2d(3), nn.ReLU()), ["MaxPool2d", "ReLU"], 3, True),   # ReLU after the pool
    ((nn.MaxPool2d(2, stride=2), nn.MaxPool2d(2)), ["MaxPool2d"], 2, False),  # one pool only
    ((nn.MaxPool2d(3, stride=2), nn.ReLU()), [], 1, False),            # overlapping: not fused
    ((nn.MaxPool2d(2, ceil_mode=True),), [], 1, False),
    ((nn.MaxPool2d(2, padding=1),), [], 1, False),
    ((nn.MaxPool2d((2, 3)),), [], 1, False),
    ((nn.ReLU(), nn.ReLU(), nn.MaxPool2d(2)), ["ReLU"], 1, True),      # stops at the 2nd ReLU
], ids=["bn-relu-pool", "pool-relu", "two-pools", "overlapping", "ceil", "padded", "oblong",
        "two-relus"])
def test_fuses_a_following_non_overlapping_max_pool(monkeypatch, followers, fused, pool, relu):
    monkeypatch.setattr(sparsify_mod, "_time_pair", _fake_timer(lambda i: "sparse"))
    before = _conv_then(*followers)
    after = copy.deepcopy(before)
    x = torch.randn(3, 3, 13, 11)   # conv output 11x9: the pools drop a row / a column
    report = sparsify(after, min_sparsity=0.7, example_input=x)
    assert report.layers[0].fused == fused
    assert after[0].pool == pool and after[0].relu == relu
    assert all(isinstance(after[i + 1], nn.Identity) for i in range(len(fused)))
    assert not any(isinstance(m, nn.Identity) for m in list(after)[len(fused) + 1:])
    _assert_same_outputs(before, after, x)


def test_keeps_layers_that_measure_slower(monkeypatch):
    # Eligible layers are timed in order 0, 5, 8, 10: dense wins for 5 and 10.
    monkeypatch.setattr(sparsify_mod, "_time_pair",
                        _fake_timer(lambda i: "dense" if i in (1, 3) else "sparse"))
    before = _model()
    after = copy.deepcopy(before)
    x = torch.randn(1, 3, 8, 8)
    report = sparsify(after, min_sparsity=0.7, example_input=x)
    assert report.replaced == ["0", "8"]
    assert type(after[5]) is nn.Conv2d and type(after[10]) is nn.Linear
    assert {c.name: c.reason for c in report.layers}["5"] == "dense is faster here"
    _assert_same_outputs(before, after, x)


def test_min_sparsity_and_training_mode(monkeypatch):
    monkeypatch.setattr(sparsify_mod, "_time_pair", _fake_timer(lambda i: "sparse"))
    model = _model()
    assert sparsify(copy.deepcopy(model), min_sparsity=0.99,
                    example_input=torch.randn(1, 3, 8, 8)).replaced == []
    train = copy.deepcopy(model).train()
    report = sparsify(train, min_sparsity=0.7, example_input=torch.randn(2, 3, 8, 8))
    assert {c.name: c.fused for c in report.layers}["0"] == []  # BN not folded in training mode
    assert type(train[1]) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsify(model, min_sparsity=1.5)


def test_without_example_input_times_linears_only(monkeypatch):
    monkeypatch.setattr(sparsify_mod, "_time_pair", _fake_timer(lambda i: "sparse"))
    model = _model()
    report = sparsify(model, min_sparsity=0.7)
    assert report.replaced == ["8", "10"]
    assert {c.name: c.reason for c in report.layers}["0"] == "no example_input to time it on"


def test_real_timing_keeps_outputs_and_reports_both_times():
    before = _model()
    after = copy.deepcopy(before)
    x = torch.randn(4, 3, 8, 8)
    report = sparsify(after, min_sparsity=0.7, example_input=x, min_time=0.002)
    eligible = {"0", "5", "8", "10"}
    assert set(report.replaced) <= eligible
    for choice in report.layers:
        if choice.name in eligible:
            assert choice.dense_ms > 0 and choice.sparse_ms > 0
            assert choice.replaced == (choice.sparse_ms < choice.dense_ms)
    _assert_same_outputs(before, after, x)
    assert "| 0 | Conv2d |" in str(report) and report.to_dict()["layers"][0]["name"] == "0"


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_of_sparsified_model(monkeypatch, backend):
    monkeypatch.setattr(sparsify_mod, "_time_pair", _fake_timer(lambda i: "sparse"))
    before = _model()
    after = copy.deepcopy(before)
    x = torch.randn(3, 3, 8, 8)
    sparsify(after, min_sparsity=0.7, example_input=x)
    torch._dynamo.reset()
    compiled = torch.compile(after, fullgraph=True, backend=backend)
    _assert_same_outputs(before, compiled, x)
