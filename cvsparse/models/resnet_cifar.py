"""CIFAR ResNets of He et al. 2016 ("Deep Residual Learning", section 4.2): depth 6n + 2,
three stages of n basic blocks with 16, 32, 64 channels on 32×32, 16×16, 8×8 feature maps,
option-A (parameter-free, zero-padding) shortcuts.  Published sizes (Table 6): ResNet-20 0.27M,
-32 0.46M, -56 0.85M, -110 1.7M parameters."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._init import init_conv_bn


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the channels from ``in_channels``
    to ``out_channels`` (padding split evenly; the extra channel, if odd, goes last).
    ``(N, C_in, H, W) → (N, C_out, ceil(H/stride), ceil(W/stride))``; no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_front = (out_channels - in_channels) // 2
        self.pad_back = out_channels - in_channels - self.pad_front

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """conv 3×3 (stride s) → BN → ReLU → conv 3×3 → BN, plus the shortcut, then ReLU.
    ``(N, C_in, H, W) → (N, C_out, H/s, W/s)``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


#: Depth from which :class:`ResNetCifar` zero-initializes each block's last BatchNorm by default.
ZERO_INIT_DEPTH = 56


class ResNetCifar(nn.Module):
    """ResNet-(6n+2): conv 3×3 16 → BN → ReLU → 3 stages of ``n`` :class:`BasicBlock` (16, 32,
    64 channels; the first block of stages 2 and 3 has stride 2) → global average pool →
    fc 64→num_classes.  Input ``(N, C, H, W)`` (32×32 for CIFAR; any size ≥ 4 works),
    output logits ``(N, num_classes)``.

    Init as in He et al. (fb.resnet.torch): convs He normal (fan-out, ReLU gain), BN weight 1
    and bias 0, fc PyTorch's default weight init with zero bias; with ``zero_init_residual``
    the last BN of every block starts at weight 0, so that each block starts as its shortcut
    (Goyal et al. 2017).  The default (None) zero-initializes from :data:`ZERO_INIT_DEPTH`
    layers on: without it ResNet-56 and -110 at lr 0.1, batch 64 stay at chance for the first
    epochs, while ResNet-20 trains without it and loses 4.8 test points with it over 12 epochs
    (RESULTS.md, "Initialization of the deep CIFAR ResNets").
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3,
                 zero_init_residual: bool | None = None) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n >= 1, got {depth}")
        if zero_init_residual is None:
            zero_init_residual = depth >= ZERO_INIT_DEPTH
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        stages = []
        channels = 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(channels, width, stride if i == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)
        if zero_init_residual:
            for block in self.modules():
                if isinstance(block, BasicBlock):
                    nn.init.zeros_(block.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNetCifar:
    """ResNet-20 (n = 3): 269,722 parameters for 10 classes."""
    return ResNetCifar(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> ResNetCifar:
    """ResNet-32 (n = 5): 464,154 parameters for 10 classes."""
    return ResNetCifar(32, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> ResNetCifar:
    """ResNet-56 (n = 9): 853,018 parameters for 10 classes."""
    return ResNetCifar(56, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> ResNetCifar:
    """ResNet-110 (n = 18): 1,727,962 parameters for 10 classes."""
    return ResNetCifar(110, num_classes, in_channels)
