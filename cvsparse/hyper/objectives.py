"""Validation objectives ``cv`` whose hypergradient drives λ.

``ce`` is the plain ``CE_val`` (docs/method.md §1).  ``calibrated_ce`` is
``min_a CE_val(a·logits)``: the cross-entropy at the best single temperature ``1/a`` of the
batch.  Shrinking the weights of an overconfident network lowers ``CE_val`` through the logit
scale alone (a temperature effect) even while its error rises; at the optimal ``a`` the
derivative along the scale vanishes (envelope theorem), so the hypergradient of the calibrated
loss no longer rewards that.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

OBJECTIVES = ("ce", "calibrated_ce")


def best_logit_scale(logits: Tensor, target: Tensor, iters: int = 30) -> float:
    """``argmin_a CE(a·logits, target)`` for ``a > 0`` (Newton's method on ``log a``).

    Args:
        logits: ``(batch, classes)``; treated as constants.
        target: ``(batch,)`` int64 class indices.
        iters: Newton steps (the problem is convex in ``a``; ~10 usually reach 1e-10).

    Returns:
        The scale ``a`` as a float, clamped to ``[1e-3, 1e3]``.
    """
    z = logits.detach().double()
    z_true = z.gather(1, target.reshape(-1, 1)).squeeze(1)
    u = 0.0                                    # u = log a
    for _ in range(iters):
        a = math.exp(u)
        p = torch.softmax(a * z, dim=1)
        mean = (p * z).sum(1)
        grad_a = float((mean - z_true).mean())              # dCE/da
        curv_a = float(((p * z * z).sum(1) - mean * mean).mean())  # d²CE/da² ≥ 0
        grad_u = a * grad_a                                  # chain rule to log a
        curv_u = a * a * curv_a + a * grad_a
        step = grad_u / curv_u if curv_u > 0 else grad_u
        u = min(max(u - max(min(step, 1.0), -1.0), -6.9), 6.9)
        if abs(step) < 1e-10:
            break
    return math.exp(u)


def validation_loss(logits: Tensor, target: Tensor, objective: str = "ce") -> Tensor:
    """The scalar validation loss ``cv`` of a batch (differentiable w.r.t. ``logits``).

    Args:
        logits: ``(batch, classes)``.
        target: ``(batch,)`` int64.
        objective: ``"ce"`` or ``"calibrated_ce"`` (the scale is fitted, then held constant).
    """
    if objective == "ce":
        return F.cross_entropy(logits, target)
    if objective == "calibrated_ce":
        return F.cross_entropy(best_logit_scale(logits, target) * logits, target)
    raise ValueError(f"unknown validation objective {objective!r}; choose one of "
                     f"{', '.join(OBJECTIVES)}")
