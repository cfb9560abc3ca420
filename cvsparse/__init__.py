"""cvsparse: compress CNNs with sparse regularization whose strengths are learned.

``cvsparse.compress(model, train_loader, val_loader, ...)`` (:mod:`cvsparse.api`) compresses
any model on any data.  Subpackages: ``ops`` (fused operators), ``optim`` (ProxSGD), ``hyper``
(hypergradients and the λ optimizer), ``nn`` (AutoPrune gated layers), ``models``, ``data``,
``metrics``, ``train``, ``methods``; ``cli`` is the ``cvsparse`` command.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["AutoPruneOptimizer", "AutoPruneSettings", "CVGradOptimizer", "CVGradSettings",
           "CompressionResult", "MagnitudePruner", "compress"]


def __getattr__(name: str) -> Any:
    """``compress``, ``CompressionResult`` and the step-level ``CVGradOptimizer`` /
    ``AutoPruneOptimizer`` with their settings and ``MagnitudePruner``, imported on first use
    (``import cvsparse`` stays light for the operators and the command line)."""
    if name in ("CVGradOptimizer", "CVGradSettings"):
        from cvsparse.methods import cvgrad_optimizer

        return getattr(cvgrad_optimizer, name)
    if name in ("AutoPruneOptimizer", "AutoPruneSettings"):
        from cvsparse.methods import autoprune_optimizer

        return getattr(autoprune_optimizer, name)
    if name == "MagnitudePruner":
        from cvsparse.methods.magnitude_pruner import MagnitudePruner

        return MagnitudePruner
    if name in __all__:
        from cvsparse import api

        return getattr(api, name)
    raise AttributeError(f"module 'cvsparse' has no attribute {name!r}")
