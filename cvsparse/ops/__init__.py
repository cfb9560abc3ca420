"""Fused per-parameter operators of sparse training (docs/method.md §2–4, §6) and the sparse
inference operators (``sparse_matmul``, ``sparse_conv2d``).

Every operator takes *lists* of tensors — all regularized tensors of a model in one call — and
is also available as ``torch.ops.cvsparse.<name>``.  Arguments are validated here, once, before
any backend runs (a rejected call modifies nothing); :func:`set_backend` chooses the
implementation (see ``_backend.py``).  Tensors must be contiguous and share one dtype
(float32, float64, float16 or bfloat16; reduced precision computes in float32) and one device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _checks as checks
from . import _library, reference
from ._backend import available_backends, get_backend, resolve, set_backend
from .schemas import STE_CODES

__all__ = [
    "prox_sgd_", "mixed_partial_dot", "threshold_", "max_abs", "gated_weight",
    "sparse_matmul", "sparse_conv2d",
    "set_backend", "get_backend", "available_backends", "compiled_library_loaded", "STE_CODES",
]

compiled_library_loaded = _library.compiled_library_loaded
Lambda = float | Tensor


def prox_sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_bufs: Sequence[Tensor] | None,
    *,
    lr: float,
    momentum: float,
    lambda1: Lambda,
    lambda2: Lambda,
    masks: Sequence[Tensor] | None = None,
) -> Tensor:
    """One proximal SGD step with momentum on every tensor of ``params``, in place
    (docs/method.md §2).

    Per element: ``d = g + λ2·w``; ``v = μ·v + d``; ``z = w − lr·v``;
    ``w = sign(z)·max(|z| − lr·λ1, 0)``; then ``w, v *= mask`` where a mask is given.

    Args:
        params: n weight tensors (updated in place).
        grads: n gradients, shaped like ``params``.
        momentum_bufs: n buffers (updated in place; start them at zero), or ``None`` when
            ``momentum == 0``.
        lr, momentum: learning rate ≥ 0 and momentum ≥ 0.
        lambda1, lambda2: L1 and L2 strengths ≥ 0, a float or a 1-D tensor of n values.
        masks: optional n bool tensors; False entries are held at zero.

    Returns:
        int64 tensor ``(n,)``: the nonzero count of each updated tensor.
    """
    params = checks.tensor_list("params", params)
    grads = checks.tensor_list("grads", grads)
    bufs = checks.tensor_list("momentum_bufs", momentum_bufs, allow_none=True)
    masks = checks.tensor_list("masks", masks, allow_none=True)
    lr = checks.nonnegative_scalar("lr", lr)
    momentum = checks.nonnegative_scalar("momentum", momentum)
    checks.params_list("params", params)
    checks.companion_list("grads", grads, params)
    if bufs or momentum != 0:
        checks.companion_list("momentum_bufs", bufs, params)
    if masks:
        checks.companion_list("masks", masks, params, dtype=torch.bool)
    checks.no_aliasing({"params": params, "momentum_bufs": bufs})
    device = _device(params)
    values = checks.checking_values()
    l1 = checks.per_tensor_lambda("lambda1", lambda1, len(params), device, values)
    l2 = checks.per_tensor_lambda("lambda2", lambda2, len(params), device, values)
    return resolve("prox_sgd_", device)(params, grads, bufs, masks, l1, l2, lr, momentum)


def mixed_partial_dot(
    params: Sequence[Tensor], vectors: Sequence[Tensor], precond: Sequence[Tensor] | None = None
) -> Tensor:
    """Mixed partials ``∂²e/∂W∂λ`` reduced against ``vectors`` (docs/method.md §3).

    Returns a ``(n, 2)`` tensor whose row l is ``[Σ c·v·sign(w), Σ c·v·w]`` over the nonzero
    elements of ``params[l]`` (``c = precond[l]``, or 1).  float64 for float64 inputs, float32
    otherwise (sums accumulate in at least float32).  The hypergradient is minus this.
    """
    params = checks.tensor_list("params", params)
    vectors = checks.tensor_list("vectors", vectors)
    precond = checks.tensor_list("precond", precond, allow_none=True)
    checks.params_list("params", params)
    checks.companion_list("vectors", vectors, params)
    if precond:
        checks.companion_list("precond", precond, params)
    return resolve("mixed_partial_dot", _device(params))(params, vectors, precond)


def threshold_(
    params: Sequence[Tensor],
    momentum_bufs: Sequence[Tensor] | None,
    masks: Sequence[Tensor],
    tau: float,
) -> Tensor:
    """Magnitude pruning, in place (docs/method.md §4): ``keep = |w| ≥ τ and mask``;
    ``w, v *= keep``; ``mask = keep``.

    Args:
        params: n weight tensors; momentum_bufs: n buffers or ``None``;
        masks: n bool tensors (read and rewritten); tau: threshold ≥ 0.

    Returns:
        int64 tensor ``(n,)``: kept elements per tensor.
    """
    params = checks.tensor_list("params", params)
    bufs = checks.tensor_list("momentum_bufs", momentum_bufs, allow_none=True)
    masks = checks.tensor_list("masks", masks)
    tau = checks.nonnegative_scalar("tau", tau)
    checks.params_list("params", params)
    if bufs:
        checks.companion_list("momentum_bufs", bufs, params)
    checks.companion_list("masks", masks, params, dtype=torch.bool)
    checks.no_aliasing({"params": params, "momentum_bufs": bufs, "masks": masks})
    return resolve("threshold_", _device(params))(params, bufs, masks, tau)


def max_abs(tensors: Sequence[Tensor]) -> Tensor:
    """The largest ``|x|`` of every tensor, read-only, in one pass over the whole list.

    A tensor holding a NaN gives NaN, one holding an inf (and no NaN) gives inf, an empty one 0:
    one call both tests a list for finiteness and measures its largest entry (what
    :class:`cvsparse.optim.ProxSGD` does to every gradient before a step).

    Returns:
        ``(n,)`` tensor on the tensors' device, float64 for float64 inputs, float32 otherwise.
    """
    tensors = checks.tensor_list("tensors", tensors)
    checks.params_list("tensors", tensors)
    return resolve("max_abs", _device(tensors))(tensors)


def gated_weight(
    weight: Tensor, aux: Tensor, *, ste: str = "linear", slope: float = 0.01,
    update: str = "proposed",
) -> Tensor:
    """AutoPrune's gated weight ``w · 1[m > 0]`` (docs/method.md §6), differentiable in ``w``
    and ``m``.

    ``aux`` is shaped like ``weight`` (one gate per weight) or ``(weight.shape[0],)`` (one gate per
    output channel / neuron).  Backward: ``∂w = g·h(m)``, ``∂m = Σ g·sgn(w)·s'(m)`` for
    ``update="proposed"`` (``w`` instead of ``sgn(w)`` for ``"bnn"``), ``s'`` given by ``ste``
    (``linear``: 1, ``leaky_relu``: 1 or ``slope``, ``softplus``: sigmoid(m)).

    Args:
        weight: floating tensor, e.g. a Conv2d weight ``(out, in, kh, kw)``.
        aux: the gate parameters ``m``, same dtype and device, shaped like ``weight`` or
            ``(weight.shape[0],)``.  Non-contiguous inputs are made contiguous (differentiably).
        ste: ``"linear"``, ``"leaky_relu"`` or ``"softplus"``; slope: LeakyReLU slope ≥ 0;
        update: ``"proposed"`` or ``"bnn"``.

    Returns:
        A tensor shaped like ``weight`` (same dtype): ``weight`` with gated-off entries zeroed.
    """
    for name, value in (("weight", weight), ("aux", aux)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    if weight.dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"weight has dtype {weight.dtype}; supported: float32, float64, "
                        "float16, bfloat16")
    if aux.dtype != weight.dtype:
        raise TypeError(f"aux has dtype {aux.dtype} but weight has {weight.dtype}")
    if aux.device != weight.device:
        raise ValueError(f"aux is on {aux.device} but weight is on {weight.device}")
    neuron_shape = tuple(weight.shape[:1])
    if aux.shape != weight.shape and tuple(aux.shape) != neuron_shape:
        raise ValueError(f"aux must have weight's shape {tuple(weight.shape)} (one gate per "
                         f"weight) or {neuron_shape} (one per output unit), got "
                         f"{tuple(aux.shape)}")
    if not isinstance(ste, str) or ste not in STE_CODES:
        raise ValueError(f"ste must be one of {', '.join(STE_CODES)}, got {ste!r}")
    slope = checks.nonnegative_scalar("slope", slope)
    if not isinstance(update, str) or update not in ("proposed", "bnn"):
        raise ValueError(f"update must be 'proposed' or 'bnn', got {update!r}")
    kernel = resolve("gated_weight", weight.device)
    if kernel is reference.gated_weight:
        kernel = _ReferenceGatedWeight.apply  # the plain reference function has no aux gradient
    return kernel(weight.contiguous(), aux.contiguous(), STE_CODES[ste], slope,
                  update == "proposed")


class _ReferenceGatedWeight(torch.autograd.Function):
    """:func:`reference.gated_weight` with :func:`reference.gated_weight_backward` as its
    gradient (what ``torch.ops.cvsparse.gated_weight`` gets from ``_library.py``)."""

    @staticmethod
    def forward(ctx, weight, aux, ste, slope, sign_rule):
        ctx.save_for_backward(weight, aux)
        ctx.ste, ctx.slope, ctx.sign_rule = ste, slope, sign_rule
        return reference.gated_weight(weight, aux, ste, slope, sign_rule)

    @staticmethod
    def backward(ctx, grad):
        weight, aux = ctx.saved_tensors
        grad_weight, grad_aux = reference.gated_weight_backward(
            grad, weight, aux, ctx.ste, ctx.slope, ctx.sign_rule
        )
        return grad_weight, grad_aux, None, None, None


def sparse_matmul(
    input: Tensor, values: Tensor, col_deltas: Tensor, row_ptr: Tensor,
    bias: Tensor | None = None, relu: bool = False, *, weight_checked: bool = False,
) -> Tensor:
    """Sparse × dense product ``W @ input`` (+ ``bias[m]`` on row m) (then ReLU if ``relu``).

    ``W`` (M × K) is packed per output row (:mod:`cvsparse.ops.sparse_format`).  For a Linear
    layer ``input`` is the transposed batch ``(K, N)``; for a 1×1 convolution the pixels
    ``(C, H·W)`` of one image.  The N dimension fills the SIMD lanes.

    Args:
        input: ``(K, N)``, float32 / float64 / float16 / bfloat16 (reduced precision
            accumulates in float32): contiguous, or the transpose ``x.t()`` of a contiguous
            batch ``x`` (N, K) — on CPU the operator transposes it in cache-sized tiles, much
            faster than ``x.t().contiguous()``; other devices and the Triton backend get a
            contiguous copy first.
        values, col_deltas, row_ptr: the packed weight, values in input's dtype, indices int32.
        bias: optional ``(M,)`` in input's dtype.
        relu: apply ReLU after the bias.
        weight_checked: the packed weight and bias were checked before (a module's own buffers,
            checked when it was built): only ``input`` is checked against them, which keeps
            the per-call cost of small layers low.  Otherwise everything is checked, the index
            values too (that reads them: a device sync on GPU).

    Returns:
        ``(M, N)`` in input's dtype, contiguous.
    """
    if weight_checked:
        checks.sparse_input(input, values, transposed_ok=True)
    else:
        if not isinstance(input, Tensor) or input.dim() != 2:
            raise ValueError("input must be a 2-D tensor (K, N), got "
                             f"{tuple(input.shape) if isinstance(input, Tensor) else input!r}")
        checks.sparse_weight(input, values, col_deltas, row_ptr, bias, input.shape[0],
                             transposed_ok=True)
        if not isinstance(relu, bool):
            raise ValueError(f"relu must be a bool, got {type(relu).__name__}")
    kernel = resolve("sparse_matmul", input.device)
    if not input.is_contiguous() and (input.device.type != "cpu"
                                      or get_backend() == "triton"):
        input = input.contiguous()   # only the CPU kernels and the reference take the transpose
    return kernel(input, values, col_deltas, row_ptr, bias, relu)


def sparse_conv2d(
    input: Tensor, values: Tensor, col_deltas: Tensor, row_ptr: Tensor,
    bias: Tensor | None = None, kernel_size: int | Sequence[int] = 3,
    stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0, relu: bool = False,
    *, weight_checked: bool = False,
) -> Tensor:
    """Direct sparse convolution (groups 1, zero padding), bias and ReLU fused.

    ``W`` (M × C·kh·kw) is packed per output channel (:mod:`cvsparse.ops.sparse_format`), its
    columns the flattened ``(c, i, j)`` of a ``C × kh × kw`` filter (``conv.weight.reshape(M,
    -1)``).

    Args:
        input: ``(B, C, H, W)`` contiguous NCHW, float32 / float64 / float16 / bfloat16.
        values, col_deltas, row_ptr: the packed weight; bias: optional ``(M,)``.
        kernel_size, stride, padding: ints or pairs (height, width), in pixels.
        relu: apply ReLU after the bias; weight_checked: as in :func:`sparse_matmul` (then
            kernel_size, stride and padding must be lists of two ints, as a module holds them).

    Returns:
        ``(B, M, Ho, Wo)`` with ``Ho = (H + 2·pad_h − kh) // stride_h + 1`` (same for W).
    """
    if weight_checked:
        checks.sparse_input(input, values)
        return resolve("sparse_conv2d", input.device)(input, values, col_deltas, row_ptr, bias,
                                                      kernel_size, stride, padding, relu)
    if not isinstance(input, Tensor) or input.dim() != 4:
        raise ValueError("input must be a 4-D tensor (B, C, H, W), got "
                         f"{tuple(input.shape) if isinstance(input, Tensor) else input!r}")
    kernel_size = checks.int_pair("kernel_size", kernel_size, 1)
    stride = checks.int_pair("stride", stride, 1)
    padding = checks.int_pair("padding", padding, 0)
    channels, height, width = input.shape[1:]
    for name, size, k, p in (("height", height, kernel_size[0], padding[0]),
                             ("width", width, kernel_size[1], padding[1])):
        if size + 2 * p < k:
            raise ValueError(f"input {name} {size} with padding {p} is smaller than the kernel "
                             f"({k})")
    checks.sparse_weight(input, values, col_deltas, row_ptr, bias,
                         channels * kernel_size[0] * kernel_size[1])
    if not isinstance(relu, bool):
        raise ValueError(f"relu must be a bool, got {type(relu).__name__}")
    return resolve("sparse_conv2d", input.device)(input, values, col_deltas, row_ptr, bias,
                                                  kernel_size, stride, padding, relu)


def _device(params: list[Tensor]) -> torch.device:
    return params[0].device if params else torch.device("cpu")
