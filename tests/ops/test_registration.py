"""Registration of the ``torch.ops.cvsparse`` operators: schemas agree with ``schemas.py``, the
list operators pass ``torch.library.opcheck`` on CPU (schema/mutation annotations, fakes, AOT
dispatch), and the public operators run under ``torch.compile(fullgraph=True)`` with the same
results as in eager mode.
"""

from __future__ import annotations

import pytest
import torch

from cvsparse import ops
from cvsparse.ops.schemas import SCHEMAS

SHAPE_SETS = {"mixed": [(4, 3, 3, 3), (0,), (7,)], "single": [(33, 5)]}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randn(shapes, dtype=torch.float32):
    return [torch.randn(s, dtype=dtype) for s in shapes]


def _masks(shapes):
    return [torch.rand(s) < 0.6 for s in shapes]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_compiled_schema_equals_python_schema(name):
    assert str(getattr(torch.ops.cvsparse, name).default._schema) == f"cvsparse::{SCHEMAS[name]}"


@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("with_masks", [True, False], ids=["masks", "no_masks"])
@pytest.mark.parametrize("with_bufs", [True, False], ids=["bufs", "no_bufs"])
def test_opcheck_prox_sgd(shapes, with_masks, with_bufs):
    n = len(shapes)
    args = (_randn(shapes), _randn(shapes), _randn(shapes) if with_bufs else [],
            _masks(shapes) if with_masks else [], torch.rand(n, dtype=torch.float64),
            torch.rand(n, dtype=torch.float64), 0.1, 0.9 if with_bufs else 0.0)
    torch.library.opcheck(torch.ops.cvsparse.prox_sgd_.default, args)


@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("with_precond", [True, False], ids=["precond", "no_precond"])
def test_opcheck_mixed_partial_dot(shapes, with_precond):
    args = (_randn(shapes, torch.float64), _randn(shapes, torch.float64),
            _randn(shapes, torch.float64) if with_precond else [])
    torch.library.opcheck(torch.ops.cvsparse.mixed_partial_dot.default, args)


@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("with_masks", [True, False], ids=["masks", "no_masks"])
def test_opcheck_threshold(shapes, with_masks):
    # The schema allows an empty masks list (no masks); the public API always passes masks.
    args = (_randn(shapes), _randn(shapes), _masks(shapes) if with_masks else [], 0.5)
    torch.library.opcheck(torch.ops.cvsparse.threshold_.default, args)


@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
def test_opcheck_max_abs(shapes):
    torch.library.opcheck(torch.ops.cvsparse.max_abs.default, (_randn(shapes),))


@pytest.fixture(params=["cpp", "auto"])
def cpu_backend(request):
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend("auto")


def _state():
    shapes = SHAPE_SETS["mixed"]
    return dict(params=_randn(shapes), grads=_randn(shapes), bufs=_randn(shapes),
                masks=_masks(shapes))


def _assert_states_equal(got, want):
    for key in want:
        for g, w in zip(got[key], want[key], strict=True):
            assert torch.equal(g, w), key


def _compiled_matches_eager(fn):
    eager_state, compiled_state = _state(), None
    compiled_state = {k: [t.clone() for t in v] for k, v in eager_state.items()}
    want = fn(eager_state)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(compiled_state)
    assert torch.equal(got, want)
    _assert_states_equal(compiled_state, eager_state)


def test_prox_sgd_compiles_fullgraph(cpu_backend):
    _compiled_matches_eager(lambda s: ops.prox_sgd_(
        s["params"], s["grads"], s["bufs"], lr=0.1, momentum=0.9, lambda1=0.5, lambda2=0.01,
        masks=s["masks"]))


def test_mixed_partial_dot_compiles_fullgraph(cpu_backend):
    _compiled_matches_eager(lambda s: ops.mixed_partial_dot(s["params"], s["grads"], s["bufs"]))


def test_threshold_compiles_fullgraph(cpu_backend):
    _compiled_matches_eager(lambda s: ops.threshold_(s["params"], s["bufs"], s["masks"], 0.8))
