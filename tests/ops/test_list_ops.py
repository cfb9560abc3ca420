"""The list operators (prox_sgd_, mixed_partial_dot, threshold_, max_abs) of every backend
against the oracle ``cvsparse.ops.reference``, through the public API ``cvsparse.ops``.

One suite, parametrized over the backends ``cpp`` (C++ CPU kernels), ``triton`` (Triton kernels;
on CPU tensors in Triton's interpreter, so only small sizes) and ``cuda`` (needs a GPU).  Also:
equivalence of ``prox_sgd_`` with ``torch.optim.SGD``, and argument validation — a rejected call
raises an error naming the argument and leaves every tensor untouched.
"""

from __future__ import annotations

import math

import pytest
import torch

from cvsparse import ops
from cvsparse.ops import reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
# Results are compared to the reference with these tolerances (stored values carry one rounding
# of the dtype; the math is float32 for float16/bfloat16): one ulp of the stored dtype for
# float16 / bfloat16 (eps 9.8e-4, 7.8e-3); for float32 / float64, the chained operations
# (d, v, z, shrink) on O(1) inputs each add an error of about eps·(|w| + lr·|v|), a few eps in
# all (eps 1.2e-7, 2.2e-16), within atol even where w − lr·v cancels.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
}
# Relative width, in the math type, of the band around the shrink threshold lr·λ1 where two
# correct implementations may round an element to different sides.
BAND = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# |sum error| / Σ|terms| allowed for mixed_partial_dot (float32 result except for float64).
SUM_RTOL = {torch.float32: 1e-6, torch.float64: 1e-13, torch.float16: 1e-6, torch.bfloat16: 1e-6}

# Several tensors of different shapes (and sizes 0, 1, 7, 4097) in one call.
SHAPES = [(0,), (1,), (7,), (4097,), (3, 5, 2, 2), (0, 4), (33, 17)]
BIG = 1 << 20
# The Triton interpreter is slow: at most 64K elements per tensor.
TRITON_MAX = 1 << 16

LR, MOMENTUM = 0.1, 0.9


@pytest.fixture(params=["cpp", "triton", pytest.param("cuda", marks=pytest.mark.cuda)])
def backend(request):
    """Selects a backend for the test (restoring ``auto`` after), yields its name.  The
    ``cuda`` cases are deselected without a GPU (tests/conftest.py)."""
    name = request.param
    ops.set_backend(name)
    yield name
    ops.set_backend("auto")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _device(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" else "cpu")


def _big(backend: str) -> int:
    return TRITON_MAX if backend == "triton" else BIG


def _randn(shapes, dtype, device, scale=1.0):
    return [(torch.randn(s, dtype=torch.float64) * scale).to(dtype).to(device) for s in shapes]


def _masks(shapes, device, p_keep=0.7):
    return [(torch.rand(s) < p_keep).to(device) for s in shapes]


def _clone(tensors):
    return [t.clone() for t in tensors]


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)


# ---- prox_sgd_ -------------------------------------------------------------------------------

def _prox_case(shapes, dtype, device, bufs, masks, per_tensor):
    n = len(shapes)
    case = dict(
        params=_randn(shapes, dtype, device),
        grads=_randn(shapes, dtype, device),
        bufs=_randn(shapes, dtype, device, scale=0.5) if bufs else None,
        masks=_masks(shapes, device) if masks else None,
    )
    if per_tensor:
        case["lambda1"] = torch.rand(n, dtype=torch.float64) * 4
        case["lambda2"] = torch.rand(n, dtype=torch.float64) * 0.5
    else:
        case["lambda1"], case["lambda2"] = 2.0, 0.3
    return case


def _near_threshold(case, dtype):
    """Per tensor: elements whose |z| lies within the rounding band of lr·λ1 (float64 math)."""
    n = len(case["params"])
    l1 = torch.as_tensor(case["lambda1"], dtype=torch.float64).expand(n)
    l2 = torch.as_tensor(case["lambda2"], dtype=torch.float64).expand(n)
    out = []
    for i, w in enumerate(case["params"]):
        w = w.double().cpu()
        v = w * l2[i] + case["grads"][i].double().cpu()
        if case["bufs"] is not None:
            v = v + MOMENTUM * case["bufs"][i].double().cpu()
        z = w - LR * v
        shrink = LR * float(l1[i])
        out.append((z.abs() - shrink).abs() <= BAND[dtype] * (shrink + z.abs() + w.abs() + 1))
    return out


def _run_prox(case, use_reference):
    """Runs prox_sgd_ on copies of the case's state; returns (params, bufs, counts)."""
    params = _clone(case["params"])
    bufs = _clone(case["bufs"]) if case["bufs"] is not None else None
    momentum = MOMENTUM if bufs is not None else 0.0
    if use_reference:
        n = len(params)
        device = params[0].device if params else torch.device("cpu")
        l1 = torch.as_tensor(case["lambda1"], dtype=torch.float64).expand(n).to(device)
        l2 = torch.as_tensor(case["lambda2"], dtype=torch.float64).expand(n).to(device)
        counts = reference.prox_sgd_(params, case["grads"], bufs or [], case["masks"] or [],
                                     l1.contiguous(), l2.contiguous(), LR, momentum)
    else:
        counts = ops.prox_sgd_(params, case["grads"], bufs, lr=LR, momentum=momentum,
                               lambda1=case["lambda1"], lambda2=case["lambda2"],
                               masks=case["masks"])
    return params, bufs or [], counts


def _check_prox(case, dtype):
    got_w, got_v, got_n = _run_prox(case, use_reference=False)
    want_w, want_v, want_n = _run_prox(case, use_reference=True)
    near = _near_threshold(case, dtype)
    assert got_n.dtype == torch.int64 and got_n.shape == (len(got_w),)
    assert got_n.device == (got_w[0].device if got_w else got_n.device)
    # Counts are exact: the nonzeros of the tensors as stored.
    assert got_n.tolist() == [int(torch.count_nonzero(w)) for w in got_w]
    for g, w, amb in zip(got_w, want_w, near, strict=True):
        torch.testing.assert_close(g, w, **TOL[dtype])
        # Same zero pattern, away from the rounding band around the threshold.
        assert torch.equal((g != 0).cpu() | amb, (w != 0).cpu() | amb)
    for g, w in zip(got_v, want_v, strict=True):
        torch.testing.assert_close(g, w, **TOL[dtype])
    slack = [int(a.sum()) for a in near]
    for got, want, s in zip(got_n.tolist(), want_n.tolist(), slack, strict=True):
        assert abs(got - want) <= s
    if case["masks"] is not None:
        for w, v, m in zip(got_w, got_v or got_w, case["masks"], strict=True):
            assert not w[~m].any() and not v[~m].any()


@DTYPE
@pytest.mark.parametrize("bufs", [True, False], ids=["bufs", "no_bufs"])
@pytest.mark.parametrize("masks", [True, False], ids=["masks", "no_masks"])
@pytest.mark.parametrize("per_tensor", [True, False], ids=["lambda_per_tensor", "lambda_scalar"])
def test_prox_sgd_matches_reference(backend, dtype, bufs, masks, per_tensor):
    case = _prox_case(SHAPES, dtype, _device(backend), bufs, masks, per_tensor)
    _check_prox(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_prox_sgd_large_and_many_tensors(backend, dtype):
    # One big tensor among many small ones: the big one spans many parallel chunks.
    shapes = [(i % 7 + 1, 3) for i in range(60)] + [(_big(backend),)] + [(5,)]
    case = _prox_case(shapes, dtype, _device(backend), bufs=True, masks=True, per_tensor=True)
    _check_prox(case, dtype)


def test_prox_sgd_empty_list(backend):
    counts = ops.prox_sgd_([], [], [], lr=LR, momentum=MOMENTUM, lambda1=1.0, lambda2=0.0)
    assert counts.shape == (0,) and counts.dtype == torch.int64


def _sgd_equivalence(backend, weight_decay):
    device = _device(backend)
    shapes = [(16, 3, 3, 3), (10, 16), (10,)]
    ours = _randn(shapes, torch.float32, device)
    theirs = [p.clone().requires_grad_() for p in ours]
    bufs = [torch.zeros_like(p) for p in ours]
    sgd = torch.optim.SGD(theirs, lr=0.05, momentum=MOMENTUM, weight_decay=weight_decay)
    for _ in range(20):
        grads = _randn(shapes, torch.float32, device)
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g.clone()
        sgd.step()
        ops.prox_sgd_(ours, grads, bufs, lr=0.05, momentum=MOMENTUM, lambda1=0.0,
                      lambda2=weight_decay)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)


def test_prox_sgd_without_regularization_is_sgd_with_momentum(backend):
    _sgd_equivalence(backend, weight_decay=0.0)


def test_prox_sgd_with_l2_only_is_sgd_with_weight_decay(backend):
    _sgd_equivalence(backend, weight_decay=0.01)


# ---- mixed_partial_dot -----------------------------------------------------------------------

def _check_dot(params, vectors, precond, dtype):
    got = ops.mixed_partial_dot(params, vectors, precond)
    want = reference.mixed_partial_dot(params, vectors, precond or [])
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == out_dtype and got.shape == (len(params), 2)
    # Error relative to the magnitudes summed (the sums may cancel).
    scale = []
    for i, (w, v) in enumerate(zip(params, vectors, strict=True)):
        q = (v.double() * (precond[i].double() if precond else 1)).cpu()
        w = w.double().cpu()
        scale.append([float((q * w.sign()).abs().sum()), float((q * w).abs().sum())])
    scale = torch.tensor(scale, dtype=torch.float64).reshape(-1, 2)
    error = (got.double().cpu() - want.double().cpu()).abs()
    bound = SUM_RTOL[dtype] * scale + 2 * torch.finfo(out_dtype).eps * want.double().cpu().abs()
    assert bool((error <= bound).all()), f"error {error.tolist()} > bound {bound.tolist()}"


@DTYPE
@pytest.mark.parametrize("precond", [True, False], ids=["precond", "no_precond"])
def test_mixed_partial_dot_matches_reference(backend, dtype, precond):
    device = _device(backend)
    params = _randn(SHAPES, dtype, device)
    for p in params:
        p[torch.rand(p.shape, device=device) < 0.3] = 0  # sign(0) = 0 must count as zero
    vectors = _randn(SHAPES, dtype, device)
    pre = [t.abs() for t in _randn(SHAPES, dtype, device)] if precond else None
    _check_dot(params, vectors, pre, dtype)


def test_mixed_partial_dot_large_float32_is_accurate(backend):
    # 1M float32 terms of one sign: a naive float32 running sum would be off by ~1e-4.
    device = _device(backend)
    n = _big(backend)
    params = [torch.rand(n, device=device) + 0.5, torch.randn(3, device=device)]
    vectors = [torch.rand(n, device=device), torch.randn(3, device=device)]
    _check_dot(params, vectors, None, torch.float32)


def test_mixed_partial_dot_empty_list(backend):
    out = ops.mixed_partial_dot([], [])
    assert out.shape == (0, 2)


# ---- threshold_ ------------------------------------------------------------------------------

@DTYPE
@pytest.mark.parametrize("bufs", [True, False], ids=["bufs", "no_bufs"])
@pytest.mark.parametrize("size", ["small", "big"])
def test_threshold_matches_reference(backend, dtype, bufs, size):
    device = _device(backend)
    shapes = SHAPES if size == "small" else [(_big(backend),), (3,)]
    params = _randn(shapes, dtype, device)
    buffers = _randn(shapes, dtype, device) if bufs else None
    masks = _masks(shapes, device)
    want = [_clone(params), _clone(buffers) if bufs else [], _clone(masks)]
    tau = 0.7
    kept = ops.threshold_(params, buffers, masks, tau)
    want_kept = reference.threshold_(*want, tau)
    assert kept.dtype == torch.int64 and kept.tolist() == want_kept.tolist()
    assert kept.tolist() == [int(m.sum()) for m in masks]
    _assert_same(params + (buffers or []) + masks, want[0] + want[1] + want[2])


def test_threshold_empty_list(backend):
    kept = ops.threshold_([], None, [], 0.5)
    assert kept.shape == (0,) and kept.dtype == torch.int64


# ---- max_abs ---------------------------------------------------------------------------------

def _max_abs_oracle(tensors, out_dtype):
    """Largest |x| per tensor from Python floats (NaN if any NaN), in the result dtype."""
    values = []
    for t in tensors:
        xs = [abs(x) for x in t.double().cpu().flatten().tolist()]
        values.append(math.nan if any(math.isnan(x) for x in xs) else max(xs, default=0.0))
    return torch.tensor(values, dtype=out_dtype)


@DTYPE
def test_max_abs_matches_oracle(backend, dtype):
    device = _device(backend)
    shapes = SHAPES + [(_big(backend) + 5,)]
    tensors = _randn(shapes, dtype, device, scale=3.0)
    tensors[-1][-1] = -1e3  # the largest entry, negative, in the partial tail of a long tensor
    out = ops.max_abs(tensors)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == out_dtype and out.device == device
    assert torch.equal(out.cpu(), _max_abs_oracle(tensors, out_dtype))  # |x| and max are exact
    assert torch.equal(out.cpu(), reference.max_abs(tensors).cpu())


@DTYPE
def test_max_abs_reports_nan_and_inf_per_tensor(backend, dtype):
    device = _device(backend)
    tensors = _randn([(_big(backend) + 3,), (33, 17), (7,), (4097,), (5,)], dtype, device)
    tensors[0][_big(backend) + 1] = math.nan     # NaN past the last whole vector
    tensors[1][20, 3] = -math.inf
    tensors[3][100] = math.inf
    tensors[3][4000] = math.nan                  # NaN wins over an earlier inf
    got = ops.max_abs(tensors).cpu()
    assert math.isnan(got[0]) and got[1] == math.inf and math.isnan(got[3])
    assert got[2] == _max_abs_oracle([tensors[2]], got.dtype)[0]
    assert got[4] == _max_abs_oracle([tensors[4]], got.dtype)[0]


def test_max_abs_empty_list(backend):
    out = ops.max_abs([])
    assert out.shape == (0,)


# ---- argument validation: clear errors, nothing modified -------------------------------------

def _state(device="cpu", dtype=torch.float32):
    shapes = [(4, 3), (5,)]
    return dict(params=_randn(shapes, dtype, device), grads=_randn(shapes, dtype, device),
                bufs=_randn(shapes, dtype, device), masks=_masks(shapes, device))


def _prox_call(s, **override):
    kwargs = dict(lr=LR, momentum=MOMENTUM, lambda1=0.5, lambda2=0.1, masks=s["masks"])
    kwargs.update(override)
    return lambda: ops.prox_sgd_(s["params"], s["grads"], s["bufs"], **kwargs)


def _dot_call(s):
    return lambda: ops.mixed_partial_dot(s["params"], s["grads"], s["bufs"])


def _threshold_call(s, tau=0.5):
    return lambda: ops.threshold_(s["params"], s["bufs"], s["masks"], tau)


def _replace(s, key, index, tensor):
    s = dict(s)
    s[key] = list(s[key])
    s[key][index] = tensor
    return s


def _bad_cases():
    """(id, build(state) -> (call, tensors to watch), error type, text the message must name)."""
    cases = [
        ("length", lambda s: _prox_call(dict(s, grads=s["grads"][:1])), ValueError, "grads"),
        ("shape", lambda s: _prox_call(_replace(s, "grads", 1, torch.zeros(4))),
         ValueError, "grads[1]"),
        ("device", lambda s: _prox_call(_replace(s, "grads", 0, torch.zeros(4, 3, device="meta"))),
         ValueError, "grads[0]"),
        ("dtype", lambda s: _prox_call(_replace(s, "bufs", 1, torch.zeros(5, dtype=torch.float64))),
         TypeError, "momentum_bufs[1]"),
        ("params_dtype", lambda s: _prox_call(
            _replace(s, "params", 1, torch.zeros(5, dtype=torch.float16))), TypeError, "params[1]"),
        ("lr", lambda s: _prox_call(s, lr=-0.1), ValueError, "lr"),
        ("momentum", lambda s: _prox_call(s, momentum=-0.5), ValueError, "momentum"),
        ("lambda1_float", lambda s: _prox_call(s, lambda1=-1.0), ValueError, "lambda1"),
        ("lambda1_tensor", lambda s: _prox_call(
            s, lambda1=torch.tensor([0.1, -0.1], dtype=torch.float64)), ValueError, "lambda1"),
        ("lambda2_nan", lambda s: _prox_call(s, lambda2=math.nan), ValueError, "lambda2"),
        ("lambda2_nan_tensor", lambda s: _prox_call(s, lambda2=torch.tensor([0.1, math.nan])),
         ValueError, "lambda2"),
        ("lambda_length", lambda s: _prox_call(s, lambda1=torch.ones(3)), ValueError, "lambda1"),
        ("mask_dtype", lambda s: _prox_call(_replace(s, "masks", 0, torch.ones(4, 3))),
         TypeError, "masks[0]"),
        ("alias_bufs", lambda s: _prox_call(_replace(s, "bufs", 0, s["params"][0])),
         ValueError, "momentum_bufs[0]"),
        ("alias_params", lambda s: _prox_call(
            _replace(s, "params", 1, s["params"][0].view(-1)[:5])), ValueError, "params[1]"),
        ("noncontiguous", lambda s: _prox_call(
            _replace(s, "grads", 0, torch.zeros(3, 4).t())), ValueError, "grads[0]"),
        ("noncontiguous_params", lambda s: _prox_call(
            _replace(s, "params", 0, torch.zeros(3, 4).t())), ValueError, "params[0]"),
        ("dot_shape", lambda s: _dot_call(_replace(s, "grads", 1, torch.zeros(6))),
         ValueError, "vectors[1]"),
        ("dot_device", lambda s: _dot_call(
            _replace(s, "bufs", 0, torch.zeros(4, 3, device="meta"))), ValueError, "precond[0]"),
        ("dot_noncontiguous", lambda s: _dot_call(
            _replace(s, "grads", 0, torch.zeros(3, 4).t())), ValueError, "vectors[0]"),
        ("tau", lambda s: _threshold_call(s, tau=-0.1), ValueError, "tau"),
        ("tau_nan", lambda s: _threshold_call(s, tau=math.nan), ValueError, "tau"),
        ("threshold_mask_dtype", lambda s: _threshold_call(
            _replace(s, "masks", 1, torch.ones(5, dtype=torch.uint8))), TypeError, "masks[1]"),
        ("threshold_alias", lambda s: _threshold_call(_replace(s, "bufs", 1, s["params"][1])),
         ValueError, "momentum_bufs[1]"),
        ("threshold_masks_length", lambda s: _threshold_call(dict(s, masks=s["masks"][:1])),
         ValueError, "masks"),
    ]
    return [pytest.param(build, err, text, id=name) for name, build, err, text in cases]


@pytest.mark.parametrize("build,error,text", _bad_cases())
def test_bad_input_is_rejected_and_changes_nothing(backend, build, error, text):
    state = _state(_device(backend))
    call = build(state)
    watched = [t for key in ("params", "grads", "bufs", "masks") for t in state[key]]
    before = _clone(watched)
    with pytest.raises(error) as info:
        call()
    assert text in str(info.value)
    _assert_same(watched, before)


def test_cpp_mixed_partial_dot_is_bitwise_reproducible():
    # The C++ kernel sums fixed-size chunks of each tensor in a fixed order: the result depends
    # neither on the thread count nor on the other tensors of the list.
    shapes = [(3 * BIG + 5,), (7,), (BIG // 3,)]
    params, vectors = _randn(shapes, torch.float32, "cpu"), _randn(shapes, torch.float32, "cpu")
    ops.set_backend("cpp")
    threads = torch.get_num_threads()
    try:
        out = ops.mixed_partial_dot(params, vectors)
        torch.set_num_threads(1)
        assert torch.equal(ops.mixed_partial_dot(params, vectors), out)
        torch.set_num_threads(threads)
        for i in range(len(shapes)):
            assert torch.equal(ops.mixed_partial_dot(params[i:i + 1], vectors[i:i + 1])[0], out[i])
    finally:
        torch.set_num_threads(threads)
        ops.set_backend("auto")
