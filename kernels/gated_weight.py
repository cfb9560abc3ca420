"""``cvsparse_triton::gated_weight`` and its backward: AutoPrune's ``w · 1[m > 0]``
(docs/method.md §6).

``aux`` (``m``) is shaped like ``weight`` (one gate per weight) or ``(weight.shape[0],)`` (one
gate per output unit, broadcast over the other dims).  Forward: one elementwise launch.
Backward, fused in one pass over ``grad`` and ``weight``: per weight, one elementwise launch;
per unit, each program owns a tile of ``ROWS`` output rows, walks their columns in chunks of
``COLS``, writes ``grad_w`` and accumulates the row sums of ``g·sgn(w)`` (or ``g·w``) in opmath.
Outputs are contiguous, in the dtypes of ``weight`` and ``aux``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cvsparse.ops.schemas import STE_CODES

from . import _launch
from ._launch import scalar


@triton.jit
def _gate_kernel(w_ptr, aux_ptr, out_ptr, numel, inner,
                 PER_UNIT: tl.constexpr, OPMATH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    m = tl.load(aux_ptr + (offs // inner if PER_UNIT else offs), mask=inb, other=0.0)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0)
    out = w.to(OPMATH) * (m > 0).to(OPMATH)  # a product, like weight * gate: inf·0 is NaN
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _ste_derivative(m, slope, STE: tl.constexpr):
    """s'(m) of the straight-through estimator ``STE`` (codes of ``STE_CODES``)."""
    if STE == 0:
        ds = tl.full(m.shape, 1.0, m.dtype)
    elif STE == 1:
        ds = tl.where(m > 0, 1.0, scalar(slope, m.dtype)).to(m.dtype)
    else:
        ds = 1.0 / (1.0 + tl.exp(-m))
    return ds


@triton.jit
def _gate_coefficient(w, SIGN_RULE: tl.constexpr):
    """sgn(w) (proposed rule) or w (regular BNN rule)."""
    if SIGN_RULE:
        coef = (w > 0).to(w.dtype) - (w < 0).to(w.dtype)
    else:
        coef = w
    return coef


@triton.jit
def _gate_backward_kernel(g_ptr, w_ptr, aux_ptr, gw_ptr, ga_ptr, numel, slope: tl.float64,
                          STE: tl.constexpr, SIGN_RULE: tl.constexpr, OPMATH: tl.constexpr,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(OPMATH)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(OPMATH)
    m = tl.load(aux_ptr + offs, mask=inb, other=0.0).to(OPMATH)
    tl.store(gw_ptr + offs, (g * (m > 0).to(OPMATH)).to(gw_ptr.dtype.element_ty), mask=inb)
    grad_aux = g * _gate_coefficient(w, SIGN_RULE) * _ste_derivative(m, slope, STE)
    tl.store(ga_ptr + offs, grad_aux.to(ga_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _unit_gate_backward_kernel(g_ptr, w_ptr, aux_ptr, gw_ptr, ga_ptr, rows, inner,
                               slope: tl.float64, STE: tl.constexpr, SIGN_RULE: tl.constexpr,
                               OPMATH: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = r < rows
    m = tl.load(aux_ptr + r, mask=live, other=0.0).to(OPMATH)
    gate = (m > 0).to(OPMATH)[:, None]
    acc = tl.zeros([ROWS, COLS], dtype=OPMATH)
    for start in range(0, inner, COLS):
        c = start + tl.arange(0, COLS)
        idx = r[:, None] * inner + c[None, :]
        inb = live[:, None] & (c < inner)[None, :]
        g = tl.load(g_ptr + idx, mask=inb, other=0.0).to(OPMATH)
        w = tl.load(w_ptr + idx, mask=inb, other=0.0).to(OPMATH)
        tl.store(gw_ptr + idx, (g * gate).to(gw_ptr.dtype.element_ty), mask=inb)
        acc += g * _gate_coefficient(w, SIGN_RULE)
    grad_aux = tl.sum(acc, axis=1) * _ste_derivative(m, slope, STE)
    tl.store(ga_ptr + r, grad_aux.to(ga_ptr.dtype.element_ty), mask=live)


def _per_unit(weight: Tensor, aux: Tensor) -> bool:
    """True for one gate per output unit, False for one per weight; raises on other shapes."""
    if aux.shape == weight.shape:
        return False
    if weight.dim() >= 1 and aux.shape == weight.shape[:1]:
        return True
    raise ValueError(f"aux must have the shape of weight {tuple(weight.shape)} or "
                     f"({weight.shape[0] if weight.dim() else 1},), got {tuple(aux.shape)}")


def _check(weight: Tensor, aux: Tensor, grad: Tensor | None = None) -> bool:
    """Dtypes, devices and shapes the kernels rely on; returns :func:`_per_unit`."""
    for name, t in (("weight", weight), ("aux", aux), ("grad", grad)):
        if t is not None:
            _launch.tl_dtype(name, t)
            if t.device != weight.device:
                raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")
    if grad is not None and grad.shape != weight.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)} but weight has "
                         f"{tuple(weight.shape)}")
    _launch.check_device(weight.device)
    return _per_unit(weight, aux)


def _opmath(*tensors: Tensor) -> tl.dtype:
    """float64 if any input is float64, else float32."""
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


@torch.library.custom_op("cvsparse_triton::gated_weight", mutates_args=(),
                         schema=_launch.schema("gated_weight"))
def gated_weight(weight: Tensor, aux: Tensor, ste: int, slope: float, sign_rule: bool) -> Tensor:
    """``weight · 1[aux > 0]``, contiguous, in ``weight``'s dtype (``ste``, ``slope`` and
    ``sign_rule`` only shape the backward)."""
    per_unit = _check(weight, aux)
    weight, aux = weight.contiguous(), aux.contiguous()
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    numel = weight.numel()
    if numel == 0:
        return out
    block = _launch.block_size()
    _gate_kernel[(triton.cdiv(numel, block),)](
        weight, aux, out, numel, numel // weight.shape[0] if per_unit else 1,
        PER_UNIT=per_unit, OPMATH=_opmath(weight), BLOCK=block,
    )
    return out


@gated_weight.register_fake
def _(weight, aux, ste, slope, sign_rule):
    _per_unit(weight, aux)
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


@torch.library.custom_op("cvsparse_triton::gated_weight_backward", mutates_args=(),
                         schema=_launch.schema("gated_weight_backward"))
def gated_weight_backward(grad: Tensor, weight: Tensor, aux: Tensor, ste: int, slope: float,
                          sign_rule: bool) -> tuple[Tensor, Tensor]:
    """``(grad·h(aux), [Σ over each output row of] grad·(sgn(w) or w) · s'(aux))`` in the
    dtypes of ``weight`` and ``aux`` (``ste`` a code of ``STE_CODES``, ``slope`` the LeakyReLU
    slope for ``aux <= 0``, ``sign_rule`` the proposed rule)."""
    per_unit = _check(weight, aux, grad)
    _check_ste(ste)
    grad, weight, aux = grad.contiguous(), weight.contiguous(), aux.contiguous()
    grad_w, grad_aux = _backward_outputs(weight, aux)
    if weight.numel() == 0:
        return grad_w, grad_aux.zero_()
    flags = dict(STE=ste, SIGN_RULE=bool(sign_rule), OPMATH=_opmath(grad, weight, aux))
    block = _launch.block_size()
    if not per_unit:
        _gate_backward_kernel[(triton.cdiv(weight.numel(), block),)](
            grad, weight, aux, grad_w, grad_aux, weight.numel(), float(slope),
            BLOCK=block, **flags,
        )
        return grad_w, grad_aux
    rows = weight.shape[0]
    inner = weight.numel() // rows
    cols = min(triton.next_power_of_2(inner), block)
    tile_rows = min(block // cols, triton.next_power_of_2(rows))
    _unit_gate_backward_kernel[(triton.cdiv(rows, tile_rows),)](
        grad, weight, aux, grad_w, grad_aux, rows, inner, float(slope),
        ROWS=tile_rows, COLS=cols, **flags,
    )
    return grad_w, grad_aux


@gated_weight_backward.register_fake
def _(grad, weight, aux, ste, slope, sign_rule):
    _per_unit(weight, aux)
    _check_ste(ste)
    return _backward_outputs(weight, aux)


def _check_ste(ste: int) -> None:
    if ste not in STE_CODES.values():
        raise ValueError(f"ste must be one of the codes {STE_CODES}, got {ste}")


def _backward_outputs(weight: Tensor, aux: Tensor) -> tuple[Tensor, Tensor]:
    """Uninitialized contiguous ``(grad_w, grad_aux)`` shaped and typed like the inputs."""
    return (torch.empty(weight.shape, dtype=weight.dtype, device=weight.device),
            torch.empty(aux.shape, dtype=aux.dtype, device=aux.device))


def _setup_context(ctx, inputs, output) -> None:
    weight, aux, ste, slope, sign_rule = inputs
    ctx.save_for_backward(weight, aux)
    ctx.ste, ctx.slope, ctx.sign_rule = ste, slope, sign_rule


def _backward(ctx, grad: Tensor):
    weight, aux = ctx.saved_tensors
    if not ctx.needs_input_grad[1]:   # gates held fixed: grad_w = g · h(m), the forward on g
        return gated_weight(grad.contiguous(), aux, ctx.ste, ctx.slope, ctx.sign_rule), \
            None, None, None, None
    grad_w, grad_aux = torch.ops.cvsparse_triton.gated_weight_backward(
        grad.contiguous(), weight, aux, ctx.ste, ctx.slope, ctx.sign_rule
    )
    return grad_w, grad_aux, None, None, None


gated_weight.register_autograd(_backward, setup_context=_setup_context)
