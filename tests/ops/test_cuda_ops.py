"""The CUDA kernels (``csrc/cuda``) against the reference operators, on CUDA tensors.

The kernels are called through ``torch.ops.cvsparse`` with normalized arguments, so these tests
see exactly what the CUDA code does.  Inputs cover every dtype, zero-size tensors, tensors
spanning several chunks, lists long enough to take several launches, and tensors whose storage
is offset by one element (the scalar, unaligned path).
"""

from __future__ import annotations

import math

import pytest
import torch

from cvsparse import ops  # noqa: F401  (loads the compiled library)
from cvsparse.ops import reference
from cvsparse.ops._library import has_kernel
from cvsparse.ops.schemas import SCHEMAS, STE_CODES

pytestmark = pytest.mark.cuda  # deselected without a GPU (tests/conftest.py)

OPS = torch.ops.cvsparse
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CHUNK = 65536  # kChunkSize of csrc/cuda/multi_tensor.cuh
MAX_BLOCKS = 320  # kMaxBlocksPerLaunch
# Small, zero-size, odd, whole-vector and multi-chunk sizes (the last one ends mid-vector).
SHAPES = [(3, 5), (0,), (1,), (4, 3, 3, 3), (0, 4), (2 * CHUNK + 3,)]
# Enough tensors for several launches, the last one cut between two launches.
MANY_SHAPES = [(i % 5 + 1, 13) for i in range(100)] + [(MAX_BLOCKS * CHUNK + 5,)]
# Relative tolerance of a sum accumulated in opmath and stored in the dtype.
SUM_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3,
            torch.bfloat16: 1.6e-2}
OFFSETS = pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])


def _place(values: torch.Tensor, offset: int) -> torch.Tensor:
    """``values`` copied to the GPU into a fresh storage, starting ``offset`` elements in."""
    storage = torch.empty(values.numel() + offset, dtype=values.dtype, device="cuda")
    out = storage[offset:].view(values.shape)
    out.copy_(values)
    return out


def _randn(shapes, dtype, offset, gen, scale=1.0):
    return [_place((torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype), offset)
            for s in shapes]


def _masks(shapes, offset, gen):
    return [_place(torch.rand(s, generator=gen) < 0.7, offset) for s in shapes]


def _clone(tensors):
    return [t.clone() for t in tensors]


def _assert_sum_close(actual, expected, scale, rtol):
    """|actual − expected| ≤ rtol·scale elementwise, ``scale`` bounding the magnitudes summed."""
    error = (actual.double() - expected.double()).abs()
    bound = rtol * scale
    assert bool((error <= bound).all()), f"max error {error.max()} (bound {bound.min()}..)"


def test_every_operator_has_a_cuda_kernel():
    assert [op for op in SCHEMAS if not has_kernel(op, "CUDA")] == []


# ---- prox_sgd_ -----------------------------------------------------------------------------

def _check_prox_sgd(shapes, dtype, offset, with_bufs, with_masks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = _randn(shapes, dtype, offset, gen)
    grads = _randn(shapes, dtype, offset, gen)
    bufs = _randn(shapes, dtype, offset, gen, scale=0.1) if with_bufs else []
    masks = _masks(shapes, offset, gen) if with_masks else []
    n = len(shapes)
    lambda1 = (torch.rand(n, generator=gen, dtype=torch.float64) * 2).cuda()
    lambda2 = (torch.rand(n, generator=gen, dtype=torch.float64) * 0.1).cuda()
    ref_params, ref_bufs = _clone(params), _clone(bufs)
    lr = 0.1
    momentum = 0.9 if with_bufs else 0.0

    counts = OPS.prox_sgd_(params, grads, bufs, masks, lambda1, lambda2, lr, momentum)
    ref_counts = reference.prox_sgd_(ref_params, grads, ref_bufs, masks, lambda1, lambda2, lr,
                                     momentum)

    assert counts.dtype == torch.int64 and counts.device == params[0].device
    for p, ref in zip(params + bufs, ref_params + ref_bufs, strict=True):
        torch.testing.assert_close(p, ref)
    assert counts.tolist() == [int(torch.count_nonzero(p)) for p in params]
    assert counts.tolist() == ref_counts.tolist()
    for p, m in zip(params if masks else [], masks, strict=True):
        assert not p[~m].any()


@pytest.mark.parametrize("dtype", DTYPES)
@OFFSETS
@pytest.mark.parametrize("with_bufs", [True, False], ids=["bufs", "no_bufs"])
@pytest.mark.parametrize("with_masks", [True, False], ids=["masks", "no_masks"])
def test_prox_sgd_matches_reference(dtype, offset, with_bufs, with_masks):
    _check_prox_sgd(SHAPES, dtype, offset, with_bufs, with_masks)


def test_prox_sgd_long_list_matches_reference():
    _check_prox_sgd(MANY_SHAPES, torch.float32, 0, with_bufs=True, with_masks=True, seed=1)


def test_prox_sgd_empty_list_returns_empty_counts():
    lam = torch.zeros(0, dtype=torch.float64, device="cuda")
    counts = OPS.prox_sgd_([], [], [], [], lam, lam, 0.1, 0.0)
    assert counts.shape == (0,) and counts.dtype == torch.int64 and counts.is_cuda


def test_prox_sgd_rejects_bad_input_without_writing():
    gen = torch.Generator().manual_seed(2)
    params = _randn(SHAPES, torch.float32, 0, gen)
    before = _clone(params)
    lam = torch.zeros(len(SHAPES), dtype=torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match="grads"):
        OPS.prox_sgd_(params, params[:-1], [], [], lam, lam, 0.1, 0.0)
    with pytest.raises(RuntimeError, match="lambda1"):
        OPS.prox_sgd_(params, _clone(params), [], [], lam[:-1], lam, 0.1, 0.0)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)


# ---- mixed_partial_dot ---------------------------------------------------------------------

def _check_mixed_partial_dot(shapes, dtype, offset, with_precond, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = _randn(shapes, dtype, offset, gen)
    for p in params:  # the free set: some exact zeros
        p.masked_fill_(p.abs() < 0.3, 0)
    vectors = _randn(shapes, dtype, offset, gen)
    precond = ([_place(c.abs(), offset) for c in _randn(shapes, dtype, 0, gen)]
               if with_precond else [])

    out = OPS.mixed_partial_dot(params, vectors, precond)
    ref = reference.mixed_partial_dot(params, vectors, precond)

    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (len(shapes), 2) and out.is_cuda
    # Rounding error of a sum is relative to the sum of its terms' magnitudes, per row
    # Σ |c·v|·max(1, |w|) (exactly 0 for an empty tensor).
    scale = torch.stack([
        ((v.double() * (c.double() if with_precond else 1)).abs()
         * p.double().abs().clamp(min=1)).sum()
        for p, v, c in zip(params, vectors, precond or params, strict=True)
    ])[:, None]
    rtol = SUM_RTOL[torch.float64 if dtype == torch.float64 else torch.float32]
    _assert_sum_close(out, ref, scale, rtol)
    return params, vectors, precond, out


@pytest.mark.parametrize("dtype", DTYPES)
@OFFSETS
@pytest.mark.parametrize("with_precond", [True, False], ids=["precond", "no_precond"])
def test_mixed_partial_dot_matches_reference(dtype, offset, with_precond):
    _check_mixed_partial_dot(SHAPES, dtype, offset, with_precond)


def test_mixed_partial_dot_long_list_matches_reference():
    _check_mixed_partial_dot(MANY_SHAPES, torch.float32, 0, with_precond=True, seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_partial_dot_is_bitwise_reproducible(dtype):
    params, vectors, precond, out = _check_mixed_partial_dot(SHAPES, dtype, 0, True, seed=3)
    # The same call again, the same data at unaligned addresses (the scalar path), and each
    # tensor alone: the summation order never changes.
    assert torch.equal(OPS.mixed_partial_dot(params, vectors, precond), out)
    moved = [[_place(t, 1) for t in ts] for ts in (params, vectors, precond)]
    assert torch.equal(OPS.mixed_partial_dot(*moved), out)
    for i in range(len(params)):
        alone = OPS.mixed_partial_dot(params[i:i + 1], vectors[i:i + 1], precond[i:i + 1])
        assert torch.equal(alone[0], out[i])


# ---- threshold_ ----------------------------------------------------------------------------

def _check_threshold(shapes, dtype, offset, with_bufs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = _randn(shapes, dtype, offset, gen)
    bufs = _randn(shapes, dtype, offset, gen) if with_bufs else []
    masks = _masks(shapes, offset, gen)
    ref = [_clone(params), _clone(bufs), _clone(masks)]
    tau = 0.5

    kept = OPS.threshold_(params, bufs, masks, tau)
    ref_kept = reference.threshold_(*ref, tau)

    assert kept.dtype == torch.int64 and kept.is_cuda
    assert kept.tolist() == ref_kept.tolist()
    for t, r in zip(params + bufs + masks, ref[0] + ref[1] + ref[2], strict=True):
        assert torch.equal(t, r)


@pytest.mark.parametrize("dtype", DTYPES)
@OFFSETS
@pytest.mark.parametrize("with_bufs", [True, False], ids=["bufs", "no_bufs"])
def test_threshold_matches_reference(dtype, offset, with_bufs):
    _check_threshold(SHAPES, dtype, offset, with_bufs)


def test_threshold_long_list_matches_reference():
    _check_threshold(MANY_SHAPES, torch.float32, 0, with_bufs=True, seed=1)


def test_threshold_compares_in_the_params_precision():
    # τ just above a float32 value rounds onto it: the reference (float32) keeps the weight.
    w = torch.tensor([0.1, -0.1, 0.05], dtype=torch.float32, device="cuda")
    tau = float(w[0].double()) + 1e-12
    masks = [torch.ones(3, dtype=torch.bool, device="cuda")]
    ref_masks = _clone(masks)
    kept = OPS.threshold_([w.clone()], [], masks, tau)
    assert kept.tolist() == [2]
    assert kept.tolist() == reference.threshold_([w.clone()], [], ref_masks, tau).tolist()
    assert torch.equal(masks[0], ref_masks[0])


def test_threshold_without_masks_equals_all_true_masks():
    gen = torch.Generator().manual_seed(4)
    params = _randn(SHAPES, torch.float32, 0, gen)
    ref_params = _clone(params)
    kept = OPS.threshold_(params, [], [], 0.5)
    ones = [torch.ones_like(p, dtype=torch.bool) for p in params]
    assert kept.tolist() == reference.threshold_(ref_params, [], ones, 0.5).tolist()
    for p, r in zip(params, ref_params, strict=True):
        assert torch.equal(p, r)


# ---- gated_weight / gated_weight_backward ----------------------------------------------------

GATED_SHAPES = [(6, 3, 3, 3), (5, 7), (9,), (0, 3), (4, 0), (3, 2 * CHUNK + 1)]


def _gated_inputs(shape, granularity, dtype, offset, gen):
    weight = _randn([shape], dtype, offset, gen)[0]
    aux_shape = shape if granularity == "weight" else shape[:1]
    aux = _randn([aux_shape], dtype, offset, gen)[0]
    aux.view(-1)[::3] = 0  # the gate's edge: m = 0 is off
    grad = _randn([shape], dtype, offset, gen)[0]
    return grad, weight, aux


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize("shape", GATED_SHAPES, ids=str)
@OFFSETS
def test_gated_weight_forward_matches_reference(dtype, granularity, shape, offset):
    gen = torch.Generator().manual_seed(5)
    _, weight, aux = _gated_inputs(shape, granularity, dtype, offset, gen)
    out = OPS.gated_weight(weight, aux, 0, 0.01, True)
    assert out.dtype == dtype and out.shape == weight.shape
    assert torch.equal(out, reference.gated_weight(weight, aux, 0, 0.01, True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize("shape", GATED_SHAPES, ids=str)
@pytest.mark.parametrize("ste", sorted(STE_CODES))
@pytest.mark.parametrize("sign_rule", [True, False], ids=["proposed", "bnn"])
@OFFSETS
def test_gated_weight_backward_matches_reference(dtype, granularity, shape, ste, sign_rule,
                                                 offset):
    gen = torch.Generator().manual_seed(6)
    grad, weight, aux = _gated_inputs(shape, granularity, dtype, offset, gen)
    args = (STE_CODES[ste], 0.2, sign_rule)
    grad_weight, grad_aux = OPS.gated_weight_backward(grad, weight, aux, *args)
    ref_weight, ref_aux = reference.gated_weight_backward(grad, weight, aux, *args)
    assert grad_weight.dtype == dtype and grad_aux.dtype == dtype
    assert grad_aux.shape == aux.shape
    assert torch.equal(grad_weight, ref_weight)
    # |∂m| terms are bounded by |g|·max(1, |w|) (s' ≤ 1 here), summed over a row for neurons.
    scale = grad.double().abs() * weight.double().abs().clamp(min=1)
    if aux.shape != weight.shape:
        scale = scale.reshape(aux.shape[0], math.prod(shape[1:])).sum(dim=1)
    _assert_sum_close(grad_aux, ref_aux, scale, SUM_RTOL[dtype])


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_gated_weight_autograd_uses_the_cuda_backward(granularity):
    gen = torch.Generator().manual_seed(7)
    grad, weight, aux = _gated_inputs((8, 4, 3, 3), granularity, torch.float32, 0, gen)
    w, m = weight.clone().requires_grad_(), aux.clone().requires_grad_()
    OPS.gated_weight(w, m, STE_CODES["softplus"], 0.01, True).backward(grad)
    ref_weight, ref_aux = reference.gated_weight_backward(grad, weight, aux,
                                                          STE_CODES["softplus"], 0.01, True)
    torch.testing.assert_close(w.grad, ref_weight)
    torch.testing.assert_close(m.grad, ref_aux, rtol=1e-5, atol=1e-4)


def test_gated_weight_backward_rejects_unknown_ste():
    weight = torch.ones(2, 3, device="cuda")
    with pytest.raises(RuntimeError, match="straight-through"):
        OPS.gated_weight_backward(weight, weight, weight, 7, 0.01, True)
