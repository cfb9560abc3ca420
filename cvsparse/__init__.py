"""cvsparse: compress CNNs with sparse regularization whose strengths are learned.

Subpackages: ``ops`` (fused operators), ``optim`` (ProxSGD), ``hyper`` (hypergradients and the
λ optimizer), ``nn`` (AutoPrune gated layers), ``models``, ``data``, ``metrics``, ``train``,
``methods``; ``cli`` is the ``cvsparse`` command.
"""

__version__ = "0.1.0"
