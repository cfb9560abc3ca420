"""LambdaOptimizer: step formulas, bounds, clipping, state round trip, rejected input."""

from __future__ import annotations

import math

import pytest
import torch

from cvsparse.hyper import LambdaOptimizer
from cvsparse.optim import ProxSGD

F64 = torch.float64


def test_sgd_step_is_lambda_minus_lr_times_gradient():
    opt = LambdaOptimizer(torch.tensor([0.5, 0.3]), 0.2, lr=(0.1, 0.01), method="sgd")
    assert opt.lambda1.shape == (2,) and opt.lambda1.dtype == F64
    opt.step(torch.tensor([1.0, -2.0]), torch.tensor([3.0, -4.0]))
    torch.testing.assert_close(opt.lambda1, torch.tensor([0.5 - 0.1, 0.3 + 0.2], dtype=F64))
    torch.testing.assert_close(opt.lambda2, torch.tensor([0.2 - 0.03, 0.2 + 0.04], dtype=F64))


def test_global_lambda_accepts_scalar_hypergradients():
    opt = LambdaOptimizer(0.5, 0.25, lr=0.5, method="sgd")
    assert opt.lambda1.shape == (1,)
    opt.step(0.2, torch.tensor(-0.1, dtype=F64))
    assert opt.lambda1.tolist() == [0.5 - 0.5 * 0.2] and opt.lambda2.tolist() == [0.25 + 0.05]


def test_sgd_clamps_at_zero_and_at_the_bounds():
    opt = LambdaOptimizer(0.5, 0.5, lr=1.0, method="sgd", per_layer=2,
                          lambda2_bounds=(0.1, 0.8))
    opt.step(torch.tensor([10.0, 0.25]), torch.tensor([10.0, -10.0]))
    assert opt.lambda1.tolist() == [0.0, 0.25]
    assert opt.lambda2.tolist() == [0.1, 0.8]


def _torch_adam_trajectory(start, grads, lr, log_space):
    """λ after each step of torch.optim.Adam on λ (or on log λ with gradient g·λ)."""
    x = torch.nn.Parameter(torch.tensor(start, dtype=F64).log() if log_space else
                           torch.tensor(start, dtype=F64))
    adam = torch.optim.Adam([x], lr=lr)
    out = []
    for g in grads:
        lam = x.detach().exp() if log_space else x.detach()
        x.grad = g * lam if log_space else g.clone()
        adam.step()
        out.append(x.detach().exp() if log_space else x.detach().clone())
    return out


@pytest.mark.parametrize("log_space", [False, True])
def test_adam_matches_torch_adam(log_space):
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(2, 3, generator=gen, dtype=F64) for _ in range(6)]
    start = [[0.5, 1.0, 2.0], [0.7, 0.9, 1.5]]
    lambda1, lambda2 = torch.tensor(start, dtype=F64)
    opt = LambdaOptimizer(lambda1, lambda2, lr=0.05, method="adam", log_space=log_space)
    expected = _torch_adam_trajectory(start, grads, 0.05, log_space)
    for g, want in zip(grads, expected, strict=True):
        opt.step(g[0], g[1])
        torch.testing.assert_close(torch.stack([opt.lambda1, opt.lambda2]), want, rtol=1e-12,
                                   atol=1e-15)


def test_log_space_adam_keeps_lambda_positive():
    opt = LambdaOptimizer(1e-3, 1e-3, lr=0.5, method="adam", log_space=True)
    history = []
    for _ in range(50):
        opt.step(1e6, 1e6)  # a huge push towards (and, on λ itself, below) zero
        history.append(opt.lambda1.item())
        assert opt.lambda1.item() > 0 and opt.lambda2.item() > 0
    assert all(a > b for a, b in zip(history, history[1:], strict=False))
    raw = LambdaOptimizer(1e-3, 1e-3, lr=0.5, method="adam")
    raw.step(1e6, 1e6)
    assert raw.lambda1.item() == 0.0  # the contrast: Adam on λ hits the clamp at once


@pytest.mark.parametrize("mode", ["norm", "value"])
def test_clipping_bounds_the_step(mode):
    opt = LambdaOptimizer(torch.full((3,), 5.0), torch.full((3,), 5.0), lr=0.1, method="sgd",
                          clip=2.0, clip_mode=mode)
    grad1, grad2 = torch.tensor([300.0, -400.0, 1.0]), torch.tensor([0.0, 1.0, 0.5])
    opt.step(grad1, grad2)
    step = (5.0 - torch.stack([opt.lambda1, opt.lambda2])) / 0.1
    full = torch.stack([grad1, grad2]).double()
    if mode == "norm":
        torch.testing.assert_close(step, full * (2.0 / full.norm()))
    else:
        torch.testing.assert_close(step, full.clamp(-2.0, 2.0))
    small = LambdaOptimizer(5.0, 5.0, lr=0.1, method="sgd", clip=2.0, clip_mode=mode)
    small.step(0.5, -0.5)  # under the limit: untouched
    assert small.lambda1.tolist() == [5.0 - 0.05] and small.lambda2.tolist() == [5.0 + 0.05]


def test_state_dict_round_trip_reproduces_the_next_step():
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(2, 4, generator=gen, dtype=F64) for _ in range(4)]
    kwargs = {"lr": 0.1, "method": "adam", "log_space": True, "per_layer": 4}
    first = LambdaOptimizer(0.5, 0.2, **kwargs)
    for g in grads[:3]:
        first.step(g[0], g[1])
    state = first.state_dict()
    second = LambdaOptimizer(1.0, 1.0, **kwargs)
    view = second.lambda1
    second.load_state_dict(state)
    assert torch.equal(view, first.lambda1)  # the live view sees the loaded values
    first.step(grads[3][0], grads[3][1])
    second.step(grads[3][0], grads[3][1])
    assert torch.equal(first.lambda1, second.lambda1) and torch.equal(first.lambda2,
                                                                      second.lambda2)
    with pytest.raises(ValueError, match="lambda"):
        LambdaOptimizer(1.0, 1.0, lr=0.1).load_state_dict(state)  # shape (1,) vs (4,)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hypergradient_raises_and_changes_nothing(bad):
    opt = LambdaOptimizer(torch.tensor([0.5, 0.4]), 0.3, lr=0.1, method="adam")
    opt.step(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]))
    before = opt.state_dict()
    with pytest.raises(ValueError, match="d_lambda2"):
        opt.step(torch.tensor([1.0, 2.0]), torch.tensor([0.5, bad]))
    after = opt.state_dict()
    assert after["step"] == before["step"]
    for key in ("lambda", "exp_avg", "exp_avg_sq"):
        assert torch.equal(after[key], before[key])


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    ((-0.1, 0.1, 0.1), {}, "lambda1"),
    ((0.1, math.nan, 0.1), {}, "lambda2"),
    ((0.1, 0.1, -1.0), {}, "lr"),
    ((0.1, 0.1, 0.1), {"method": "rmsprop"}, "method"),
    ((0.0, 0.1, 0.1), {"log_space": True}, "log_space"),
    ((0.1, 0.1, 0.1), {"clip": 0.0}, "clip"),
    ((0.1, 0.1, 0.1), {"clip_mode": "max"}, "clip_mode"),
    ((torch.ones(3), 0.1, 0.1), {"per_layer": 2}, "lambda1"),
    ((0.1, 0.1, 0.1), {"lambda1_bounds": (0.5, 0.2)}, "lambda1_bounds"),
    ((0.1, 0.1, 0.1), {"lambda1_bounds": (0.2, 1.0)}, "bounds"),
])
def test_bad_construction_raises_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LambdaOptimizer(*args, **kwargs)


def test_hypergradient_shape_must_match_lambda():
    opt = LambdaOptimizer(0.1, 0.1, lr=0.1, per_layer=3)
    with pytest.raises(ValueError, match="d_lambda1"):
        opt.step(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="d_lambda1"):
        opt.step(1.0, torch.ones(3))


def test_live_lambda_view_drives_prox_sgd():
    """The trainer may hand ``lambda1`` to ProxSGD once: λ steps apply to the next update."""
    lam = LambdaOptimizer(1.0, 0.0, lr=0.5, method="sgd")
    w = torch.nn.Parameter(torch.tensor([5.0, -5.0], dtype=F64))
    opt = ProxSGD([w], lr=0.1, momentum=0.0, lambda1=lam.lambda1, lambda2=lam.lambda2)
    w.grad = torch.zeros_like(w)
    opt.step()  # shrink by lr·λ1 = 0.1
    lam.step(1.0, 0.0)  # λ1 = 1 − 0.5·1 = 0.5
    opt.step()  # shrink by 0.05
    torch.testing.assert_close(w.detach(), torch.tensor([4.85, -4.85], dtype=F64))
