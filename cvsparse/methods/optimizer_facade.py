"""The torch.optim-style surface the step-level objects share (``CVGradOptimizer``,
``MagnitudePruner``): ``zero_grad``, ``step`` and ``param_groups`` of the one fused optimizer
they own, ``self.optimizer``."""

from __future__ import annotations

from typing import Any

from cvsparse.optim import ProxSGD


class OptimizerFacade:
    """Delegates ``zero_grad``, ``step`` and ``param_groups`` to ``self.optimizer``."""

    optimizer: ProxSGD

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """One step of every parameter with a gradient (after ``backward``): the fused
        proximal step, exact zeros and masks included."""
        self.optimizer.step()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups
