"""CPU benchmarks of the C++ list operators on the 15 weight tensors of CIFAR VGG-16 (float32).

Every timed call starts from a cold cache (``scrub``, see ``conftest.py``): the weights of a
training step come from memory.  Each operator is timed with pytest-benchmark while its
baselines run interleaved between its rounds (``Paired``); the assertions compare medians of
those paired samples:

* ``prox_sgd_`` (w, g, v read, w, v written: 20 B/element) reaches >= 90% of the bandwidth of the
  in-place streaming roofline ``a.add_(b, alpha=...)`` moving the same number of bytes, is >= 3x
  faster than an eager per-tensor PyTorch loop of the same math, and is no slower than
  ``torch.optim.SGD(fused=True)`` on the same tensors — within a 5% noise margin;
* ``mixed_partial_dot`` (w, v read: 8 B/element) reaches >= 85% of the read roofline
  ``torch.sum`` over the same number of bytes and is no slower than ``torch.compile`` of the
  reference formula (same 5% margin);
* ``threshold_`` (w, v, mask read and written: 18 B/element) reaches >= 85% of the in-place
  streaming roofline;
* ``gated_weight`` (w, m read, the gated weight written: 12 B/element, one call per tensor)
  reaches >= 85% of the bandwidth of ``w * mask`` with the 0/1 mask already computed (the same
  bytes and allocations), and its backward with gate gradients (g, w, m read, both gradients
  written: 20 B/element) >= 85% of that bandwidth; both are no slower than the reference
  formulas.

GB/s (bytes actually moved / median time) and the ratios go to ``benchmark.extra_info``.
"""

from __future__ import annotations

import pytest
import torch

from cvsparse import ops
from cvsparse.ops import reference

# CIFAR VGG-16: 13 3x3 convolutions and 2 linear layers (512 -> 512 -> 10), 14,977,728 weights.
_CONV = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
         (256, 512)] + [(512, 512)] * 5
VGG16_SHAPES = [(cout, cin, 3, 3) for cin, cout in _CONV] + [(512, 512), (10, 512)]

LR, MOMENTUM, TAU = 1e-3, 0.9, 1e-4
ROUNDS = 25
NOISE = 1.05  # timing margin for "no slower than" comparisons on a shared machine
F32 = 4  # bytes


@pytest.fixture(scope="module", autouse=True)
def _cpp_backend():
    ops.set_backend("cpp")
    yield
    ops.set_backend("auto")


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    w = [torch.randn(s) * 0.05 for s in VGG16_SHAPES]
    g = [torch.randn(s) * 1e-3 for s in VGG16_SHAPES]
    v = [torch.randn(s) * 1e-3 for s in VGG16_SHAPES]
    masks = [torch.rand(s) < 0.5 for s in VGG16_SHAPES]
    n = len(VGG16_SHAPES)
    return dict(w=w, g=g, v=v, masks=masks, numel=sum(t.numel() for t in w),
                lambda1=torch.full((n,), 1e-4, dtype=torch.float64),
                lambda2=torch.full((n,), 5e-4, dtype=torch.float64))


def _streaming(nbytes: int):
    """``a.add_(b, alpha)`` moving ``nbytes`` (a, b read, a written: 12 B/element)."""
    a, b = torch.randn(nbytes // (3 * F32)), torch.randn(nbytes // (3 * F32))
    return lambda: a.add_(b, alpha=1e-9)


def _reading(nbytes: int):
    """``torch.sum`` reading ``nbytes``."""
    a = torch.randn(nbytes // F32)
    return lambda: torch.sum(a)


def _prox(s):
    return lambda: ops.prox_sgd_(s["w"], s["g"], s["v"], lr=LR, momentum=MOMENTUM,
                                 lambda1=s["lambda1"], lambda2=s["lambda2"])


def _eager_prox(s):
    """The same update as a per-tensor loop of PyTorch ops (what one writes without the kernel)."""
    l1, l2 = s["lambda1"].tolist(), s["lambda2"].tolist()

    def step():
        counts = []
        for w, g, v, a, b in zip(s["w"], s["g"], s["v"], l1, l2, strict=True):
            v.mul_(MOMENTUM).add_(g.add(w, alpha=b))
            z = w.sub(v, alpha=LR)
            w.copy_(z.sign().mul_(z.abs().sub_(LR * a).clamp_(min=0)))
            counts.append(torch.count_nonzero(w))
        return torch.stack(counts)

    return step


def _fused_sgd(s):
    """torch.optim.SGD(fused=True) on the same weights, gradients and momentum buffers."""
    for w, g in zip(s["w"], s["g"], strict=True):
        w.grad = g
    opt = torch.optim.SGD(s["w"], lr=LR, momentum=MOMENTUM, weight_decay=5e-4, fused=True)
    for w, v in zip(s["w"], s["v"], strict=True):
        opt.state[w]["momentum_buffer"] = v
    return opt.step


def _run(benchmark, make_paired, op, baselines: dict, nbytes: int) -> dict:
    """Benchmarks ``op`` with ``baselines`` interleaved; returns median seconds by name."""
    paired = make_paired(baselines)
    for _ in range(2):  # warm-up (first touches, compilation)
        op()
        for fn in baselines.values():
            fn()
    benchmark.pedantic(op, setup=paired.setup, rounds=ROUNDS)
    times = {"op": benchmark.stats.stats.median} | {k: paired.median(k) for k in baselines}
    benchmark.extra_info["GB/s"] = round(nbytes / times["op"] / 1e9, 2)
    for name, t in times.items():
        benchmark.extra_info[f"median_ms[{name}]"] = round(t * 1e3, 3)
    return times


def _alone(benchmark, scrub, op, nbytes: int, rounds: int = ROUNDS) -> None:
    """Benchmarks ``op`` by itself (cold cache every round) and records its GB/s."""
    op()
    benchmark.pedantic(op, setup=scrub, rounds=rounds)
    benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)


def test_streaming_roofline(benchmark, scrub, state):
    nbytes = 5 * F32 * state["numel"]  # the bytes prox_sgd_ moves
    _alone(benchmark, scrub, _streaming(nbytes), nbytes)


def test_read_roofline(benchmark, scrub, state):
    nbytes = 2 * F32 * state["numel"]  # the bytes mixed_partial_dot reads
    _alone(benchmark, scrub, _reading(nbytes), nbytes)


def test_prox_sgd(benchmark, state, paired):
    nbytes = 5 * F32 * state["numel"]  # w, g, v read; w, v written
    t = _run(benchmark, paired, _prox(state), {"roofline": _streaming(nbytes),
                                       "fused_sgd": _fused_sgd(state),
                                       "eager": _eager_prox(state)}, nbytes)
    roofline = t["roofline"] / t["op"]
    benchmark.extra_info |= {"%roofline": round(100 * roofline, 1),
                             "speedup_vs_eager": round(t["eager"] / t["op"], 2),
                             "speedup_vs_fused_sgd": round(t["fused_sgd"] / t["op"], 3)}
    assert roofline >= 0.90
    assert t["eager"] / t["op"] >= 3
    assert t["op"] <= NOISE * t["fused_sgd"]


def test_prox_sgd_masked(benchmark, state, paired):
    nbytes = (5 * F32 + 1) * state["numel"]  # + the bool mask read
    masks = state["masks"]
    op = lambda: ops.prox_sgd_(state["w"], state["g"], state["v"], lr=LR,  # noqa: E731
                               momentum=MOMENTUM, lambda1=state["lambda1"],
                               lambda2=state["lambda2"], masks=masks)
    t = _run(benchmark, paired, op, {"roofline": _streaming(nbytes)}, nbytes)
    benchmark.extra_info["%roofline"] = round(100 * t["roofline"] / t["op"], 1)
    assert t["roofline"] / t["op"] >= 0.90


def test_prox_sgd_eager_loop(benchmark, scrub, state):
    _alone(benchmark, scrub, _eager_prox(state), 5 * F32 * state["numel"], rounds=5)


def test_fused_sgd(benchmark, scrub, state):
    _alone(benchmark, scrub, _fused_sgd(state), 5 * F32 * state["numel"])


def test_mixed_partial_dot(benchmark, state, paired):
    nbytes = 2 * F32 * state["numel"]  # w, v read
    compiled = torch.compile(reference.mixed_partial_dot)
    t = _run(benchmark, paired, lambda: ops.mixed_partial_dot(state["w"], state["v"]),
             {"roofline": _reading(nbytes),
              "compiled": lambda: compiled(state["w"], state["v"], [])}, nbytes)
    benchmark.extra_info |= {"%roofline": round(100 * t["roofline"] / t["op"], 1),
                             "speedup_vs_compile": round(t["compiled"] / t["op"], 3)}
    assert t["roofline"] / t["op"] >= 0.85
    assert t["op"] <= NOISE * t["compiled"]


def test_threshold(benchmark, state, paired):
    nbytes = 2 * (2 * F32 + 1) * state["numel"]  # w, v, mask read and written
    t = _run(benchmark, paired, lambda: ops.threshold_(state["w"], state["v"], state["masks"], TAU),
             {"roofline": _streaming(nbytes)}, nbytes)
    benchmark.extra_info["%roofline"] = round(100 * t["roofline"] / t["op"], 1)
    assert t["roofline"] / t["op"] >= 0.85


def _masked_products(w: list, masks: list):
    """``w * mask`` per tensor, the 0/1 mask given: the gated weight's least traffic."""
    return lambda: [a * m for a, m in zip(w, masks, strict=True)]


def test_gated_weight(benchmark, state, paired):
    nbytes = 3 * F32 * state["numel"]  # w, aux read; the gated weight written
    w, aux = state["w"], state["v"]
    masks = [(m > 0).float() for m in aux]
    op = lambda: [torch.ops.cvsparse.gated_weight(a, m, 0, 0.0, True)  # noqa: E731
                  for a, m in zip(w, aux, strict=True)]
    ref = lambda: [reference.gated_weight(a, m, 0, 0.0, True)  # noqa: E731
                   for a, m in zip(w, aux, strict=True)]
    t = _run(benchmark, paired, op, {"roofline": _masked_products(w, masks), "reference": ref},
             nbytes)
    benchmark.extra_info |= {"%roofline": round(100 * t["roofline"] / t["op"], 1),
                             "speedup_vs_reference": round(t["reference"] / t["op"], 2)}
    assert t["roofline"] / t["op"] >= 0.85
    assert t["op"] <= NOISE * t["reference"]


def test_gated_weight_backward(benchmark, state, paired):
    nbytes = 5 * F32 * state["numel"]  # grad, w, aux read; both gradients written
    g, w, aux = state["g"], state["w"], state["v"]
    masks = [(m > 0).float() for m in aux]
    op = lambda: [torch.ops.cvsparse.gated_weight_backward(d, a, m, 0, 0.0, True)  # noqa: E731
                  for d, a, m in zip(g, w, aux, strict=True)]
    ref = lambda: [reference.gated_weight_backward(d, a, m, 0, 0.0, True)  # noqa: E731
                   for d, a, m in zip(g, w, aux, strict=True)]
    t = _run(benchmark, paired, op, {"products": _masked_products(w, masks), "reference": ref},
             nbytes)
    # bandwidth against the masked products' (12 B/element)
    roofline = (nbytes / t["op"]) / (3 * F32 * state["numel"] / t["products"])
    benchmark.extra_info |= {"%roofline": round(100 * roofline, 1),
                             "speedup_vs_reference": round(t["reference"] / t["op"], 2)}
    assert roofline >= 0.85
    assert t["op"] <= NOISE * t["reference"]
