"""LeNet-300-100 and LeNet-5 for 28×28 MNIST digits (the Caffe models used by the pruning
literature, e.g. Han et al. 2015: 266,610 and 431,080 parameters).  Caffe initialized them with
"xavier" (uniform, fan-in); here they get He init like the CIFAR models."""

from __future__ import annotations

from torch import Tensor, nn

MNIST_SIDE = 28


def _he_init(module: nn.Module) -> None:
    """He (Kaiming) normal init, fan-in, ReLU gain, for every Conv/Linear weight; zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)


class LeNet300(nn.Module):
    """Fully connected 784-300-100-10 with ReLU: input ``(N, C, 28, 28)`` (C = 1 for MNIST,
    flattened to ``C·784`` features), output logits ``(N, num_classes)``.

    Parameters for C = 1, 10 classes: 235,500 + 30,100 + 1,010 = 266,610.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * MNIST_SIDE * MNIST_SIDE, 300),
            nn.ReLU(),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Linear(100, num_classes),
        )
        _he_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class LeNet5(nn.Module):
    """Caffe's LeNet-5 variant: conv 20@5×5 → max-pool 2 → conv 50@5×5 → max-pool 2 →
    fc 800→500 → ReLU → fc 500→num_classes.  As in Caffe's ``lenet_train_test.prototxt`` the
    only nonlinearities are the max-pools and the ReLU after the first fully connected layer.

    Input ``(N, C, 28, 28)``; the feature maps are 20×24×24 → 20×12×12 → 50×8×8 → 50×4×4.
    Parameters for C = 1, 10 classes: 520 + 25,050 + 400,500 + 5,010 = 431,080.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=5),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(50 * 4 * 4, 500),
            nn.ReLU(),
            nn.Linear(500, num_classes),
        )
        _he_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)
