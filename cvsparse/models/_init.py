"""Initialization shared by the CIFAR models (He et al. 2015)."""

from __future__ import annotations

from torch import nn


def init_conv_bn(model: nn.Module) -> None:
    """He-normal (fan-out, ReLU gain) for every Conv2d, BatchNorm2d at weight 1 / bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
