"""The implicit hypergradient ``dcv/dλ`` of the validation loss (docs/method.md §3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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
    *,
    estimator: str = "identity",
    unregularized: Sequence[Tensor] = (),
    diagnostics: dict[str, Any] | None = None,
    reduce: Callable[[Sequence[Tensor]], list[Tensor]] | None = None,
    **opts: object,
) -> tuple[Tensor, Tensor]:
    """``(dcv/dλ1, dcv/dλ2)`` at the current parameters by the implicit function theorem.

    The inner problem is over ``θ = (W, u)``: the regularized tensors ``W`` (``params``) and
    the tensors ``u`` the losses depend on that carry no penalty (``unregularized``).  On the
    free set ``F = {w ≠ 0} ∪ u``: ``p ≈ H_F⁻¹ ∇_θ cv`` (``H`` the Hessian over θ of the
    training data loss plus ``Σ λ2_l/2‖W_l‖²``; the L1 term has no curvature on F), then, since
    the mixed partial ``∂²e/∂θ∂λ`` is zero on ``u``,
    ``dcv/dλ1_l = −Σ_{i∈l} p_i·sign(w_i)`` and ``dcv/dλ2_l = −Σ_{i∈l} p_i·w_i``
    (one :func:`cvsparse.ops.mixed_partial_dot` call over ``W``).  Leaving out a ``u`` that is
    coupled to ``W`` (a bias after uncentred inputs, BatchNorm) solves with ``H_WW`` instead of
    its Schur complement and can be tens of percent off.  Neither parameters nor ``.grad``
    change.

    Args:
        params: the n regularized tensors (requiring grad).
        lambda1, lambda2: the strengths ≥ 0: a float (global), or a tensor with 1 value
            (global) or n values (one per tensor).  ``lambda1`` only sets the result's shape
            (the formula does not depend on it); ``lambda2`` enters ``H``.
        train_loss, val_loss: zero-argument closures returning the scalar data loss (no
            regularizer) of a training / validation batch, differentiable w.r.t. ``params``
            and ``unregularized``.  ``val_loss`` is evaluated once; ``train_loss`` once if
            the estimator needs curvature (not for ``identity``; ``samples`` times for the
            Fisher curvature).  Put the model in the wanted mode beforehand.
        estimator: ``"identity"``, ``"diagonal"`` (options ``curvature`` =
            ``"hutchinson"|"fisher"|"exact"``, ``samples``, ``damping``), ``"neumann"``
            (``iters``, ``alpha``) or ``"cg"`` (``iters``, ``damping``, ``tol``); see
            :mod:`cvsparse.hyper.estimators` for defaults.  ``identity`` and ``diagonal``
            ignore the coupling between tensors, so ``unregularized`` does not change them.
        unregularized: the trainable tensors without a penalty (requiring grad, none of them
            in ``params``); they join the linear system of ``neumann`` and ``cg``.
        diagnostics: if given, a dict that receives what the estimator reports: always
            ``estimator`` and ``free`` (the size of F); ``cg``: ``iterations``,
            ``relative_residual``, ``converged`` and ``fallback`` (``"none"``, or
            ``"partial"`` / ``"identity"`` after non-positive curvature, which also warns);
            ``neumann``: ``iterations``; ``diagonal``: ``clipped`` (free weights whose
            curvature estimate was negative and clipped to 0).
        reduce: averages a list of gradient-shaped tensors over the ranks of a data-parallel
            run (``cvsparse.train.distributed.Ranks.reduce``), where each rank's closures see
            its share of the batch: applied to ``∇cv``, to every Hessian-vector product and to
            every Fisher gradient.  None (default): one process, nothing is reduced.

    Returns:
        Two tensors, each shaped like its λ: a 0-dim float64 tensor for a float λ (on the
        params' device; no host sync), else λ's shape, dtype and device.  A global λ gets the
        sum over tensors.

    Raises:
        ValueError: unknown estimator or option, bad option value, bad λ, empty ``params``, a
            tensor not requiring grad, a tensor both regularized and unregularized, a closure
            not returning a differentiable scalar.
    """
    fn = check_options(estimator, opts)
    params = _trainable("params", params)
    if not params:
        raise ValueError("params must hold at least one tensor")
    others = _trainable("unregularized", unregularized)
    regularized = {id(p) for p in params}
    if any(id(u) in regularized for u in others):
        raise ValueError("a tensor is in both params and unregularized")
    n = len(params)
    _per_tensor("lambda1", lambda1, n)
    l2 = _per_tensor("lambda2", lambda2, n)
    everything = params + others
    with torch.enable_grad():
        free = [p.detach() != 0 for p in params] + [torch.ones_like(u, dtype=torch.bool)
                                                     for u in others]
        problem = Problem(everything, free, l2.tolist() + [0.0] * len(others), train_loss, n,
                          reduce=reduce)
        val = scalar_loss("val_loss", val_loss())
        grads = torch.autograd.grad(val, everything, allow_unused=True)
        rhs = problem.reduced([torch.zeros_like(p) if g is None else g.detach()
                               for g, p in zip(grads, everything, strict=True)])
        rhs = problem.mask(rhs)
        vectors, precond = fn(problem, rhs, **opts)
    if diagnostics is not None:
        diagnostics.clear()
        diagnostics.update(estimator=estimator, free=sum(int(m.sum()) for m in free),
                           **problem.diagnostics)
    rows = ops.mixed_partial_dot(
        [p.detach().contiguous() for p in params], [v.contiguous() for v in vectors[:n]],
        None if precond is None else [c.contiguous() for c in precond],
    )
    return _like(lambda1, -rows[:, 0]), _like(lambda2, -rows[:, 1])


def _trainable(name: str, tensors: Sequence[Tensor]) -> list[Tensor]:
    """``tensors`` as a list after checking each requires grad (ValueError naming it)."""
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor) or not t.requires_grad:
            raise ValueError(f"{name}[{i}] must be a tensor that requires grad")
    return tensors


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
