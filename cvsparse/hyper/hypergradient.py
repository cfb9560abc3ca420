"""The implicit hypergradient ``dcv/dλ`` of the validation loss (SPEC §3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import ops
from .estimators import Problem, check_options, scalar_loss

Lambda = float | Tensor


def hypergradient(
    params: Sequence[Tensor],
    lambda1: Lambda,
    lambda2: Lambda,
    train_loss: Callable[[], Tensor],
    val_loss: Callable[[], Tensor],
    estimator: str = "identity",
    **opts: object,
) -> tuple[Tensor, Tensor]:
    """``(dcv/dλ1, dcv/dλ2)`` at the current weights by the implicit function theorem.

    On the free set ``F = {w ≠ 0}``: ``p ≈ H_F⁻¹ ∇cv`` (``H`` the Hessian of the training data
    loss plus ``Σ λ2_l/2‖W_l‖²``; the L1 term has no curvature on F), then
    ``dcv/dλ1_l = −Σ_{i∈l} p_i·sign(w_i)`` and ``dcv/dλ2_l = −Σ_{i∈l} p_i·w_i``
    (one :func:`cvsparse.ops.mixed_partial_dot` call).  Neither weights nor ``.grad`` change.

    Args:
        params: the n regularized tensors (requiring grad).
        lambda1, lambda2: the strengths ≥ 0: a float (global), or a tensor with 1 value
            (global) or n values (one per tensor).  ``lambda1`` only sets the result's shape
            (the formula does not depend on it); ``lambda2`` enters ``H``.
        train_loss, val_loss: zero-argument closures returning the scalar data loss (no
            regularizer) of a training / validation batch, differentiable w.r.t. ``params``.
            ``val_loss`` is evaluated once; ``train_loss`` once if the estimator needs
            curvature (not for ``identity``).  Put the model in the wanted mode beforehand.
        estimator: ``"identity"``, ``"diagonal"`` (options ``curvature`` =
            ``"hutchinson"|"fisher"|"exact"``, ``samples``, ``damping``), ``"neumann"``
            (``iters``, ``alpha``) or ``"cg"`` (``iters``, ``damping``, ``tol``); see
            :mod:`cvsparse.hyper.estimators` for defaults.

    Returns:
        Two tensors, each shaped like its λ: a 0-dim float64 tensor for a float λ (on the
        params' device; no host sync), else λ's shape, dtype and device.  A global λ gets the
        sum over tensors.

    Raises:
        ValueError: unknown estimator or option, bad option value, bad λ, empty ``params``, a
            closure not returning a differentiable scalar.
    """
    fn = check_options(estimator, opts)
    params = list(params)
    if not params:
        raise ValueError("params must hold at least one tensor")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise ValueError(f"params[{i}] must be a tensor that requires grad")
    n = len(params)
    _per_tensor("lambda1", lambda1, n)
    l2 = _per_tensor("lambda2", lambda2, n)
    with torch.enable_grad():
        free = [p.detach() != 0 for p in params]
        problem = Problem(params, free, l2.tolist(), train_loss)
        val = scalar_loss("val_loss", val_loss())
        grads = torch.autograd.grad(val, params, allow_unused=True)
        rhs = problem.mask([torch.zeros_like(p) if g is None else g.detach()
                            for g, p in zip(grads, params, strict=True)])
        vectors, precond = fn(problem, rhs, **opts)
    rows = ops.mixed_partial_dot(
        [p.detach().contiguous() for p in params], [v.contiguous() for v in vectors],
        None if precond is None else [c.contiguous() for c in precond],
    )
    return _like(lambda1, -rows[:, 0]), _like(lambda2, -rows[:, 1])


def _per_tensor(name: str, value: Lambda, n: int) -> Tensor:
    """``value`` as float64 ``(n,)`` on the CPU after checking it (ValueError naming it)."""
    if isinstance(value, Tensor):
        if value.dim() > 1 or value.numel() not in (1, n):
            raise ValueError(f"{name} must be a float or a tensor of 1 or {n} values, got shape "
                             f"{tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {value.dtype}")
        values = value.detach().to("cpu", torch.float64).reshape(-1).expand(n)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        values = torch.full((n,), float(value), dtype=torch.float64)
    else:
        raise ValueError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not bool((values.isfinite() & (values >= 0)).all()):
        raise ValueError(f"{name} must be finite and >= 0, got {values.tolist()}")
    return values


def _like(lam: Lambda, column: Tensor) -> Tensor:
    """Per-tensor hypergradients ``column`` (n,) shaped like ``lam`` (summed when global)."""
    if not isinstance(lam, Tensor):
        return column.sum().to(torch.float64)
    out = column.sum() if lam.numel() == 1 else column
    return out.reshape(lam.shape).to(dtype=lam.dtype, device=lam.device)
