"""Loading of the compiled core and registration of what every backend shares.

Per dispatch key (docs/architecture.md, "Operator dispatch"):

* ``CompositeExplicitAutograd``: the reference implementation (``reference.py``) of every
  operator, registered here whether or not ``cvsparse._C`` loaded: it serves every device without
  a compiled kernel (a CPU without AVX2, a GPU of a build without CUDA, calls whose lists are all
  empty, and every CPU when the compiled library is missing or disabled);
* ``CPU`` / ``CUDA``: the compiled kernels of ``cvsparse._C`` (``csrc/cpu``, ``csrc/cuda``), which
  take precedence over the default kernel for their key;
* ``Meta``: the fakes below (output metadata only); ``Autograd``: the formula of ``gated_weight``.

The schemas come from ``csrc/ops.cpp`` when ``cvsparse._C`` loads; otherwise (or for an operator
that a stale build lacks) they are defined here from the same strings (``schemas.py``).  Setting
the environment variable ``CVSPARSE_NO_EXTENSION=1`` skips loading ``cvsparse._C``, e.g. to test
the reference-only configuration with the library installed.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from . import reference
from .schemas import SCHEMAS

NO_EXTENSION_VARIABLE = "CVSPARSE_NO_EXTENSION"


def _load_compiled() -> str | None:
    """Import ``cvsparse._C`` (which runs its static registrations); why it is not loaded, or
    None when it is."""
    if os.environ.get(NO_EXTENSION_VARIABLE) == "1":
        return f"disabled by {NO_EXTENSION_VARIABLE}=1"
    try:
        from cvsparse import _C  # noqa: F401
    except Exception as exc:  # pragma: no cover - exercised only on broken installs
        reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"cvsparse: the compiled library could not be loaded ({reason}); falling back to the "
            "pure-PyTorch reference operators. Reinstall with `pip install --no-build-isolation "
            "-e .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return reason
    return None


def _schema_defined(name: str) -> bool:
    return hasattr(torch.ops.cvsparse, name)


LOAD_ERROR: str | None = _load_compiled()
_missing = [name for name in SCHEMAS if not _schema_defined(name)]
if _missing and LOAD_ERROR is None:
    warnings.warn(f"cvsparse: the compiled library predates {', '.join(_missing)}; they run on "
                  "the reference until it is rebuilt", RuntimeWarning, stacklevel=2)
_registry = torch.library.Library("cvsparse", "FRAGMENT")  # kept alive for the process
for _name, _schema in SCHEMAS.items():
    if _name in _missing:
        _registry.define(_schema)
    _registry.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")


def compiled_library_loaded() -> bool:
    """True when ``cvsparse._C`` (the C++ kernels) is loaded."""
    return LOAD_ERROR is None


@torch.compiler.assume_constant_result
def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``cvsparse::op`` has a kernel registered for ``dispatch_key`` (e.g. "CUDA").

    A constant for torch.compile (Dynamo cannot trace the dispatcher query), so backend choice
    inside compiled code costs nothing."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"cvsparse::{op}", dispatch_key)


# ---- fakes: output metadata only, for torch.compile / FakeTensor / meta tensors -------------

def _counts_like(params: list[Tensor]) -> Tensor:
    device = params[0].device if params else torch.device("cpu")
    return torch.empty(len(params), dtype=torch.int64, device=device)


@torch.library.register_fake("cvsparse::prox_sgd_")
def _prox_sgd_fake(params, grads, momentum_bufs, masks, lambda1, lambda2, lr, momentum):
    return _counts_like(params)


@torch.library.register_fake("cvsparse::max_abs")
def _max_abs_fake(tensors):
    dtype = torch.float64 if tensors and tensors[0].dtype == torch.float64 else torch.float32
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.empty(len(tensors), dtype=dtype, device=device)


@torch.library.register_fake("cvsparse::mixed_partial_dot")
def _mixed_partial_dot_fake(params, vectors, precond):
    dtype = torch.float64 if params and params[0].dtype == torch.float64 else torch.float32
    device = params[0].device if params else torch.device("cpu")
    return torch.empty(len(params), 2, dtype=dtype, device=device)


@torch.library.register_fake("cvsparse::threshold_")
def _threshold_fake(params, momentum_bufs, masks, tau):
    return _counts_like(params)


@torch.library.register_fake("cvsparse::gated_weight")
def _gated_weight_fake(weight, aux, ste, slope, sign_rule):
    return torch.empty_like(weight)


@torch.library.register_fake("cvsparse::gated_weight_backward")
def _gated_weight_backward_fake(grad, weight, aux, ste, slope, sign_rule):
    return torch.empty_like(weight), torch.empty_like(aux)


@torch.library.register_fake("cvsparse::sparse_matmul")
def _sparse_matmul_fake(input, values, col_deltas, row_ptr, bias, relu):
    return input.new_empty((row_ptr.shape[0] - 1, input.shape[1]))


@torch.library.register_fake("cvsparse::sparse_conv2d")
def _sparse_conv2d_fake(input, values, col_deltas, row_ptr, bias, kernel_size, stride, padding,
                        relu):
    batch, _, height, width = input.shape
    out_h = (height + 2 * padding[0] - kernel_size[0]) // stride[0] + 1
    out_w = (width + 2 * padding[1] - kernel_size[1]) // stride[1] + 1
    return input.new_empty((batch, row_ptr.shape[0] - 1, out_h, out_w))


# ---- autograd: the gated weight is differentiable in both inputs ---------------------------

def _gated_setup_context(ctx, inputs, output):
    weight, aux, ste, slope, sign_rule = inputs
    ctx.save_for_backward(weight, aux)
    ctx.ste, ctx.slope, ctx.sign_rule = ste, slope, sign_rule


def _gated_backward(ctx, grad):
    weight, aux = ctx.saved_tensors
    if not ctx.needs_input_grad[1]:   # gates held fixed: grad_w = g · h(m), the forward on g
        grad_weight = torch.ops.cvsparse.gated_weight(
            grad.contiguous(), aux, ctx.ste, ctx.slope, ctx.sign_rule
        )
        return grad_weight, None, None, None, None
    grad_weight, grad_aux = torch.ops.cvsparse.gated_weight_backward(
        grad.contiguous(), weight, aux, ctx.ste, ctx.slope, ctx.sign_rule
    )
    return grad_weight, grad_aux, None, None, None


torch.library.register_autograd(
    "cvsparse::gated_weight", _gated_backward, setup_context=_gated_setup_context
)
