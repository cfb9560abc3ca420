"""Baseline: global magnitude pruning, for side-by-side tables.

Dense training for ``optim.epochs`` epochs (SGD with momentum and L2 ``magnitude.weight_l2``),
then one global L1-magnitude cut over all regularized tensors to ``target_compression`` (the
cut of ``torch.nn.utils.prune.global_unstructured``), then ``finetune_epochs`` epochs with the
pruned weights held at zero (weight L2 ``optim.finetune_weight_l2``, default ``weight_l2``) —
the same epoch budget and loop as the learned methods.  The step-level
:class:`~cvsparse.methods.magnitude_pruner.MagnitudePruner` does the work.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from cvsparse.config import MagnitudeConfig, OptimConfig

from .base import (
    CompressionMethod,
    RunData,
    finetune_weight_l2,
    supervised_step,
)
from .magnitude_pruner import MagnitudePruner
from .schedules import LRPhase


class MagnitudeMethod(CompressionMethod):
    """Train, prune globally by magnitude once, fine-tune."""

    name = "magnitude"

    def __init__(self, model: nn.Module, data: RunData, settings: MagnitudeConfig,
                 optim: OptimConfig, epochs: int) -> None:
        """``settings`` is the ``magnitude`` section (L2, target, fine-tuning epochs);
        ``optim`` the learning rate, momentum and schedule; ``epochs`` the run's epoch count."""
        super().__init__(model, data, optim, epochs)
        self.settings = settings
        self.core = MagnitudePruner(model, lr=optim.lr, momentum=optim.momentum,
                                    weight_l2=settings.weight_l2, names=self.regularized)
        self.optimizer = self.core.optimizer


    def set_epoch(self, epoch: int) -> float:
        opt = self.optim
        if epoch >= opt.epochs and not self.core.pruned:
            self.core.prune(self.settings.target_compression)
        lr = self.schedule.enter(self.optimizer, epoch, self.lr_phase(epoch))
        weight_l2 = self.settings.weight_l2
        self.optimizer.param_groups[0]["lambda2"] = (
            finetune_weight_l2(self.optim, weight_l2) if self.core.pruned else weight_l2)
        self.finetuning = self.core.pruned
        return lr

    def lr_phase(self, epoch: int) -> LRPhase:
        """The stepped schedule at ``optim.lr`` until the cut; then fine-tuning restarts it
        at ``optim.lr`` over ``magnitude.finetune_epochs``."""
        opt = self.optim
        if epoch < opt.epochs:
            return LRPhase("train", 0, opt.epochs, opt.lr)
        return LRPhase("finetune", opt.epochs, self.settings.finetune_epochs, opt.lr)

    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.observe(x)
        return supervised_step(self.step_module, self.optimizer, x, y, self.guard, self.loss_fn,
                               precision=self.precision)

    def end_epoch(self, epoch: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state)
