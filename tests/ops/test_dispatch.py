"""Operator dispatch: the reference is every operator's default kernel, the compiled kernels win
for their own dispatch keys, and ``torch.ops.cvsparse.*`` works without the compiled library.

Three configurations: this process (``cvsparse._C`` loaded, its CPU kernels registered on a
CPU with AVX2), and two subprocesses running this file as a script — one with
``CVSPARSE_NO_EXTENSION=1`` (no compiled library: schemas defined from Python), one with
``ATEN_CPU_CAPABILITY=default`` (the library loaded on what looks like a CPU without AVX2, so it
registers no CPU kernel).  In both subprocesses every operator must run through the dispatcher,
equal the reference called directly (the oracle) bit for bit, and pass ``opcheck``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cvsparse import ops
from cvsparse.ops import _backend, reference, sparse_format
from cvsparse.ops.schemas import SCHEMAS

CHECKED_KEYS = ("CPU", "CUDA", "Meta", "CompositeExplicitAutograd")


def _sparse(generator: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    weight = torch.randn(rows, cols, generator=generator)
    return torch.where(weight.abs() > 0.8, weight, torch.zeros(()))


def _arguments(name: str, masked: bool = True) -> tuple:
    """A fresh, valid schema-argument tuple for operator ``name`` (the same on every call);
    ``masked=False`` passes the empty masks list, which means "no masks"."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (0,), (7,)]

    def tensors():
        return [torch.randn(s, generator=gen) for s in shapes]

    params, grads, bufs, vectors = tensors(), tensors(), tensors(), tensors()
    masks = [torch.rand(s, generator=gen) < 0.6 for s in shapes] if masked else []
    lambdas = torch.rand(len(shapes), generator=gen, dtype=torch.float64)
    weight, aux = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    if name == "prox_sgd_":
        return params, grads, bufs, masks, lambdas, lambdas * 0.1, 0.1, 0.9
    if name == "mixed_partial_dot":
        return params, vectors, grads
    if name == "max_abs":
        return (params,)
    if name == "threshold_":
        return params, bufs, masks, 0.5
    if name == "gated_weight":
        return weight.requires_grad_(), aux.requires_grad_(), 1, 0.1, True
    if name == "gated_weight_backward":
        return torch.randn(5, 4, generator=gen), weight, aux, 2, 0.1, False
    if name == "sparse_matmul":
        packed = sparse_format.pack(_sparse(gen, 9, 20))
        return torch.randn(20, 11, generator=gen), *packed, torch.randn(9, generator=gen), True
    if name == "sparse_conv2d":
        packed = sparse_format.pack(_sparse(gen, 6, 4 * 3 * 3))
        return (torch.randn(2, 4, 7, 8, generator=gen), *packed, None, [3, 3], [2, 1], [1, 1],
                False)
    raise ValueError(f"no arguments for operator {name!r}")


def _flat_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _flat_tensors(item)]
    return []


def _check_against_reference(name: str, masked: bool) -> None:
    """Run ``torch.ops.cvsparse.<name>`` and the reference on equal inputs; outputs and mutated
    inputs must be bitwise equal where the reference is what runs (no compiled CPU kernel),
    close otherwise."""
    got_args, want_args = _arguments(name, masked), _arguments(name, masked)
    got = getattr(torch.ops.cvsparse, name)(*got_args)
    with torch.no_grad():
        want = getattr(reference, name)(*want_args)
    exact = not torch._C._dispatch_has_kernel_for_dispatch_key(f"cvsparse::{name}", "CPU")
    pairs = zip(_flat_tensors((got, got_args)), _flat_tensors((want, want_args)), strict=True)
    for index, (g, w) in enumerate(pairs):
        message = f"{name}: tensor {index} differs"
        if exact:
            assert g.dtype == w.dtype and torch.equal(g.detach(), w), message
        else:
            torch.testing.assert_close(g.detach(), w, msg=message)


def _configuration_report() -> dict:
    """What the dispatcher holds in this process, after checking every operator against the
    reference and with ``opcheck``."""
    cases = [(name, True) for name in SCHEMAS] + [("prox_sgd_", False), ("threshold_", False)]
    for name, masked in cases:
        _check_against_reference(name, masked)
        torch.library.opcheck(getattr(torch.ops.cvsparse, name).default,
                              _arguments(name, masked))
    try:
        ops.set_backend("cpp")
        cpp_error = None
    except RuntimeError as exc:
        cpp_error = str(exc)
    return {
        "loaded": ops.compiled_library_loaded(),
        "schemas": {name: str(getattr(torch.ops.cvsparse, name).default._schema)
                    for name in SCHEMAS},
        "kernels": {name: {key: torch._C._dispatch_has_kernel_for_dispatch_key(
            f"cvsparse::{name}", key) for key in CHECKED_KEYS} for name in SCHEMAS},
        "cpp_error": cpp_error,
    }


def _run_configuration(**env: str) -> dict:
    result = subprocess.run([sys.executable, str(Path(__file__).resolve())],
                            env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_reference_only(report: dict) -> None:
    """Every schema is defined, the reference is every operator's default kernel, fakes serve
    Meta, and no operator has a compiled kernel."""
    assert report["schemas"] == {name: f"cvsparse::{schema}" for name, schema in SCHEMAS.items()}
    for name, kernels in report["kernels"].items():
        assert kernels == {"CPU": False, "CUDA": False, "Meta": True,
                           "CompositeExplicitAutograd": True}, name


def test_without_extension_every_operator_runs_the_reference():
    report = _run_configuration(CVSPARSE_NO_EXTENSION="1")
    assert report["loaded"] is False
    _assert_reference_only(report)
    assert "CVSPARSE_NO_EXTENSION=1" in report["cpp_error"]


def test_cpu_without_compiled_kernel_falls_back_to_the_reference():
    report = _run_configuration(ATEN_CPU_CAPABILITY="default")
    assert report["loaded"] is True
    _assert_reference_only(report)
    assert "no CPU kernels" in report["cpp_error"]


def _dispatch_table(name: str) -> dict[str, str]:
    rows = torch._C._dispatch_dump_table(f"cvsparse::{name}").splitlines()
    return dict(row.split(": ", 1) for row in rows if ": " in row)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_compiled_kernel_wins_for_its_key_and_reference_covers_the_rest(name):
    compiled_cpu = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    assert ops.compiled_library_loaded()
    assert (torch._C._dispatch_has_kernel_for_dispatch_key(f"cvsparse::{name}", "CPU")
            == compiled_cpu)
    table = _dispatch_table(name)
    library_file = str(Path("cvsparse", "ops", "_library.py"))
    if compiled_cpu:
        assert str(Path("csrc", "cpu")) in table["CPU"] and table["CPU"].endswith("[kernel]")
    cuda_compiled = torch._C._dispatch_has_kernel_for_dispatch_key(f"cvsparse::{name}", "CUDA")
    for key in ("Undefined", "XPU", "PrivateUse1") + (() if cuda_compiled else ("CUDA",)):
        assert library_file in table[key] and table[key].endswith("[default backend kernel]"), key
    assert library_file not in table["Meta"]  # fakes, not the reference


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_set_backend_overrides_the_dispatcher(name):
    cpu = torch.device("cpu")
    try:
        assert _backend.resolve(name, cpu) is getattr(torch.ops.cvsparse, name)
        ops.set_backend("reference")
        assert _backend.resolve(name, cpu) is getattr(reference, name)
    finally:
        ops.set_backend("auto")


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(_configuration_report()))
