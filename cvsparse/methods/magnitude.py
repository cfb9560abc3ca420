"""Baseline: global magnitude pruning with ``torch.nn.utils.prune``, for side-by-side tables.

Dense training for ``optim.epochs`` epochs (SGD with momentum and L2 ``magnitude.weight_l2``),
then one global L1-magnitude cut over all regularized tensors to ``target_compression``, then
``finetune_epochs`` epochs with the pruned weights held at zero (weight L2
``optim.finetune_weight_l2``, default ``weight_l2``) — the same epoch budget and loop as the
learned methods.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from cvsparse.config import RunConfig
from cvsparse.optim import ProxSGD
from cvsparse.params import other_parameters, regularized_parameters

from .base import (
    CompressionMethod,
    RunData,
    finetune_lr,
    finetune_weight_l2,
    stepped_lr,
    supervised_step,
)


class MagnitudeMethod(CompressionMethod):
    """Train, prune globally by magnitude once, fine-tune."""

    name = "magnitude"

    def __init__(self, config: RunConfig, model: nn.Module, data: RunData) -> None:
        super().__init__(config, model, data)
        self.weights = [p for _, p in regularized_parameters(model, self.regularized)]
        self.optimizer = ProxSGD(
            [{"params": self.weights, "lambda2": config.magnitude.weight_l2},
             {"params": [p for _, p in other_parameters(model, self.regularized)],
              "lambda2": 0.0}],
            lr=config.optim.lr, momentum=config.optim.momentum,
        )
        self.pruned = False

    def set_epoch(self, epoch: int) -> float:
        opt = self.config.optim
        if epoch >= opt.epochs and not self.pruned:
            self._prune()
        if self.pruned:
            lr = finetune_lr(self.config, opt.lr, epoch - opt.epochs,
                             self.config.magnitude.finetune_epochs)
        else:
            lr = stepped_lr(opt.lr, epoch, opt.epochs, opt.milestones, opt.gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        weight_l2 = self.config.magnitude.weight_l2
        self.optimizer.param_groups[0]["lambda2"] = (
            finetune_weight_l2(self.config, weight_l2) if self.pruned else weight_l2)
        self.finetuning = self.pruned
        return lr

    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.observe(x)
        return supervised_step(self.step_module, self.optimizer, x, y, self.guard, self.loss_fn,
                               precision=self.precision)

    def end_epoch(self, epoch: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "pruned": self.pruned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.pruned = state["pruned"]

    def _prune(self) -> None:
        """One global L1-magnitude cut; the masks then live in the optimizer's state."""
        target = self.config.magnitude.target_compression
        modules = [m for m in self.model.modules()
                   if any(getattr(m, "weight", None) is p for p in self.weights)]
        self.model.to(memory_format=torch.contiguous_format)   # torch's pruning flattens views
        prune.global_unstructured([(m, "weight") for m in modules],
                                  pruning_method=prune.L1Unstructured, amount=1 - 1 / target)
        for m in modules:
            prune.remove(m, "weight")
        with torch.no_grad():
            for p in self.weights:
                self.optimizer.state[p]["mask"] = p != 0
                if "momentum_buffer" in self.optimizer.state[p]:
                    self.optimizer.state[p]["momentum_buffer"].mul_(p != 0)
        if self.precision is not None:
            self.precision.prepare(self.model)   # channels-last again (masks stay contiguous)
        self.pruned = True
