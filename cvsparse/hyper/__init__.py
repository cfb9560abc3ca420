"""Hypergradients of the validation loss w.r.t. the regularization strengths
(docs/method.md §3) and the optimizer that follows them.

- :func:`hypergradient` — ``(dcv/dλ1, dcv/dλ2)`` by the implicit function theorem, with the
  ``identity``, ``diagonal``, ``neumann`` or ``cg`` estimator of ``H_F⁻¹ ∇cv``.
- :class:`LambdaOptimizer` — SGD / Adam steps on λ or log λ, clipped, kept ≥ 0.
- :class:`CompressionFloor` — the multiplier of an optional "compression ≥ C" constraint on λ1.
- :class:`AccuracyConstraint` — "validation accuracy ≥ reference − allowed drop": which
  support a constrained run keeps, and when its compression drive stops.
"""

from .accuracy_constraint import AccuracyConstraint
from .compression_floor import CompressionFloor
from .estimators import ESTIMATORS
from .hypergradient import hypergradient
from .lambda_optimizer import LambdaOptimizer

__all__ = ["hypergradient", "AccuracyConstraint", "CompressionFloor", "LambdaOptimizer",
           "ESTIMATORS"]
