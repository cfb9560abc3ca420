"""Which implementation runs an operator: ``auto``, ``cpp``, ``cuda``, ``triton``, ``reference``.

``auto`` (the default) calls ``torch.ops.cvsparse.<op>`` and lets the PyTorch dispatcher choose:
the compiled kernel registered for the tensors' device (C++ on CPUs with AVX2, CUDA), else the
reference registered as every operator's default kernel (``_library.py``).  The one exception:
CUDA tensors without a compiled CUDA kernel run the Triton kernels when Triton is usable.  The
other names are explicit overrides, for tests and benchmarks: an explicit choice that cannot serve
a call raises ``RuntimeError`` saying why instead of silently running something else;
``reference`` calls the Python functions directly, bypassing the dispatcher.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from . import _library, reference

BACKENDS = ("auto", "cpp", "cuda", "triton", "reference")
_state = {"backend": "auto"}


def set_backend(name: str) -> None:
    """Select the backend for every later call (process-wide)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name in ("cpp", "cuda") and not _library.compiled_library_loaded():
        raise RuntimeError(f"backend {name!r} needs the compiled library, which is not loaded "
                           f"({_library.LOAD_ERROR})")
    if name == "cpp" and not _library.has_kernel("prox_sgd_", "CPU"):
        raise RuntimeError("backend 'cpp' has no CPU kernels on this machine: they are built for "
                           "AVX2 and register only where the CPU (and ATEN_CPU_CAPABILITY) "
                           "allows it; 'auto' uses the reference here")
    if name == "cuda" and not _library.has_kernel("prox_sgd_", "CUDA"):
        raise RuntimeError("backend 'cuda' needs cvsparse built with CUDA (FORCE_CUDA=1 or a "
                           "visible GPU at install time)")
    if name == "triton":
        triton_ops()
    _resolved.clear()
    _state["backend"] = name


def get_backend() -> str:
    """The backend selected by :func:`set_backend` (``"auto"`` by default)."""
    return _state["backend"]


def triton_ops():
    """The ``torch.ops.cvsparse_triton`` namespace, importing the Triton kernels on first use."""
    try:
        importlib.import_module("cvsparse.kernels")
    except ImportError as exc:
        raise RuntimeError(f"backend 'triton' is unavailable: {exc}") from exc
    return torch.ops.cvsparse_triton


def _triton_usable() -> bool:
    try:
        triton_ops()
    except RuntimeError:
        return False
    return True


_resolved: dict[tuple[str, str, str], Callable] = {}


def resolve(op: str, device: torch.device) -> Callable:
    """The callable that runs ``op`` on tensors of ``device`` under the selected backend.

    Answers are remembered per (backend, op, device type): the dispatcher queries behind them
    cost microseconds, as much as a small sparse layer's whole kernel."""
    key = (_state["backend"], op, device.type)
    found = _resolved.get(key)
    if found is None:
        found = _resolved[key] = _resolve(op, device)
    return found


def _resolve(op: str, device: torch.device) -> Callable:
    name = _state["backend"]
    if name == "reference":
        return getattr(reference, op)
    if name == "triton":
        return getattr(triton_ops(), op)
    if name == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpp' runs on CPU tensors, got {device}")
        if not _library.has_kernel(op, "CPU"):
            raise RuntimeError(f"backend 'cpp' has no CPU kernel for {op} on this machine")
        return getattr(torch.ops.cvsparse, op)
    if name == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"backend 'cuda' runs on CUDA tensors, got {device}")
        return getattr(torch.ops.cvsparse, op)
    # auto: the dispatcher runs the compiled kernel of the tensors' device where there is one,
    # the reference (the default kernel) elsewhere; Triton only stands in for missing CUDA ones.
    if device.type == "cuda" and not _library.has_kernel(op, "CUDA") and _triton_usable():
        return getattr(torch.ops.cvsparse_triton, op)
    return getattr(torch.ops.cvsparse, op)


def available_backends() -> list[str]:
    """Backends that can run on this machine (``reference`` always can)."""
    out = ["auto", "reference"]
    if _library.compiled_library_loaded():
        if _library.has_kernel("prox_sgd_", "CPU"):
            out.append("cpp")
        if _library.has_kernel("prox_sgd_", "CUDA"):
            out.append("cuda")
    if _triton_usable():
        out.append("triton")
    return out
