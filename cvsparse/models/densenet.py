"""DenseNet-40 of Huang et al. 2017 ("Densely Connected Convolutional Networks"): the basic
DenseNet (no bottleneck, no compression) with growth rate k = 12 and three dense blocks of
12 layers, published as 1.0M parameters (Table 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._init import init_conv_bn


class DenseLayer(nn.Module):
    """BN → ReLU → conv 3×3 (``growth`` filters) [→ dropout], concatenated to the input:
    ``(N, C, H, W) → (N, C + growth, H, W)``."""

    def __init__(self, in_channels: int, growth: int, drop_rate: float) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, growth, 3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(self.relu(self.bn(x)))
        if self.drop_rate > 0:
            out = F.dropout(out, self.drop_rate, self.training)
        return torch.cat((x, out), dim=1)


class Transition(nn.Module):
    """BN → ReLU → conv 1×1 (channels unchanged: no compression) [→ dropout] → 2×2 average
    pool: ``(N, C, H, W) → (N, C, H/2, W/2)``."""

    def __init__(self, channels: int, drop_rate: float) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(self.relu(self.bn(x)))
        if self.drop_rate > 0:
            out = F.dropout(out, self.drop_rate, self.training)
        return F.avg_pool2d(out, 2)


class DenseNet40(nn.Module):
    """DenseNet-40 (k = 12): conv 3×3 16 → dense block (12 layers, 16 → 160 channels, 32×32) →
    transition → dense block (160 → 304, 16×16) → transition → dense block (304 → 448, 8×8) →
    BN → ReLU → global average pool → fc 448→num_classes.  Input ``(N, C, H, W)``
    (32×32 for CIFAR), output logits ``(N, num_classes)``.

    Parameters for C = 3, 10 classes: 997,136 conv weights + 18,096 BN affine + 4,490 fc =
    1,019,722 (1,060,132 for 100 classes); the paper rounds this to 1.0M.

    ``drop_rate`` is the dropout after each conv that the paper uses only without data
    augmentation (0.2); default 0 (CIFAR training with augmentation).

    Init as the authors' Torch code: convs He normal (fan-out, ReLU gain), BN weight 1 and
    bias 0, fc PyTorch's default weight init with zero bias.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        growth: int = 12,
        layers_per_block: int = 12,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        channels = 16
        modules: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
        for block in range(3):
            for _ in range(layers_per_block):
                modules.append(DenseLayer(channels, growth, drop_rate))
                channels += growth
            if block < 2:
                modules.append(Transition(channels, drop_rate))
        modules += [nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*modules)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))
