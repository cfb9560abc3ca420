"""The gated-weight operator (docs/method.md §6) on every backend: values and gradients against
those formulas, the C++ kernels against the reference for all dtypes and awkward sizes, opcheck, and
argument validation."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from cvsparse import ops
from cvsparse.ops import reference

BACKENDS = ["reference", "cpp"] + (["triton"] if "triton" in ops.available_backends() else [])
STES = ["linear", "leaky_relu", "softplus"]
UPDATES = ["proposed", "bnn"]
GRANULARITIES = ["weight", "neuron"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# The straight-through functions s whose derivative s' stands in for h' (docs/method.md §6).
STE_FUNCTIONS = {
    "linear": lambda m, slope: m,
    "leaky_relu": lambda m, slope: F.leaky_relu(m, slope),
    "softplus": lambda m, slope: F.softplus(m),
}


@pytest.fixture(params=BACKENDS)
def backend(request):
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend("auto")


def make_inputs(shape, granularity, dtype=torch.float32, seed=0):
    """Random (grad, weight, aux) with some exact zeros in weight and aux."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    aux_shape = shape if granularity == "weight" else shape[:1]
    aux = torch.randn(aux_shape, generator=gen, dtype=torch.float64)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight.view(-1)[::5] = 0
    aux.view(-1)[::4] = 0
    return grad.to(dtype), weight.to(dtype), aux.to(dtype)


def spec_gated(grad, weight, aux, ste, slope, update):
    """docs/method.md §6 written out in float64: (ŵ, ∂L/∂w, ∂L/∂m) for upstream gradient
    ``grad``."""
    g, w, m = grad.double(), weight.double(), aux.double()
    unit_m = m.reshape(m.shape + (1,) * (w.dim() - m.dim()))  # neuron gates broadcast
    h = (unit_m > 0).double()
    coef = torch.sign(w) if update == "proposed" else w
    per_weight = g * coef
    if m.shape != w.shape:
        per_weight = per_weight.sum(dim=tuple(range(1, w.dim())))
    m_leaf = m.clone().requires_grad_()
    STE_FUNCTIONS[ste](m_leaf, slope).sum().backward()  # m_leaf.grad = s'(m)
    return w * h, g * h, per_weight * m_leaf.grad


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("ste", STES)
def test_values_and_gradients_follow_spec(backend, granularity, update, ste):
    slope = 0.3
    grad, weight, aux = make_inputs((6, 3, 2, 3), granularity)
    weight.requires_grad_()
    aux.requires_grad_()
    out = ops.gated_weight(weight, aux, ste=ste, slope=slope, update=update)
    out.backward(grad)
    want_out, want_gw, want_gm = spec_gated(grad, weight.detach(), aux.detach(), ste, slope,
                                            update)
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=0)
    torch.testing.assert_close(weight.grad.double(), want_gw, rtol=0, atol=0)
    # float32 against the float64 spec: the neuron sums have 18 terms of size ~1, each rounded
    # to 2⁻²⁴ relative, so they agree to 18·2⁻²⁴ ≈ 1.1e-6 in the worst case, ~3e-7 typically
    torch.testing.assert_close(aux.grad.double(), want_gm, rtol=1e-6, atol=1e-6)
    assert out.dtype == weight.dtype and aux.grad.dtype == aux.dtype


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fixed_gates_take_no_gradient(backend, granularity):
    """Gates that do not require a gradient get none, and the weights' gradient is the spec's
    g · h(m), bit for bit the one computed beside trainable gates."""
    grad, weight, aux = make_inputs((6, 3, 2, 3), granularity)
    kwargs = {"ste": "leaky_relu", "slope": 0.3, "update": "proposed"}
    trained_w, trained_aux = weight.clone().requires_grad_(), aux.clone().requires_grad_()
    ops.gated_weight(trained_w, trained_aux, **kwargs).backward(grad)
    fixed_w, fixed_aux = weight.clone().requires_grad_(), aux.clone()
    ops.gated_weight(fixed_w, fixed_aux, **kwargs).backward(grad)
    assert fixed_aux.grad is None and trained_aux.grad is not None
    assert torch.equal(fixed_w.grad, trained_w.grad)
    _, want_gw, _ = spec_gated(grad, weight, aux, "leaky_relu", 0.3, "proposed")
    torch.testing.assert_close(fixed_w.grad.double(), want_gw, rtol=0, atol=0)


def test_neuron_gate_off_zeroes_whole_rows(backend):
    _, weight, aux = make_inputs((5, 4, 3), "neuron")
    aux.copy_(torch.tensor([0.5, -0.1, 0.2, 0.0, 1.0]))
    out = ops.gated_weight(weight, aux)
    assert (out[[1, 3]] == 0).all()
    assert torch.equal(out[[0, 2, 4]], weight[[0, 2, 4]])


def test_noncontiguous_inputs_are_accepted(backend):
    grad, weight, aux = make_inputs((7, 5), "weight")
    w_t = weight.t().requires_grad_()  # (5, 7), not contiguous
    m_t = aux.t().requires_grad_()
    out = ops.gated_weight(w_t, m_t, ste="softplus")
    out.backward(grad.t())
    want_out, want_gw, want_gm = spec_gated(grad.t(), w_t.detach(), m_t.detach(), "softplus",
                                            0.01, "proposed")
    torch.testing.assert_close(out.double(), want_out)
    torch.testing.assert_close(w_t.grad.double(), want_gw)
    torch.testing.assert_close(m_t.grad.double(), want_gm, rtol=1e-6, atol=1e-6)


# ---- the C++ kernels against the reference, every dtype, awkward sizes ---------------------

SHAPES = {
    "weight": [(0,), (1,), (7,), (3, 5, 3, 3), (257, 1031)],
    "neuron": [(1, 1), (1, 9), (7, 1), (3, 5, 3, 3), (3, 50001), (4099, 9)],
}
# For grad_aux, whose row sums (neuron granularity: up to 50,001 terms g·w·s'(m)) may be
# accumulated in another order than the reference's.  float32: an order change moves a sum by
# about √n·u·rms(term) = 224·6e-8·~0.6 ≈ 1e-5 (u = 2⁻²⁴); atol 1e-4 is ten times that.  float64:
# the same estimate gives ~1e-13.  float16 / bfloat16 (float32 math, one rounding to the dtype):
# two ulps, rtol = 2·eps (eps 9.8e-4, 7.8e-3).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-4),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "granularity,shape", [(gr, s) for gr in GRANULARITIES for s in SHAPES[gr]], ids=str
)
def test_cpp_matches_reference(granularity, shape, dtype):
    grad, weight, aux = make_inputs(shape, granularity, dtype, seed=len(shape))
    for ste, code in ops.STE_CODES.items():
        for sign_rule in (True, False):
            args = (code, 0.05, sign_rule)
            out = torch.ops.cvsparse.gated_weight(weight, aux, *args)
            gw, gm = torch.ops.cvsparse.gated_weight_backward(grad, weight, aux, *args)
            ref_gw, ref_gm = reference.gated_weight_backward(grad, weight, aux, *args)
            assert torch.equal(out, reference.gated_weight(weight, aux, *args)), ste
            assert torch.equal(gw, ref_gw), ste
            assert gm.dtype == dtype and gm.shape == aux.shape
            torch.testing.assert_close(gm, ref_gm, **TOLERANCES[dtype], msg=ste)


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0,)], ids=str)
def test_cpp_empty_neuron_gates(shape):
    grad, weight, aux = make_inputs(shape, "neuron")
    out = torch.ops.cvsparse.gated_weight(weight, aux, 2, 0.01, True)
    gw, gm = torch.ops.cvsparse.gated_weight_backward(grad, weight, aux, 2, 0.01, True)
    want_out, want_gw, want_gm = spec_gated(grad, weight, aux, "softplus", 0.01, "proposed")
    torch.testing.assert_close(out.double(), want_out)
    torch.testing.assert_close(gw.double(), want_gw)
    torch.testing.assert_close(gm.double(), want_gm)  # an empty row sums to 0


def test_cpp_handles_nan_and_inf_like_reference():
    weight = torch.tensor([[float("nan"), 1.0], [float("inf"), -2.0]])
    aux = torch.tensor([[-1.0, 1.0], [-1.0, 2.0]])
    grad = torch.ones(2, 2)
    for sign_rule in (True, False):
        args = (0, 0.01, sign_rule)
        torch.testing.assert_close(torch.ops.cvsparse.gated_weight(weight, aux, *args),
                                   reference.gated_weight(weight, aux, *args), equal_nan=True)
        for got, want in zip(torch.ops.cvsparse.gated_weight_backward(grad, weight, aux, *args),
                             reference.gated_weight_backward(grad, weight, aux, *args),
                             strict=True):
            torch.testing.assert_close(got, want, equal_nan=True)


# ---- registration ----------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(granularity, dtype):
    grad, weight, aux = make_inputs((4, 3, 2), granularity, dtype)
    for ste in ops.STE_CODES.values():
        args = (ste, 0.1, ste != 1)
        torch.library.opcheck(
            torch.ops.cvsparse.gated_weight,
            (weight.clone().requires_grad_(), aux.clone().requires_grad_(), *args),
        )
        torch.library.opcheck(torch.ops.cvsparse.gated_weight_backward,
                              (grad, weight, aux, *args))


# ---- argument validation -------------------------------------------------------------------

W = torch.zeros(4, 3)
M = torch.zeros(4, 3)


@pytest.mark.parametrize(
    "weight,aux,kwargs,error,name",
    [
        (W, M, dict(ste="relu"), ValueError, "ste"),
        (W, M, dict(update="sgd"), ValueError, "update"),
        (W, M, dict(slope=-0.5), ValueError, "slope"),
        (W, M, dict(slope=float("inf")), ValueError, "slope"),
        (W, torch.zeros(3), {}, ValueError, "aux"),
        (W, torch.zeros(4, 1), {}, ValueError, "aux"),
        (W, M.to("meta"), {}, ValueError, "aux"),
        (W, M.double(), {}, TypeError, "aux"),
        (W.long(), M.long(), {}, TypeError, "weight"),
        ([[0.0]], M, {}, TypeError, "weight"),
        (W, 0.5, {}, TypeError, "aux"),
    ],
)
def test_bad_arguments_are_named(weight, aux, kwargs, error, name):
    with pytest.raises(error, match=name):
        ops.gated_weight(weight, aux, **kwargs)


def test_compiled_callers_follow_backend_changes(monkeypatch):
    calls = []
    original = reference.gated_weight

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(reference, "gated_weight", counting)
    _, weight, aux = make_inputs((4, 3), "weight")
    compiled = torch.compile(lambda w, m: ops.gated_weight(w, m) * 2, fullgraph=True,
                             backend="eager")
    try:
        ops.set_backend("cpp")
        torch.testing.assert_close(compiled(weight, aux), original(weight, aux, 0, 0.0, True) * 2)
        assert not calls
        ops.set_backend("reference")
        torch.testing.assert_close(compiled(weight, aux), original(weight, aux, 0, 0.0, True) * 2)
        assert calls  # re-traced through the reference implementation
    finally:
        ops.set_backend("auto")
