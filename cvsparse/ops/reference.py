"""Plain-PyTorch implementations of every cvsparse operator.

Each function takes the operator's *normalized* arguments (the ones of its schema in
``schemas.py``: empty lists for absent optionals, ``lambda1``/``lambda2`` as float64 tensors of
shape ``(n,)``) and follows ``docs/method.md`` literally.  They are the test oracle for the C++,
CUDA and Triton backends and the fallback when the compiled library is unavailable.
Reduced-precision inputs are computed in float32 and stored back in their own dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schemas import STE_CODES


def _opmath(t: Tensor) -> Tensor:
    """``t`` in the dtype arithmetic is done in: float64 stays, everything else is float32."""
    return t.double() if t.dtype == torch.float64 else t.float()


def prox_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_bufs: list[Tensor],
    masks: list[Tensor],
    lambda1: Tensor,
    lambda2: Tensor,
    lr: float,
    momentum: float,
) -> Tensor:
    """Proximal SGD step with momentum (docs/method.md §2), in place; returns nonzeros per
    tensor, int64."""
    counts = []
    for i, p in enumerate(params):
        w = _opmath(p)
        d = _opmath(grads[i]) + lambda2[i].to(w.dtype) * w
        if momentum_bufs:
            v = momentum * _opmath(momentum_bufs[i]) + d
        else:
            v = d
        z = w - lr * v
        w = torch.sign(z) * torch.clamp(z.abs() - lr * lambda1[i].to(w.dtype), min=0)
        if masks:
            keep = masks[i]
            w = torch.where(keep, w, torch.zeros_like(w))
            v = torch.where(keep, v, torch.zeros_like(v))
        p.copy_(w)
        if momentum_bufs:
            momentum_bufs[i].copy_(v)
        counts.append(torch.count_nonzero(p).reshape(1))
    return _stack_counts(counts)


def mixed_partial_dot(params: list[Tensor], vectors: list[Tensor], precond: list[Tensor]) -> Tensor:
    """Per tensor ``[Σ c·v·sign(w), Σ c·v·w]`` over nonzero ``w`` (docs/method.md §3); shape
    ``(n, 2)``.

    The result is float64 for float64 inputs, float32 otherwise; sums accumulate in float64.
    """
    out_dtype = torch.float64 if params and params[0].dtype == torch.float64 else torch.float32
    device = params[0].device if params else torch.device("cpu")
    rows = []
    for i, p in enumerate(params):
        w = p.double()
        q = vectors[i].double()
        if precond:
            q = q * precond[i].double()
        rows.append(torch.stack([(q * torch.sign(w)).sum(), (q * w).sum()]))
    if not rows:
        return torch.zeros(0, 2, dtype=out_dtype, device=device)
    return torch.stack(rows).to(out_dtype)


def max_abs(tensors: list[Tensor]) -> Tensor:
    """Largest ``|x|`` of every tensor, shape ``(n,)``: NaN for a tensor holding a NaN, inf for
    one holding an inf (and no NaN), 0 for an empty one.  float64 for float64 inputs, float32
    otherwise."""
    dtype = torch.float64 if tensors and tensors[0].dtype == torch.float64 else torch.float32
    device = tensors[0].device if tensors else torch.device("cpu")
    out = torch.zeros(len(tensors), dtype=dtype, device=device)
    for i, t in enumerate(tensors):
        if t.numel():
            out[i] = t.detach().abs().amax().to(dtype)  # amax propagates NaN
    return out


def threshold_(
    params: list[Tensor], momentum_bufs: list[Tensor], masks: list[Tensor], tau: float
) -> Tensor:
    """Magnitude pruning at ``tau`` (docs/method.md §4), in place; returns kept elements per
    tensor.  An empty ``masks`` list means no masks (``keep = |w| ≥ τ``), as in the schema."""
    counts = []
    for i, p in enumerate(params):
        keep = _opmath(p).abs() >= tau
        if masks:
            keep &= masks[i]
            masks[i].copy_(keep)
        p.mul_(keep)
        if momentum_bufs:
            momentum_bufs[i].mul_(keep)
        counts.append(keep.sum().reshape(1))
    return _stack_counts(counts)


def gated_weight(
    weight: Tensor, aux: Tensor, ste: int, slope: float, sign_rule: bool
) -> Tensor:
    """``weight · 1[aux > 0]`` (docs/method.md §6); ``aux`` is shaped like ``weight`` or ``(out,)``.

    ``ste``, ``slope`` and ``sign_rule`` only shape the backward (:func:`gated_weight_backward`).
    """
    return weight * _gate(weight, aux, weight.dtype)


def gated_weight_backward(
    grad: Tensor, weight: Tensor, aux: Tensor, ste: int, slope: float, sign_rule: bool
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`gated_weight` w.r.t. ``weight`` and ``aux`` (docs/method.md §6).

    ``ste`` is a code of ``STE_CODES``; ``slope`` the LeakyReLU slope for ``m <= 0``;
    ``sign_rule`` selects the proposed rule (``sgn(w)``) over the BNN rule (``w``).
    """
    g = _opmath(grad)
    grad_weight = (g * _gate(weight, aux, g.dtype)).to(weight.dtype)
    coef = torch.sign(_opmath(weight)) if sign_rule else _opmath(weight)
    grad_gate = g * coef
    if aux.shape != weight.shape:  # one gate per output unit: reduce all but dim 0
        grad_gate = grad_gate.flatten(1).sum(dim=1)
    m = _opmath(aux)
    if ste == STE_CODES["linear"]:
        ds = torch.ones_like(m)
    elif ste == STE_CODES["leaky_relu"]:
        ds = torch.where(m > 0, torch.ones_like(m), torch.full_like(m, slope))
    elif ste == STE_CODES["softplus"]:
        ds = torch.sigmoid(m)
    else:
        raise ValueError(f"unknown straight-through estimator code {ste}")
    return grad_weight, (grad_gate * ds).to(aux.dtype)


def _gate(weight: Tensor, aux: Tensor, dtype: torch.dtype) -> Tensor:
    """The gate ``1[aux > 0]`` as 0/1 values of ``dtype``, shaped to broadcast against
    ``weight``.  Written straight into a tensor of ``dtype``: a comparison into bool and a
    conversion take about eight times as long on CPU."""
    gate = torch.gt(aux.detach(), 0, out=torch.empty(aux.shape, dtype=dtype, device=aux.device))
    if aux.shape != weight.shape:
        gate = gate.reshape((weight.shape[0],) + (1,) * (weight.dim() - 1))
    return gate


def _stack_counts(counts: list[Tensor]) -> Tensor:
    if not counts:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat(counts).to(torch.int64)


def _sparse_epilogue(out: Tensor, bias: Tensor | None, relu: bool, shape: tuple[int, ...],
                     dtype: torch.dtype) -> Tensor:
    if bias is not None:
        out = out + _opmath(bias).reshape(shape)
    if relu:
        out = torch.relu(out)
    return out.to(dtype)


def sparse_matmul(input: Tensor, values: Tensor, col_deltas: Tensor, row_ptr: Tensor,
                  bias: Tensor | None, relu: bool) -> Tensor:
    """``W @ input (+ bias[:, None]) (then ReLU)`` with the packed ``W`` decoded to dense:
    input ``(K, N)``, output ``(M, N)`` in input's dtype (math in float32 / float64)."""
    from .sparse_format import unpack

    x = _opmath(input)
    weight = unpack(values, col_deltas, row_ptr, input.shape[0], dtype=x.dtype)
    return _sparse_epilogue(weight @ x, bias, relu, (-1, 1), input.dtype)


def sparse_conv2d(input: Tensor, values: Tensor, col_deltas: Tensor, row_ptr: Tensor,
                  bias: Tensor | None, kernel_size: list[int], stride: list[int],
                  padding: list[int], relu: bool) -> Tensor:
    """``conv2d(input, W)`` (groups 1, zero padding) with the packed ``W`` decoded to dense
    ``(M, C, kh, kw)``: input ``(B, C, H, W)``, output ``(B, M, Ho, Wo)`` in input's dtype."""
    from .sparse_format import unpack

    x = _opmath(input)
    kh, kw = kernel_size
    channels = input.shape[1]
    weight = unpack(values, col_deltas, row_ptr, channels * kh * kw, dtype=x.dtype)
    weight = weight.reshape(-1, channels, kh, kw)
    rows = weight.shape[0]
    # conv2d refuses a weight without output channels: convolve one zero channel, keep none
    out = torch.nn.functional.conv2d(x, weight if rows else x.new_zeros(1, channels, kh, kw),
                                     stride=tuple(stride), padding=tuple(padding))[:, :rows]
    return _sparse_epilogue(out, bias, relu, (1, -1, 1, 1), input.dtype)
