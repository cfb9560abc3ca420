"""ProxSGD against torch.optim.SGD and a hand-written proximal-step oracle."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from cvsparse.faults import ExplodingGradientError
from cvsparse.optim import ProxSGD

F64 = torch.float64


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batches(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=gen, dtype=F64), torch.randint(0, 3, (16,),
                                                                         generator=gen))
            for _ in range(steps)]


def _backward(model: nn.Module, batch) -> None:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()


def _weights_and_biases(model: nn.Module) -> tuple[list, list]:
    return [model[0].weight, model[2].weight], [model[0].bias, model[2].bias]


def _assert_same_params(a: nn.Module, b: nn.Module, **tol) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol)


def _oracle_step(params, bufs, *, lr, momentum, lambda1, lambda2, masks=None):
    """docs/method.md §2 written out per tensor in float64."""
    with torch.no_grad():
        for i, (p, v) in enumerate(zip(params, bufs, strict=True)):
            v.mul_(momentum).add_(p.grad + lambda2[i] * p)
            z = p - lr * v
            p.copy_(torch.sign(z) * (z.abs() - lr * lambda1[i]).clamp(min=0))
            if masks is not None:
                p.mul_(masks[i])
                v.mul_(masks[i])


def test_zero_lambda_equals_sgd_with_momentum():
    ours, ref = _model(), _model()
    w, b = _weights_and_biases(ours)
    rw, rb = _weights_and_biases(ref)
    opt = ProxSGD([{"params": w}, {"params": b, "lr": 0.05, "momentum": 0.5}], lr=0.1,
                  momentum=0.9)
    sgd = torch.optim.SGD([{"params": rw}, {"params": rb, "lr": 0.05, "momentum": 0.5}], lr=0.1,
                          momentum=0.9)
    for batch in _batches(20):
        for model, optimizer in ((ours, opt), (ref, sgd)):
            _backward(model, batch)
            optimizer.step()
        _assert_same_params(ours, ref, rtol=1e-12, atol=1e-14)
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"],
                                   sgd.state[q]["momentum_buffer"], rtol=1e-12, atol=1e-14)


def test_lambda2_only_equals_sgd_weight_decay():
    ours, ref = _model(), _model()
    w, b = _weights_and_biases(ours)
    decays = [1e-2, 3e-2]  # per tensor for the weights, one value for the biases
    opt = ProxSGD([{"params": w, "lambda2": torch.tensor(decays, dtype=F64)},
                   {"params": b, "lambda2": 0.02}], lr=0.1, momentum=0.9)
    rw, rb = _weights_and_biases(ref)
    sgd = torch.optim.SGD([{"params": [rw[0]], "weight_decay": decays[0]},
                           {"params": [rw[1]], "weight_decay": decays[1]},
                           {"params": rb, "weight_decay": 0.02}], lr=0.1, momentum=0.9)
    for batch in _batches(20):
        for model, optimizer in ((ours, opt), (ref, sgd)):
            _backward(model, batch)
            optimizer.step()
        _assert_same_params(ours, ref, rtol=1e-12, atol=1e-14)


def test_lambda1_gives_exact_zeros_of_the_soft_threshold_oracle():
    ours, ref = _model(), _model()
    lambda1, lambda2 = [0.1, 0.2], [1e-3, 0.0]
    opt = ProxSGD([{"params": _weights_and_biases(ours)[0]}], lr=0.1, momentum=0.9,
                  lambda1=torch.tensor(lambda1, dtype=F64),
                  lambda2=torch.tensor(lambda2, dtype=F64))
    ref_w = _weights_and_biases(ref)[0]
    bufs = [torch.zeros_like(p) for p in ref_w]
    for batch in _batches(20):
        _backward(ours, batch)
        opt.step()
        _backward(ref, batch)
        _oracle_step(ref_w, bufs, lr=0.1, momentum=0.9, lambda1=lambda1, lambda2=lambda2)
        for p, q in zip(_weights_and_biases(ours)[0], ref_w, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
            assert torch.equal(p == 0, q == 0)
    weights = _weights_and_biases(ours)[0]
    assert all(0 < int((p == 0).sum()) < p.numel() for p in weights)
    expected = torch.stack([torch.count_nonzero(p) for p in weights])
    assert torch.equal(opt.last_nonzero[0], expected)


def test_threshold_masks_persist_and_keep_pruned_weights_at_zero():
    model, ref = _model(), _model()
    weights = _weights_and_biases(model)[0]
    opt = ProxSGD([{"params": weights, "threshold": 0.15}], lr=0.1, momentum=0.9)
    ref_w = _weights_and_biases(ref)[0]
    bufs = [torch.zeros_like(p) for p in ref_w]
    batches = _batches(8)
    _backward(model, batches[0])
    opt.step()
    _backward(ref, batches[0])
    _oracle_step(ref_w, bufs, lr=0.1, momentum=0.9, lambda1=[0, 0], lambda2=[0, 0])
    keep = [q.abs() >= 0.15 for q in ref_w]
    masks = [opt.state[p]["mask"] for p in weights]
    for p, q, k, m in zip(weights, ref_w, keep, masks, strict=True):
        assert m.dtype == torch.bool and torch.equal(m, k)
        torch.testing.assert_close(p, q * k, rtol=1e-12, atol=1e-14)
        assert torch.equal(opt.state[p]["momentum_buffer"] == 0, ~k)
    assert torch.equal(opt.last_nonzero[0], torch.stack([k.sum() for k in keep]))
    opt.param_groups[0]["threshold"] = None  # stop pruning: the masks alone hold the zeros
    for batch in batches[1:]:
        _backward(model, batch)
        assert any(bool((p.grad[~m] != 0).any()) for p, m in zip(weights, masks, strict=True))
        opt.step()
        for p, m in zip(weights, masks, strict=True):
            assert torch.equal(opt.state[p]["mask"], m)
            assert bool((p[~m] == 0).all()) and bool((opt.state[p]["momentum_buffer"][~m] == 0)
                                                     .all())
            assert bool((p[m] != 0).all())


def test_prune_now_thresholds_every_group_at_tau():
    model = _model()
    weights, biases = _weights_and_biases(model)
    opt = ProxSGD([{"params": weights}, {"params": biases}], lr=0.1)
    before = [p.detach().clone() for p in weights + biases]
    counts = opt.prune(0.2)
    keep = [p.abs() >= 0.2 for p in before]
    assert torch.equal(counts, torch.stack([k.sum() for k in keep]))
    for p, q, k in zip(weights + biases, before, keep, strict=True):
        assert torch.equal(opt.state[p]["mask"], k) and torch.equal(p, q * k)
    # no group has a threshold: nothing changes, and the counts are those of the first cut
    assert torch.equal(opt.prune(), counts)
    for p, q, k in zip(weights + biases, before, keep, strict=True):
        assert torch.equal(p, q * k) and torch.equal(opt.state[p]["mask"], k)
    with pytest.raises(ValueError, match="tau"):
        opt.prune(-1.0)


def test_state_dict_round_trip_reproduces_the_next_step():
    model = _model()
    lambda1 = torch.tensor([0.05, 0.02], dtype=F64)
    weights, biases = _weights_and_biases(model)
    opt = ProxSGD([{"params": weights, "lambda1": lambda1, "threshold": 0.05},
                   {"params": biases, "momentum": 0.5}], lr=0.1, momentum=0.9, lambda2=1e-3)
    batches = _batches(6)
    for batch in batches[:5]:
        _backward(model, batch)
        opt.step()
    original = lambda1.clone()
    state = opt.state_dict()
    lambda1.mul_(3)  # the saved λ is a snapshot, not this live tensor
    assert torch.equal(state["param_groups"][0]["lambda1"], original)
    lambda1.copy_(original)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    twin = copy.deepcopy(model)
    tw, tb = _weights_and_biases(twin)
    other = ProxSGD([{"params": tw}, {"params": tb}], lr=1.0, momentum=0.0)
    other.load_state_dict(saved)
    assert torch.equal(other.param_groups[0]["lambda1"], lambda1)
    assert other.param_groups[0]["threshold"] == 0.05 and other.param_groups[1]["momentum"] == 0.5
    for p in tw:
        assert other.state[p]["mask"].dtype == torch.bool
    for m, optimizer in ((model, opt), (twin, other)):
        _backward(m, batches[5])
        optimizer.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("momentum_buffer", "mask"):
            if key in opt.state[p]:
                assert torch.equal(opt.state[p][key], other.state[q][key])


@pytest.mark.parametrize("make_scheduler", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.1),
])
def test_lr_scheduler_drives_the_step(make_scheduler):
    ours, ref = _model(), _model()
    opt = ProxSGD(ours.parameters(), lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    schedulers = [make_scheduler(opt), make_scheduler(sgd)]
    lrs = []
    for batch in _batches(8):
        for model, optimizer in ((ours, opt), (ref, sgd)):
            _backward(model, batch)
            optimizer.step()
        for s in schedulers:
            s.step()
        lrs.append(opt.param_groups[0]["lr"])
        _assert_same_params(ours, ref, rtol=1e-12, atol=1e-14)
    assert len(set(lrs)) > 1


def test_lr_scales_the_l1_shrinkage():
    """With a zero gradient and μ = 0 every step shrinks |w| by exactly lr·λ1."""
    w = nn.Parameter(torch.tensor([5.0, -5.0], dtype=F64))
    opt = ProxSGD([w], lr=0.1, momentum=0.0, lambda1=1.0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
    expected = 5.0
    for _ in range(4):
        w.grad = torch.zeros_like(w)
        expected -= opt.param_groups[0]["lr"] * 1.0
        opt.step()
        scheduler.step()
        torch.testing.assert_close(w.detach(), torch.tensor([expected, -expected], dtype=F64))
    assert abs(expected - (5.0 - 0.2 - 0.02)) < 1e-12


def _snapshot(model: nn.Module, opt: ProxSGD):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    return params, state


def _assert_unchanged(model: nn.Module, opt: ProxSGD, snapshot) -> None:
    params, state = snapshot
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == state[id(p)].keys()
        for key, value in opt.state[p].items():
            assert torch.equal(value, state[id(p)][key])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_raises_and_changes_nothing(bad):
    model = _model()
    weights, biases = _weights_and_biases(model)
    opt = ProxSGD([{"params": weights, "threshold": 0.05, "lambda1": 0.01},
                   {"params": biases}], lr=0.1)
    batches = _batches(3)
    for batch in batches[:2]:
        _backward(model, batch)
        opt.step()
    _backward(model, batches[2])
    snapshot = _snapshot(model, opt)
    biases[0].grad[3] = bad  # parameter 2 in optimizer order (weights first)
    with pytest.raises(ValueError, match="parameter 2 "):
        opt.step()
    _assert_unchanged(model, opt, snapshot)
    opt.check_finite = False  # the check is what stopped it
    opt.step()
    assert not torch.isfinite(biases[0]).all()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": -0.1}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"momentum": -0.5}, "momentum"),
    ({"lambda1": float("nan")}, "lambda1"),
    ({"lambda2": -1e-3}, "lambda2"),
    ({"lambda1": torch.tensor([0.1, 0.2, 0.3])}, "lambda1"),
    ({"lambda2": torch.tensor([0.1, -0.2])}, "lambda2"),
    ({"threshold": -1.0}, "threshold"),
])
def test_bad_hyperparameters_raise_value_error(kwargs, match):
    weights = _weights_and_biases(_model())[0]
    with pytest.raises(ValueError, match=match):
        ProxSGD(weights, **{"lr": 0.1, **kwargs})


@pytest.mark.parametrize(("key", "value"), [
    ("lr", -1.0), ("lambda1", torch.tensor([0.1, float("nan")])), ("lambda2", -0.5),
])
def test_bad_group_value_set_later_is_caught_before_any_update(key, value):
    model = _model()
    weights, biases = _weights_and_biases(model)
    opt = ProxSGD([{"params": biases}, {"params": weights}], lr=0.1)
    _backward(model, _batches(1)[0])
    snapshot = _snapshot(model, opt)
    opt.param_groups[1][key] = value
    with pytest.raises(ValueError, match=f"{key} of param group 1"):
        opt.step()
    _assert_unchanged(model, opt, snapshot)


def test_group_with_mixed_dtypes_and_a_param_without_grad():
    gen = torch.Generator().manual_seed(3)
    p32 = nn.Parameter(torch.randn(4, 3, generator=gen))
    p64 = nn.Parameter(torch.randn(5, generator=gen, dtype=F64))
    idle = nn.Parameter(torch.tensor([0.0, 1.0, 2.0]))
    refs = [nn.Parameter(p.detach().clone()) for p in (p32, p64)]
    opt = ProxSGD([p32, idle, p64], lr=0.1, momentum=0.9,
                  lambda2=torch.tensor([0.1, 0.2, 0.3], dtype=F64))
    sgd = torch.optim.SGD([{"params": [refs[0]], "weight_decay": 0.1},
                           {"params": [refs[1]], "weight_decay": 0.3}], lr=0.1, momentum=0.9)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in (p32, p64)]
        for p, r, g in zip((p32, p64), refs, grads, strict=True):
            p.grad, r.grad = g, g.clone()
        opt.step()
        sgd.step()
    torch.testing.assert_close(p32, refs[0])
    torch.testing.assert_close(p64, refs[1], rtol=1e-12, atol=1e-14)
    assert torch.equal(idle, torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(opt.last_nonzero[0], torch.tensor([12, 2, 5]))


def test_non_contiguous_parameter_is_updated_in_its_layout():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(4, 3, 3, 3, generator=gen, dtype=F64)
    last = nn.Parameter(weight.clone().to(memory_format=torch.channels_last))
    plain = nn.Parameter(weight.clone())
    assert not last.is_contiguous()
    optimizers = [ProxSGD([p], lr=0.1, lambda1=0.5, threshold=0.1) for p in (last, plain)]
    for _ in range(3):
        grad = torch.randn(weight.shape, generator=gen, dtype=F64)
        last.grad = grad.to(memory_format=torch.channels_last)
        plain.grad = grad.clone()
        for opt in optimizers:
            opt.step()
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(last, plain)
    assert int((plain == 0).sum()) > 0


def test_channels_last_weights_are_stepped_in_place_with_state_in_their_layout():
    """A channels-last weight is updated through its storage-order view: no working copy (the
    parameter's and its momentum buffer's memory stay where they are), momentum and mask in the
    weight's layout, results bitwise those of the contiguous weight — also with a contiguous
    gradient, a state loaded from the contiguous run, and prune()."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(8, 4, 3, 3, generator=gen)
    last = nn.Parameter(weight.clone().to(memory_format=torch.channels_last))
    plain = nn.Parameter(weight.clone())
    opts = [ProxSGD([p], lr=0.1, momentum=0.9, lambda1=0.3, lambda2=0.01, threshold=0.02)
            for p in (last, plain)]
    where = last.data_ptr()
    for step in range(4):
        grad = torch.randn(weight.shape, generator=gen)
        last.grad = grad.to(memory_format=torch.channels_last) if step % 2 else grad.clone()
        plain.grad = grad.clone()
        for opt in opts:
            opt.step()
        if step == 0:
            buffer = opts[0].state[last]["momentum_buffer"]
            assert buffer.is_contiguous(memory_format=torch.channels_last)
            assert opts[0].state[last]["mask"].stride() == last.stride()
    assert last.data_ptr() == where
    assert opts[0].state[last]["momentum_buffer"] is buffer
    assert torch.equal(last, plain) and int((plain == 0).sum()) > 0
    assert torch.equal(opts[0].state[last]["momentum_buffer"],
                       opts[1].state[plain]["momentum_buffer"])
    assert torch.equal(opts[0].last_nonzero[0], opts[1].last_nonzero[0])

    resumed = ProxSGD([last], lr=0.1, momentum=0.9, lambda1=0.3, lambda2=0.01, threshold=0.02)
    resumed.load_state_dict(opts[1].state_dict())   # buffers and masks of the contiguous run
    grad = torch.randn(weight.shape, generator=gen)
    last.grad, plain.grad = grad.to(memory_format=torch.channels_last), grad.clone()
    resumed.step()
    opts[1].step()
    assert torch.equal(last, plain)
    assert resumed.state[last]["momentum_buffer"].stride() == last.stride()
    assert torch.equal(resumed.prune(0.05), opts[1].prune(0.05))
    assert torch.equal(last, plain)


def test_exploding_gradient_raises_and_changes_nothing_and_largest_entry_is_recorded():
    model = _model()
    weights, biases = _weights_and_biases(model)
    opt = ProxSGD([{"params": weights, "lambda1": 0.01}, {"params": biases}], lr=0.1)
    batches = _batches(2)
    _backward(model, batches[0])
    opt.step()
    largest = max(abs(x) for p in model.parameters() for x in p.grad.flatten().tolist())
    assert opt.last_grad_norm == largest
    _backward(model, batches[1])
    snapshot = _snapshot(model, opt)
    biases[1].grad[2] = 1e6
    opt.grad_norm_limit = 1e5
    with pytest.raises(ExplodingGradientError, match="1e\\+06 is above the limit 1e\\+05"):
        opt.step()
    _assert_unchanged(model, opt, snapshot)
    opt.grad_norm_limit = 1e7
    opt.step()
    assert opt.last_grad_norm == 1e6


def test_sparse_gradient_raises_value_error_and_changes_nothing():
    model = _model()
    weights, biases = _weights_and_biases(model)
    opt = ProxSGD([{"params": biases}, {"params": weights}], lr=0.1)
    _backward(model, _batches(1)[0])
    snapshot = _snapshot(model, opt)
    weights[1].grad = weights[1].grad.to_sparse()
    with pytest.raises(ValueError, match="parameter 3 has a sparse gradient"):
        opt.step()
    _assert_unchanged(model, opt, snapshot)


def test_cached_step_plan_follows_changes_of_the_group():
    """Steps reuse what they derived from a group; a gradient that appears or disappears, a
    parameter added to the group's list, a λ tensor replaced or updated in place and a
    state cleared from outside all take effect at the next step (float64 oracle)."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(4, 3), (6,), (2, 5)]
    ours = [nn.Parameter(torch.randn(s, generator=gen, dtype=F64)) for s in shapes]
    refs = [p.detach().clone() for p in ours]
    ref_bufs = [torch.zeros_like(p) for p in refs]
    lam1 = torch.tensor([0.05, 0.0], dtype=F64)
    opt = ProxSGD([{"params": ours[:2], "lambda1": lam1}], lr=0.1, momentum=0.9)

    def step(moved, lambda1, lambda2=(0.0, 0.0, 0.0)):
        for k, (p, r) in enumerate(zip(ours, refs, strict=True)):
            p.grad = torch.randn(p.shape, generator=gen, dtype=F64) if k in moved else None
            r.grad = None if p.grad is None else p.grad.clone()
        opt.step()
        _oracle_step([refs[k] for k in moved], [ref_bufs[k] for k in moved], lr=0.1,
                     momentum=0.9, lambda1=[lambda1[k] for k in moved],
                     lambda2=[lambda2[k] for k in moved])
        for p, r in zip(ours, refs, strict=True):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)
        counts = opt.last_nonzero[0].tolist()
        assert counts == [int((p != 0).sum()) for p in opt.param_groups[0]["params"]]

    step([0, 1], (0.05, 0.0, 0.0))
    step([0], (0.05, 0.0, 0.0))               # ours[1] has no gradient: untouched
    step([0, 1], (0.05, 0.0, 0.0))
    lam1[1] = 0.2                             # in place: read at the next step
    step([0, 1], (0.05, 0.2, 0.0))
    opt.param_groups[0]["params"].append(ours[2])
    opt.param_groups[0]["lambda1"] = torch.tensor([0.05, 0.2, 0.1], dtype=F64)
    opt.param_groups[0]["lambda2"] = 0.01
    step([0, 1, 2], (0.05, 0.2, 0.1), (0.01, 0.01, 0.01))
    opt.state.clear()                         # momentum restarts from zero
    for v in ref_bufs:
        v.zero_()
    step([0, 1, 2], (0.05, 0.2, 0.1), (0.01, 0.01, 0.01))
