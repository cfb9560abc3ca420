"""Stochastic weight averaging of a fine-tuning phase (SWA, Izmailov et al. 2018).

During the last ``optim.swa_epochs`` epochs of a run the weights train at the constant
``optim.swa_lr`` and :class:`WeightAverage` keeps the uniform mean of every floating-point
parameter after each training step (tail averaging of the SGD iterates).  Evaluation in that
window, the report and the finished model use the mean.  A weight that the support holds at zero
(cvgrad's masks, the magnitude cut) is zero at every step, so its mean is exactly zero: averaging
never adds a nonzero.  BatchNorm statistics of the mean weights are recomputed by one forward
pass over the training images (``torch.optim.swa_utils.update_bn``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn


class WeightAverage:
    """Uniform running mean of ``model``'s floating-point parameters over :meth:`update` calls.

    ``bn_batches`` iterates ``(images, labels)`` training batches; it is used only when the model
    has BatchNorm layers, to recompute their statistics for the mean weights.
    """

    def __init__(self, model: nn.Module, bn_batches: Iterable[tuple[Tensor, Tensor]],
                 device: torch.device) -> None:
        self.model = model
        self.bn_batches = bn_batches
        self.device = device
        self.names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        self.count = 0
        self.mean: list[Tensor] = []

    def update(self) -> None:
        """Fold the model's current parameters into the mean (mean += (p − mean) / count)."""
        params = self._params()
        self.count += 1
        if self.count == 1:
            self.mean = [p.detach().clone() for p in params]
        else:
            torch._foreach_lerp_(self.mean, [p.detach() for p in params], 1.0 / self.count)

    def copy_to_model(self) -> None:
        """Load the mean into the model's parameters and recompute its BatchNorm statistics."""
        if self.count == 0:
            raise RuntimeError("WeightAverage.copy_to_model before any update")
        with torch.no_grad():
            torch._foreach_copy_(self._params(), self.mean)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            update_bn(self.bn_batches, self.model, device=self.device)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the mean (and its BatchNorm statistics) inside the block; its own
        parameters and buffers come back afterwards, bit for bit."""
        saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.copy_to_model()
        try:
            yield
        finally:
            self.model.load_state_dict(saved)

    def state_dict(self) -> dict[str, Any]:
        mean = dict(zip(self.names, self.mean, strict=True)) if self.count else {}
        return {"count": self.count, "mean": mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]
        self.mean = [state["mean"][n].to(self.device) for n in self.names] if self.count else []

    def _params(self) -> list[Tensor]:
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.names]
