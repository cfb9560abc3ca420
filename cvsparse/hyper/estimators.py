"""Estimators of ``p ≈ H_F⁻¹ ∇cv`` for the implicit hypergradient (docs/method.md §3).

The inner problem is over every trainable tensor the losses depend on: the regularized weights
``W`` and the unregularized tensors ``u`` (biases, normalization affine parameters, layers left
dense).  ``H`` is the Hessian of ``e = train data loss + Σ_l λ2_l/2·‖W_l‖²`` over ``θ = (W, u)``
(the L1 term has no curvature on the free set), restricted to the free set
``F = {w ≠ 0} ∪ u``: every vector is zero off ``F``, and every Hessian-vector product is taken
as ``mask ⊙ H (mask ⊙ v)``.  Solving with the whole of ``H`` gives the regularized block of the
solution the Schur complement of ``H_uu``; holding ``u`` fixed (solving with ``H_WW`` alone)
is wrong wherever ``W`` and ``u`` are coupled.

Each estimator takes a :class:`Problem` and the right-hand side ``∇cv`` (a list shaped like
``Problem.params``, already zero off ``F``) and returns ``(vectors, precond)``:
``p = precond ⊙ vectors`` on the regularized tensors (the first ``Problem.n_regularized``
entries; ``precond`` is ``None`` except for ``diagonal``, so that the division fuses into
``mixed_partial_dot``).  What an estimator had to approximate (clipped curvature, a stopped
solve) goes into ``Problem.diagnostics``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

Vectors = list[Tensor]
Estimate = tuple[Vectors, Vectors | None]
CURVATURES = ("hutchinson", "fisher", "exact")
EXACT_MAX_ELEMENTS = 20_000  # "exact" diagonal: one HVP per free weight, for tiny models only


@dataclass
class Problem:
    """The inner problem at the current parameters.

    Attributes:
        params: the tensors of θ (requiring grad): the ``n_regularized`` regularized tensors
            first, then the unregularized ones.
        free: one bool tensor per entry of ``params``, True on the free set (``w ≠ 0`` for a
            regularized tensor; everywhere for an unregularized one).
        lambda2: one float per entry of ``params``: the L2 strength of each regularized tensor,
            0 for the unregularized ones.
        train_loss: zero-argument closure returning the scalar training data loss.
        n_regularized: how many leading entries of ``params`` are regularized.
        diagnostics: filled by the estimator (see :func:`cvsparse.hyper.hypergradient`).
        reduce: averages gradient-shaped tensors over the ranks of a data-parallel run
            (applied to Hessian-vector products and Fisher gradients); None in one process.
    """

    params: list[Tensor]
    free: list[Tensor]
    lambda2: list[float]
    train_loss: Callable[[], Tensor]
    n_regularized: int
    diagnostics: dict[str, Any] = field(default_factory=dict)
    reduce: Callable[[Vectors], Vectors] | None = None

    def reduced(self, vectors: Vectors) -> Vectors:
        """``vectors`` averaged over the ranks (themselves without ``reduce``)."""
        return vectors if self.reduce is None else self.reduce(vectors)

    def mask(self, vectors: Vectors) -> Vectors:
        """``vectors`` with every component off the free set set to zero."""
        return [v * m for v, m in zip(vectors, self.free, strict=True)]

    def regularized_block(self) -> Problem:
        """The same problem over the regularized tensors alone (the unregularized ones held
        fixed): what a diagonal curvature needs, since ``diag(H)`` on ``W`` is ``diag(H_WW)``."""
        n = self.n_regularized
        return Problem(self.params[:n], self.free[:n], self.lambda2[:n], self.train_loss, n,
                       self.diagnostics, self.reduce)

    def training_gradient(self, *, create_graph: bool) -> tuple[Tensor | None, ...]:
        """Gradient of ``train_loss()`` w.r.t. ``params`` (``None`` for unused tensors)."""
        loss = scalar_loss("train_loss", self.train_loss())
        return torch.autograd.grad(loss, self.params, create_graph=create_graph,
                                   allow_unused=True)


class HessianVectorProduct:
    """Products with ``H_F`` by double backward through one evaluation of ``train_loss``.

    Building it costs one forward and backward (with graph); each product one more backward.
    """

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self._grads = problem.training_gradient(create_graph=True)

    def data(self, vectors: Vectors) -> Vectors:
        """``mask ⊙ H_data (mask ⊙ v)``: the data-loss Hessian only (no L2 term)."""
        vectors = self.problem.mask(vectors)
        pairs = [(g, v) for g, v in zip(self._grads, vectors, strict=True)
                 if g is not None and g.requires_grad]
        if not pairs:
            return [torch.zeros_like(v) for v in vectors]
        outputs, grad_outputs = zip(*pairs, strict=True)
        products = torch.autograd.grad(outputs, self.problem.params, grad_outputs=grad_outputs,
                                       retain_graph=True, allow_unused=True)
        return self.problem.mask(self.problem.reduced(
            [torch.zeros_like(v) if h is None else h.detach()
             for h, v in zip(products, vectors, strict=True)]))

    def __call__(self, vectors: Vectors) -> Vectors:
        """``mask ⊙ (H_data + λ2_l·I)(mask ⊙ v)``: the Hessian of ``e`` on the free set."""
        products = self.data(vectors)
        vectors = self.problem.mask(vectors)
        return [h + lam * v for h, v, lam in
                zip(products, vectors, self.problem.lambda2, strict=True)]


def identity(problem: Problem, rhs: Vectors) -> Estimate:
    """``p = ∇cv`` (H ≈ I; the scale is absorbed by the hyper learning rate).  No HVP."""
    return rhs, None


def diagonal(
    problem: Problem, rhs: Vectors, *, curvature: str = "hutchinson", samples: int = 1,
    damping: float = 1e-3,
) -> Estimate:
    """``p_i = ∇cv_i / (h_i + λ2_l + δ)`` on the regularized tensors, ``h`` a diagonal
    curvature of the training data loss (the coupling with other tensors is ignored).

    ``curvature``:

    - ``"hutchinson"``: ``mean_s z_s ⊙ H z_s`` over ``samples`` Rademacher vectors ``z_s``
      (one HVP each), an unbiased estimate of ``diag(H)``.
    - ``"fisher"``: the running mean, over ``samples`` evaluations of ``train_loss`` (each may
      draw its own mini-batch), of the squared mini-batch gradient ``g_s ⊙ g_s``.  No HVP.  It is
      the Fisher information of the mini-batch mean loss, a Gauss–Newton proxy that is ≥ 0 by
      construction; near a stationary point it is about the per-sample Fisher divided by the
      batch size, so it underestimates the curvature and ``λ2 + δ`` dominates where it is small.
    - ``"exact"``: the true diagonal, one HVP per free weight (tiny models only, for tests).

    Whatever the curvature, negative estimates (possible for ``hutchinson`` and ``exact`` on a
    non-convex loss) are clipped to 0 and counted in ``diagnostics["clipped"]``.  ``damping``
    δ ≥ 0, and δ > 0 is required when some λ2_l = 0 (the denominator could vanish).
    """
    if damping <= 0 and min(problem.lambda2[:problem.n_regularized]) <= 0:
        raise ValueError("diagonal estimator: damping must be > 0 when some lambda2 is 0")
    block = problem.regularized_block()
    if curvature == "hutchinson":
        h = _hutchinson(block, samples)
    elif curvature == "fisher":
        h = _fisher(block, samples)
    else:
        h = _exact_diagonal(block)
    negative = sum(int(((d < 0) & m).sum()) for d, m in zip(h, block.free, strict=True))
    problem.diagnostics["clipped"] = negative
    precond = [torch.where(m, 1.0 / (d.clamp(min=0) + lam + damping), torch.zeros_like(d))
               for d, m, lam in zip(h, block.free, block.lambda2, strict=True)]
    return rhs[:block.n_regularized], precond


def neumann(problem: Problem, rhs: Vectors, *, iters: int = 10, alpha: float = 0.01) -> Estimate:
    """``p = α Σ_{k=0..K} (I − αH)^k ∇cv`` with K = ``iters`` HVPs.

    Converges to ``H⁻¹∇cv`` when ``0 < α < 2/λ_max(H)`` and H is positive definite on F (use
    about the weight learning rate).  ``diagnostics["iterations"]`` is K.
    """
    term = list(rhs)
    total = list(rhs)
    if iters:
        hvp = HessianVectorProduct(problem)
        for _ in range(iters):
            term = torch._foreach_add(term, hvp(term), alpha=-alpha)
            total = torch._foreach_add(total, term)
    problem.diagnostics["iterations"] = iters
    return torch._foreach_mul(total, alpha), None


def cg(
    problem: Problem, rhs: Vectors, *, iters: int = 20, damping: float = 1e-3, tol: float = 1e-6,
) -> Estimate:
    """Solve ``(H + δI) p = ∇cv`` by at most ``iters`` conjugate-gradient steps (one HVP each),
    stopping when ``‖r‖ ≤ tol·‖∇cv‖``.

    On non-positive curvature along a search direction (H not positive definite on F) the solve
    stops and returns the current iterate, or ``∇cv`` itself (the identity estimator) if that
    happens at the first step; either way a ``RuntimeWarning`` says so and
    ``diagnostics["fallback"]`` is ``"partial"`` or ``"identity"`` (``"none"`` otherwise).
    ``diagnostics`` also holds ``iterations``, ``relative_residual`` and ``converged``.
    """
    x = [torch.zeros_like(r) for r in rhs]
    residual = list(rhs)
    rr = rr0 = _dot(residual, residual)
    stop = tol * tol * rr
    report = problem.diagnostics
    report.update(iterations=0, relative_residual=0.0 if rr == 0 else 1.0,
                  converged=rr == 0, fallback="none")
    if rr == 0 or iters == 0:
        return x, None
    hvp = HessianVectorProduct(problem)
    direction = list(residual)
    for k in range(iters):
        product = torch._foreach_add(hvp(direction), direction, alpha=damping)
        curvature = _dot(direction, product)
        if not curvature > 0:
            report["fallback"] = "partial" if k else "identity"
            warnings.warn(f"cg: non-positive curvature {curvature:.3g} at step {k + 1}; "
                          + (f"returning the iterate of step {k}" if k else
                             "falling back to the identity estimator (p = grad cv)"),
                          RuntimeWarning, stacklevel=3)
            return (x if k else list(rhs)), None
        step = rr / curvature
        x = torch._foreach_add(x, direction, alpha=step)
        residual = torch._foreach_add(residual, product, alpha=-step)
        rr_next = _dot(residual, residual)
        report.update(iterations=k + 1, relative_residual=math.sqrt(rr_next / rr0))
        if rr_next <= stop:
            report["converged"] = True
            break
        direction = torch._foreach_add(residual, direction, alpha=rr_next / rr)
        rr = rr_next
    return x, None


ESTIMATORS: dict[str, Callable[..., Estimate]] = {
    "identity": identity, "diagonal": diagonal, "neumann": neumann, "cg": cg,
}


def check_options(estimator: str, opts: dict[str, object]) -> Callable[..., Estimate]:
    """The estimator function named ``estimator`` after validating ``opts`` for it
    (unknown name, unknown option or bad value → ValueError naming it)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of "
                         f"{', '.join(ESTIMATORS)}")
    fn = ESTIMATORS[estimator]
    allowed = [name for name, prm in inspect.signature(fn).parameters.items()
               if prm.kind is inspect.Parameter.KEYWORD_ONLY]
    for name, value in opts.items():
        if name not in allowed:
            raise ValueError(f"estimator {estimator!r} has no option {name!r}; its options: "
                             f"{', '.join(allowed) or 'none'}")
        _OPTION_CHECKS[name](name, value)
    return fn


def scalar_loss(name: str, value: object) -> Tensor:
    """``value`` if it is a one-element tensor that depends on the parameters."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(f"{name}() must return a scalar tensor, got {value!r:.80}")
    if not value.requires_grad:
        raise ValueError(f"{name}() returned a tensor that does not require grad (computed "
                         "under no_grad, or not from the parameters?)")
    return value.reshape(())


def _hutchinson(problem: Problem, samples: int) -> Vectors:
    hvp = HessianVectorProduct(problem)
    total = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in problem.params]
    for _ in range(samples):
        z = problem.mask([torch.randint_like(t, 2).mul_(2).sub_(1) for t in total])
        total = torch._foreach_add(total, torch._foreach_mul(z, hvp.data(z)))
    return torch._foreach_div(total, float(samples))


def _fisher(problem: Problem, samples: int) -> Vectors:
    total = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in problem.params]
    for _ in range(samples):
        grads = problem.training_gradient(create_graph=False)
        grads = problem.reduced([torch.zeros_like(t) if g is None else g.detach()
                                 for g, t in zip(grads, total, strict=True)])
        squares = [g.square() for g in grads]
        total = torch._foreach_add(total, squares)
    return problem.mask(torch._foreach_div(total, float(samples)))


def _exact_diagonal(problem: Problem) -> Vectors:
    count = sum(int(m.sum()) for m in problem.free)
    if count > EXACT_MAX_ELEMENTS:
        raise ValueError(f"curvature='exact' needs one HVP per free weight ({count} > "
                         f"{EXACT_MAX_ELEMENTS}); use 'hutchinson' or 'fisher'")
    hvp = HessianVectorProduct(problem)
    diag = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in problem.params]
    for t, mask in enumerate(problem.free):
        for i in mask.reshape(-1).nonzero().reshape(-1).tolist():
            unit = [torch.zeros_like(d) for d in diag]
            unit[t].view(-1)[i] = 1
            diag[t].view(-1)[i] = hvp.data(unit)[t].reshape(-1)[i]
    return diag


def _dot(a: Vectors, b: Vectors) -> float:
    return float(sum((x.reshape(-1).double() @ y.reshape(-1).double()) for x, y in zip(a, b,
                                                                                     strict=True)))


def _int_at_least(minimum: int) -> Callable[[str, object], None]:
    def check(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return check


def _float_check(*, positive: bool) -> Callable[[str, object], None]:
    def check(name: str, value: object) -> None:
        ok = (not isinstance(value, bool) and isinstance(value, (int, float))
              and math.isfinite(value) and (value > 0 if positive else value >= 0))
        if not ok:
            raise ValueError(f"{name} must be a finite float {'>' if positive else '>='} 0, "
                             f"got {value!r}")
    return check


def _curvature_check(name: str, value: object) -> None:
    if value not in CURVATURES:
        raise ValueError(f"{name} must be one of {', '.join(CURVATURES)}, got {value!r}")


_OPTION_CHECKS: dict[str, Callable[[str, object], None]] = {
    "iters": _int_at_least(0), "samples": _int_at_least(1), "curvature": _curvature_check,
    "damping": _float_check(positive=False), "tol": _float_check(positive=False),
    "alpha": _float_check(positive=True),
}
