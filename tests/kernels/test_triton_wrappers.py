"""The ``torch.ops.cvsparse_triton`` operators beyond the shared backend suite
(``tests/ops/test_list_ops.py``): registration (``opcheck``), fakes under ``torch.compile``,
``gated_weight`` autograd, launches spanning many blocks, the invariant checks of the raw
operators, and that every kernel compiles for a GPU.  The oracle is ``cvsparse.ops.reference``.
"""

import importlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from triton_compile import compiled_for_gpu

from cvsparse.ops import reference
from cvsparse.ops._backend import triton_ops
from cvsparse.ops.schemas import STE_CODES

ops = triton_ops()  # imports cvsparse.kernels, which registers torch.ops.cvsparse_triton
_launch = importlib.import_module("cvsparse.kernels._launch")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Both sides compute in float32 (float64 for float64) and round once to the dtype, in different
# orders (fused multiply-adds, blocked reductions): float16 / bfloat16 results may differ by
# about two ulps (eps 9.8e-4, 7.8e-3); float32 / float64 by a few ulps per operation (eps
# 1.2e-7, 2.2e-16) on O(1) inputs, with room for the cancellation in w − lr·v.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
SHAPES = [(6, 4), (0,), (3, 2, 3, 3), (37,)]
GATED_SHAPES = {"weight": ((5, 3, 2, 2), (5, 3, 2, 2)), "neuron": ((5, 3, 2, 2), (5,))}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randn(shapes, dtype):
    return [torch.randn(s, dtype=torch.float64).to(dtype).to(DEVICE) for s in shapes]


def _masks(shapes, keep=0.7):
    return [torch.rand(s, device=DEVICE) < keep for s in shapes]


def _prox_args(dtype, bufs=True, masks=True, shapes=SHAPES):
    n = len(shapes)
    return (
        _randn(shapes, dtype), _randn(shapes, dtype), _randn(shapes, dtype) if bufs else [],
        _masks(shapes) if masks else [],
        torch.rand(n, dtype=torch.float64, device=DEVICE),
        torch.rand(n, dtype=torch.float64, device=DEVICE),
        0.1, 0.9,
    )


def _clone(args):
    return [([t.clone() for t in a] if isinstance(a, list) else
             a.clone() if isinstance(a, torch.Tensor) else a) for a in args]


def _assert_lists_close(got, want, dtype):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if g.dtype == torch.bool:
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, **TOL[dtype])


# ---- registration: schema, fakes, autograd registration, AOT dispatch -------------------------

def _ops_cpp_schemas() -> dict[str, str]:
    """The schemas ``csrc/ops.cpp`` defines in ``TORCH_LIBRARY(cvsparse, m)`` (each ``m.def``'s
    adjacent string literals joined), normalized by torch's schema parser; by operator name.
    The Triton operators are defined from ``cvsparse/ops/schemas.py``, so this C++ source is
    the independent side of the comparison."""
    text = (Path(__file__).resolve().parents[2] / "csrc" / "ops.cpp").read_text()
    body = text[text.index("TORCH_LIBRARY(cvsparse, m)"):]
    schemas = {}
    for literals in re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', body):
        parsed = torch._C.parse_schema("".join(re.findall(r'"([^"]*)"', literals)))
        schemas[parsed.name] = str(parsed)
    return schemas


CPP_SCHEMAS = _ops_cpp_schemas()


def test_triton_library_has_exactly_the_operators_of_ops_cpp():
    registered = {name.removeprefix("cvsparse_triton::")
                  for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("cvsparse_triton::")}
    assert registered and registered == set(CPP_SCHEMAS)


@pytest.mark.parametrize("name", sorted(CPP_SCHEMAS))
def test_schema_equals_the_one_ops_cpp_defines(name):
    """Same arguments, types, alias and mutation annotations as the C++ operator, which is
    also what the loaded ``cvsparse`` library registered (a stale build would differ)."""
    triton = str(getattr(ops, name).default._schema).removeprefix("cvsparse_triton::")
    assert triton == CPP_SCHEMAS[name]
    assert str(getattr(torch.ops.cvsparse, name).default._schema) == f"cvsparse::{triton}"


@pytest.mark.parametrize("bufs,masks", [(True, True), (False, False)])
def test_opcheck_prox_sgd(bufs, masks):
    torch.library.opcheck(ops.prox_sgd_.default, _prox_args(torch.float32, bufs, masks))


@pytest.mark.parametrize("precond", [True, False])
def test_opcheck_mixed_partial_dot(precond):
    args = (_randn(SHAPES, torch.float64), _randn(SHAPES, torch.float64),
            _randn(SHAPES, torch.float64) if precond else [])
    torch.library.opcheck(ops.mixed_partial_dot.default, args)


@pytest.mark.parametrize("bufs", [True, False])
def test_opcheck_threshold(bufs):
    args = (_randn(SHAPES, torch.float32), _randn(SHAPES, torch.float32) if bufs else [],
            _masks(SHAPES), 0.5)
    torch.library.opcheck(ops.threshold_.default, args)


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_opcheck_gated_weight(granularity):
    w_shape, a_shape = GATED_SHAPES[granularity]
    w = torch.randn(w_shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    a = torch.randn(a_shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.gated_weight.default, (w, a, STE_CODES["leaky_relu"], 0.1, True))
    g = torch.randn(w_shape, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(ops.gated_weight_backward.default,
                          (g, w.detach(), a.detach(), STE_CODES["softplus"], 0.1, False))


# ---- fakes under torch.compile ----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_list_ops_compile_fullgraph(backend):
    def step(params, grads, bufs, masks, lambda1, lambda2):
        nonzero = ops.prox_sgd_(params, grads, bufs, masks, lambda1, lambda2, 0.1, 0.9)
        kept = ops.threshold_(params, bufs, masks, 0.3)
        return nonzero, kept, ops.mixed_partial_dot(params, grads, bufs)

    params, grads, bufs, masks, l1, l2, _, _ = _prox_args(torch.float32)
    want_state = _clone([params, bufs, masks])
    want_nonzero = reference.prox_sgd_(want_state[0], grads, want_state[1], want_state[2],
                                       l1, l2, 0.1, 0.9)
    want_kept = reference.threshold_(*want_state, 0.3)
    want_dot = reference.mixed_partial_dot(want_state[0], grads, want_state[1])

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    nonzero, kept, dot = compiled(params, grads, bufs, masks, l1, l2)
    assert torch.equal(nonzero, want_nonzero) and torch.equal(kept, want_kept)
    torch.testing.assert_close(dot, want_dot, **TOL[torch.float32])
    _assert_lists_close(params + bufs + masks, sum(want_state, []), torch.float32)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_gated_weight_compile_fullgraph(backend, granularity):
    w_shape, a_shape = GATED_SHAPES[granularity]
    w = torch.randn(w_shape, device=DEVICE, requires_grad=True)
    a = torch.randn(a_shape, device=DEVICE, requires_grad=True)
    g = torch.randn(w_shape, device=DEVICE)

    def loss(w, a, g):
        return (ops.gated_weight(w, a, STE_CODES["leaky_relu"], 0.2, True) * g).sum()

    torch._dynamo.reset()
    value = torch.compile(loss, fullgraph=True, backend=backend)(w, a, g)
    value.backward()
    want_out = reference.gated_weight(w.detach(), a.detach(), STE_CODES["leaky_relu"], 0.2, True)
    torch.testing.assert_close(value.detach(), (want_out * g).sum(), **TOL[torch.float32])
    want_w, want_a = reference.gated_weight_backward(g, w.detach(), a.detach(),
                                                     STE_CODES["leaky_relu"], 0.2, True)
    torch.testing.assert_close(w.grad, want_w, **TOL[torch.float32])
    torch.testing.assert_close(a.grad, want_a, **TOL[torch.float32])


# ---- gated_weight autograd --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sign_rule", [True, False])
@pytest.mark.parametrize("ste", sorted(STE_CODES))
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_gated_weight_autograd(granularity, ste, sign_rule, dtype):
    w_shape, a_shape = GATED_SHAPES[granularity]
    w = torch.randn(w_shape, device=DEVICE).to(dtype).requires_grad_()
    a = torch.randn(a_shape, device=DEVICE).to(dtype).requires_grad_()
    g = torch.randn(w_shape, device=DEVICE).to(dtype)
    code = STE_CODES[ste]

    out = ops.gated_weight(w, a, code, 0.05, sign_rule)
    assert torch.equal(out, reference.gated_weight(w.detach(), a.detach(), code, 0.05, sign_rule))
    out.backward(g)
    want_w, want_a = reference.gated_weight_backward(g, w.detach(), a.detach(), code, 0.05,
                                                     sign_rule)
    assert w.grad.dtype == dtype and a.grad.dtype == dtype
    torch.testing.assert_close(w.grad, want_w, **TOL[dtype])
    torch.testing.assert_close(a.grad, want_a, **TOL[dtype])


def test_gated_weight_backward_mixed_dtypes_and_layout():
    """float16 weight with a float32 aux, non-contiguous inputs: outputs keep each input's
    dtype and are contiguous."""
    w = torch.randn(8, 6, device=DEVICE).half().t()
    a = torch.randn(6, device=DEVICE)
    g = torch.randn(6, 8, device=DEVICE).half()
    for code in STE_CODES.values():
        got_w, got_a = ops.gated_weight_backward(g, w, a, code, 0.1, True)
        want_w, want_a = reference.gated_weight_backward(g, w, a, code, 0.1, True)
        assert got_w.is_contiguous() and got_w.dtype == torch.float16
        assert got_a.dtype == torch.float32
        torch.testing.assert_close(got_w, want_w, **TOL[torch.float16])
        torch.testing.assert_close(got_a, want_a, **TOL[torch.float32])


# ---- launches spanning many blocks (small block size) ----------------------------------------

@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 elements (and 4 partials per reduction step), so that every tensor below
    spans several programs."""
    monkeypatch.setattr(_launch, "INTERPRETER_BLOCK", 64)
    monkeypatch.setattr(_launch, "GPU_BLOCK", 64)
    monkeypatch.setattr(importlib.import_module("cvsparse.kernels.mixed_partial_dot"),
                        "_REDUCE_BLOCK", 4)


MULTI_BLOCK_SHAPES = [(1000,), (64,), (0,), (130, 3), (1,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_list_ops_many_blocks(small_blocks, dtype):
    args = _prox_args(dtype, shapes=MULTI_BLOCK_SHAPES)
    want = _clone(args)
    assert torch.equal(ops.prox_sgd_(*args), reference.prox_sgd_(*want))
    _assert_lists_close(args[0] + args[2], want[0] + want[2], dtype)

    params, bufs = args[0], args[2]
    masks = _masks(MULTI_BLOCK_SHAPES, keep=0.9)
    want_state = _clone([params, bufs, masks])
    assert torch.equal(ops.threshold_(params, bufs, masks, 0.05),
                       reference.threshold_(*want_state, 0.05))
    _assert_lists_close(params + bufs + masks, sum(want_state, []), dtype)

    vectors, precond = _randn(MULTI_BLOCK_SHAPES, dtype), _randn(MULTI_BLOCK_SHAPES, dtype)
    torch.testing.assert_close(ops.mixed_partial_dot(params, vectors, precond),
                               reference.mixed_partial_dot(params, vectors, precond),
                               **TOL[dtype])


@pytest.mark.parametrize("w_shape", [(20, 300), (40, 3, 3), (3, 1000)])
def test_gated_weight_backward_many_tiles(small_blocks, w_shape):
    w, g = torch.randn(w_shape, device=DEVICE), torch.randn(w_shape, device=DEVICE)
    for a in (torch.randn(w_shape[0], device=DEVICE), torch.randn(w_shape, device=DEVICE)):
        torch.testing.assert_close(ops.gated_weight(w, a, 0, 0.0, True),
                                   reference.gated_weight(w, a, 0, 0.0, True))
        got = ops.gated_weight_backward(g, w, a, STE_CODES["softplus"], 0.0, True)
        want = reference.gated_weight_backward(g, w, a, STE_CODES["softplus"], 0.0, True)
        _assert_lists_close(list(got), list(want), torch.float32)


# ---- invariant checks of the raw operators: clear error, nothing modified ---------------------

def test_prox_sgd_rejects_mismatched_lists():
    params, grads, bufs, masks, l1, l2, lr, mom = _prox_args(torch.float32)
    before = _clone([params, bufs])
    with pytest.raises(ValueError, match="grads"):
        ops.prox_sgd_(params, grads[:-1], bufs, masks, l1, l2, lr, mom)
    with pytest.raises(ValueError, match="lambda1"):
        ops.prox_sgd_(params, grads, bufs, masks, l1[:-1], l2, lr, mom)
    with pytest.raises(TypeError, match="masks"):
        ops.prox_sgd_(params, grads, bufs, [m.float() for m in masks], l1, l2, lr, mom)
    for got, want in zip(params + bufs, sum(before, []), strict=True):
        assert torch.equal(got, want)


def test_threshold_rejects_mixed_dtypes():
    params = _randn([(4,), (5,)], torch.float32)
    params[1] = params[1].double()
    masks = _masks([(4,), (5,)])
    before = _clone([params, masks])
    with pytest.raises(TypeError, match=r"params\[1\]"):
        ops.threshold_(params, [], masks, 0.1)
    for got, want in zip(params + masks, sum(before, []), strict=True):
        assert torch.equal(got, want)


def test_gated_weight_rejects_bad_aux_and_ste():
    w = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="aux"):
        ops.gated_weight(w, torch.randn(3, device=DEVICE), 0, 0.0, True)
    with pytest.raises(ValueError, match="ste"):
        ops.gated_weight_backward(w, w, torch.randn(4, device=DEVICE), 7, 0.0, True)


@pytest.mark.cpu_only  # checks the message for CPU tensors; deselected with a GPU
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.threshold_([torch.ones(3)], [], [torch.ones(3, dtype=torch.bool)], 0.5)


# ---- the kernels compile for a GPU (the interpreter accepts more than the compiler) ------------

_KERNEL_CASES = """
    from cvsparse.kernels import gated_weight, mixed_partial_dot, prox_sgd, threshold

    TABLE = {"table_ptr": "*i64", "n_blocks": "i32"}
    GATE = {"g_ptr": "*bf16", "w_ptr": "*bf16", "aux_ptr": "*fp32", "gw_ptr": "*bf16",
            "ga_ptr": "*fp32"}
    FLAGS = {"SIGN_RULE": True, "OPMATH": tl.float32}
    CASES = [
        (prox_sgd._prox_sgd_kernel,
         {**TABLE, "lambda1_ptr": "*fp64", "lambda2_ptr": "*fp64", "counts_ptr": "*i64",
          "lr": "fp64", "momentum": "fp64"},
         {"DTYPE": tl.float16, "OPMATH": tl.float32, "HAS_BUFS": True, "HAS_MASKS": True,
          "BLOCK": 1024}),
        (mixed_partial_dot._partial_sums_kernel, {**TABLE, "partial_ptr": "*fp64"},
         {"DTYPE": tl.float64, "ACC": tl.float64, "HAS_PRECOND": True, "BLOCK": 1024}),
        (mixed_partial_dot._sum_partials_kernel,
         {**TABLE, "partial_ptr": "*fp32", "out_ptr": "*fp32"},
         {"OUT": tl.float32, "BLOCK": 1024, "RBLOCK": 256}),
        (threshold._threshold_kernel, {**TABLE, "counts_ptr": "*i64", "tau": "fp64"},
         {"DTYPE": tl.bfloat16, "OPMATH": tl.float32, "HAS_BUFS": True, "BLOCK": 1024}),
        (gated_weight._gate_kernel,
         {"w_ptr": "*fp16", "aux_ptr": "*fp16", "out_ptr": "*fp16", "numel": "i64",
          "inner": "i32"},
         {"PER_UNIT": True, "OPMATH": tl.float32, "BLOCK": 1024}),
        (gated_weight._gate_backward_kernel, {**GATE, "numel": "i32", "slope": "fp64"},
         {**FLAGS, "STE": 1, "BLOCK": 1024}),
        (gated_weight._unit_gate_backward_kernel,
         {**GATE, "rows": "i32", "inner": "i32", "slope": "fp64"},
         {**FLAGS, "STE": 2, "ROWS": 8, "COLS": 128}),
    ]
"""


def test_kernels_compile_for_gpu():
    assert compiled_for_gpu(_KERNEL_CASES) == 7


_UNAVAILABLE_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    if sys.argv[1] == "no-triton":
        sys.modules["triton"] = None  # `import triton` now raises ImportError
    else:  # "no-device": no GPU and no interpreter
        torch.cuda.is_available = lambda: False
    import cvsparse.ops
    try:
        import cvsparse.kernels
    except ImportError as exc:
        print("ImportError:", exc)
    try:
        cvsparse.ops.set_backend("triton")
    except RuntimeError as exc:
        print("RuntimeError:", exc)
    print("backends:", cvsparse.ops.available_backends())
""")


@pytest.mark.parametrize("case,reason", [("no-triton", "needs the 'triton' package"),
                                         ("no-device", "TRITON_INTERPRET is not set")])
def test_backend_unavailable_with_a_clear_error(case, reason):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _UNAVAILABLE_SCRIPT, case], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("ImportError: cvsparse.kernels needs") and reason in lines[0]
    assert lines[1].startswith("RuntimeError: backend 'triton' is unavailable")
    assert reason in lines[1]
    assert "triton" not in lines[2]
