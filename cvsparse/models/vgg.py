"""VGG-16 for 32×32 CIFAR images with batch normalization (the variant of Li et al. 2017,
"Pruning Filters for Efficient ConvNets", ~15M parameters)."""

from __future__ import annotations

from torch import Tensor, nn

from ._init import init_conv_bn

#: Output channels of the 13 conv layers; "M" is a 2×2 max-pool (5 of them: 32 → 1).
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class VGG16(nn.Module):
    """CIFAR VGG-16: 13 × (conv 3×3, padding 1, no bias → BatchNorm → ReLU) with the standard
    configuration :data:`VGG16_CFG`, then flatten (512×1×1 → 512) → fc 512→512 → ReLU →
    fc 512→num_classes.  No dropout.

    Input ``(N, C, 32, 32)``, output logits ``(N, num_classes)``.  Parameters for C = 3:
    14,710,464 conv weights + 8,448 BN affine + 262,656 + 5,130 fc = 14,986,698 (10 classes),
    15,032,868 (100 classes).  The conv layers have no bias (it would be cancelled by the BN
    that follows).

    Init: convs He normal (fan-out, ReLU gain) as in He et al. 2015; BN weight 1, bias 0;
    fc weights N(0, 0.01²), biases 0 (Simonyan & Zisserman).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG16_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(channels, item, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(item),
                    nn.ReLU(),
                ]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        init_conv_bn(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
