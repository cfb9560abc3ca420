"""The calibrated validation objective against a brute-force minimization and finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from cvsparse.hyper.objectives import best_logit_scale, validation_loss


def batch(seed: int, scale: float, n: int = 300, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, classes, (n,), generator=g)
    right = torch.rand(n, generator=g) < 0.7          # 70% confidently right, the rest noise
    target[right] = logits[right].argmax(1)
    return logits, target


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0, 40.0])
def test_best_scale_matches_a_bounded_scalar_minimization(scale):
    logits, target = batch(0, scale)

    def ce_at(log_a: float) -> float:
        return float(F.cross_entropy(torch.exp(torch.tensor(log_a)) * logits, target))

    oracle = minimize_scalar(ce_at, bounds=(-6.9, 6.9), method="bounded",
                             options={"xatol": 1e-10})
    a = best_logit_scale(logits, target)
    assert a == pytest.approx(float(torch.exp(torch.tensor(oracle.x))), rel=1e-4)


def test_overconfident_logits_are_cooled_and_the_scale_derivative_vanishes():
    logits, target = batch(1, 40.0)
    a = best_logit_scale(logits, target)
    assert a < 1.0

    def ce(scale: float) -> float:
        return float(F.cross_entropy(scale * logits, target))

    eps, h = 1e-6, 1e-4
    slope = (ce(a * (1 + eps)) - ce(a * (1 - eps))) / (2 * eps * a)
    curvature = (ce(a * (1 + h)) - 2 * ce(a) + ce(a * (1 - h))) / (h * a) ** 2
    assert curvature > 0
    # The solver stops once its Newton step in log a is below 1e-10, so a is within ~1e-10·a
    # of the minimizer and |CE'(a)| ≲ 1e-10·a·CE''(a).  The central difference adds the
    # rounding of two float64 means of n = 300 terms (each at most n·2⁻⁵³ relative), divided
    # by 2·eps·a; its truncation error, (eps·a)²·|CE'''(a)|/6, is below 1e-11 here.
    rounding = 2 * len(target) * 2.0**-53 * ce(a) / (2 * eps * a)
    assert abs(slope) < 1e-10 * a * curvature + rounding


def test_calibrated_gradient_is_the_gradient_of_the_minimized_loss():
    """Envelope theorem: d/dz min_a CE(a·z) equals the autograd gradient at a fixed a*."""
    logits, target = batch(2, 6.0, n=50)
    z = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(validation_loss(z, target, "calibrated_ce"), z)
    direction = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3),
                            dtype=torch.float64)
    eps = 1e-5

    def minimized(zz):
        return float(F.cross_entropy(best_logit_scale(zz, target) * zz, target))

    fd = (minimized(logits + eps * direction) - minimized(logits - eps * direction)) / (2 * eps)
    assert float((grad * direction).sum()) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_plain_objective_is_cross_entropy_and_unknown_is_rejected():
    logits, target = batch(4, 2.0)
    assert torch.equal(validation_loss(logits, target, "ce"), F.cross_entropy(logits, target))
    with pytest.raises(ValueError, match="unknown validation objective"):
        validation_loss(logits, target, "hinge")
