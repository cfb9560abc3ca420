"""Global magnitude pruning for a training loop of your own, torch.optim style.

    pruner = MagnitudePruner(model, lr=0.1, weight_l2=5e-4)
    for x, y in train_loader:            # dense training
        pruner.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pruner.step()
    pruner.prune(10.0)                   # one global cut: 1/10 of the weights stay
    ...                                  # fine-tuning: the same loop, pruned weights stay zero

:class:`MagnitudePruner` owns the optimizer (:class:`~cvsparse.optim.ProxSGD` with λ1 = 0,
``.optimizer``: hand it to any ``torch.optim.lr_scheduler``) and the cut.  It is the baseline
of cvsparse's tables; ``cvsparse.compress(method="magnitude")`` and the command line drive the
same object, so a loop that calls it at the same points reproduces their run bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cvsparse.optim import ProxSGD
from cvsparse.params import Selector, chosen_weights, other_parameters, regularized_parameters

from .optimizer_facade import OptimizerFacade


class MagnitudePruner(OptimizerFacade):
    """SGD with weight L2 on the chosen weights, and one global magnitude cut over them.

    Args:
        model: the network; its Conv/Linear weights chosen by ``include``/``exclude``
            (:func:`cvsparse.params.select_weights`; default all) or ``names`` are pruned and
            take the L2 ``weight_l2``; every other trainable parameter is trained without it.
        lr: the learning rate.
        momentum: the momentum.
        weight_l2: the L2 strength on the pruned weights (``λ2/2 ‖W‖²``).

    Attributes:
        optimizer: the :class:`~cvsparse.optim.ProxSGD` (group 0 the chosen weights, group 1
            the rest); after :meth:`prune` its masks hold the pruned weights at zero.
        names, weights: the chosen weights' names and parameters, in module order.
        pruned: whether the cut was made.
    """

    def __init__(self, model: nn.Module, *, lr: float, momentum: float = 0.9,
                 weight_l2: float = 0.0, include: Selector | None = None,
                 exclude: Selector | None = None, names: Sequence[str] | None = None) -> None:
        names = chosen_weights(model, include, exclude, names)
        named = regularized_parameters(model, names)
        self.names = [n for n, _ in named]
        self.weights = [p for _, p in named]
        others = [p for _, p in other_parameters(model, names) if p.requires_grad]
        self.optimizer = ProxSGD([{"params": self.weights, "lambda2": weight_l2},
                                  {"params": others, "lambda2": 0.0}],
                                 lr=lr, momentum=momentum)
        self.pruned = False

    @torch.no_grad()
    def prune(self, target_compression: float) -> None:
        """Zero, and hold at zero from now on, the ``round((1 − 1/target_compression) · n)``
        weights of smallest magnitude among all ``n`` chosen ones — the global L1 cut of
        ``torch.nn.utils.prune.global_unstructured`` — in place, whatever the weights' memory
        layout; their momentum is zeroed with them."""
        if not target_compression >= 1:
            raise ValueError(f"target_compression must be >= 1, got {target_compression!r}")
        magnitudes = torch.cat([p.detach().abs().reshape(-1) for p in self.weights])
        cut = round((1 - 1 / target_compression) * magnitudes.numel())
        keep = torch.ones_like(magnitudes, dtype=torch.bool)
        if cut:
            keep[torch.topk(magnitudes, k=cut, largest=False).indices] = False
        start = 0
        for p in self.weights:
            mask = keep[start:start + p.numel()].view(p.shape)
            start += p.numel()
            p.mul_(mask)
            state = self.optimizer.state[p]
            state["mask"] = p != 0   # in the weight's layout, as the fused step reads it
            if "momentum_buffer" in state:
                state["momentum_buffer"].mul_(mask)
        self.pruned = True

    def compression(self) -> float:
        """Elements over nonzeros of the chosen weights (inf when all are zero)."""
        total = sum(p.numel() for p in self.weights)
        nonzero = sum(int(torch.count_nonzero(p)) for p in self.weights)
        return total / nonzero if nonzero else float("inf")

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "pruned": self.pruned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.pruned = state["pruned"]
