"""The model zoo: plain ``nn.Module`` classifiers for MNIST (LeNets) and CIFAR (VGG-16, ResNets,
DenseNet-40).  Every constructor takes ``(num_classes=10, in_channels=<native>)`` and is
deterministic given ``torch.manual_seed``.

    model = build_model("resnet56", num_classes=100)
    c, h, w = input_shape("resnet56", "cifar100")          # (3, 32, 32)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .densenet import DenseNet40
from .lenet import LeNet5, LeNet300
from .resnet_cifar import resnet20, resnet32, resnet56, resnet110
from .vgg import VGG16

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "vgg16": VGG16,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "densenet40": DenseNet40,
}

#: ``(C, H, W)`` of the images of each dataset (uint8 NCHW as ``cvsparse.data`` loads them).
DATASET_IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
}

# (native input shape, whether the spatial size is fixed).  Fixed-size models end in fully
# connected layers sized for their native H×W; the others pool globally before the classifier.
_NATIVE_INPUT: dict[str, tuple[tuple[int, int, int], bool]] = {
    "lenet300": ((1, 28, 28), True),
    "lenet5": ((1, 28, 28), True),
    "vgg16": ((3, 32, 32), True),
    "resnet20": ((3, 32, 32), False),
    "resnet32": ((3, 32, 32), False),
    "resnet56": ((3, 32, 32), False),
    "resnet110": ((3, 32, 32), False),
    "densenet40": ((3, 32, 32), False),
}


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")


def build_model(name: str, num_classes: int = 10, in_channels: int | None = None) -> nn.Module:
    """A freshly initialized model ``name`` (a key of :data:`MODELS`) with ``num_classes``
    outputs, reading ``in_channels`` input channels (``None``: the model's native count,
    1 for the LeNets, 3 otherwise)."""
    _check_name(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if in_channels is None:
        in_channels = _NATIVE_INPUT[name][0][0]
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int or None, got {in_channels!r}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)


def input_shape(name: str, dataset: str | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` of one input of model ``name`` fed with ``dataset`` (a key of
    :data:`DATASET_IMAGE_SHAPES`), or the model's native input shape if ``dataset`` is None.

    Raises ValueError if the model cannot take that dataset's images: the LeNets and VGG-16 need
    their native H×W (28×28 and 32×32); the ResNets and DenseNet-40 pool globally and take any
    H×W ≥ 8 (e.g. ``resnet20`` on MNIST with ``build_model(..., in_channels=1)``).
    """
    _check_name(name)
    native, fixed = _NATIVE_INPUT[name]
    if dataset is None:
        return native
    if dataset not in DATASET_IMAGE_SHAPES:
        raise ValueError(
            f"unknown dataset {dataset!r}; valid names: {', '.join(DATASET_IMAGE_SHAPES)}"
        )
    shape = DATASET_IMAGE_SHAPES[dataset]
    if (fixed and shape[1:] != native[1:]) or min(shape[1:]) < 8:
        raise ValueError(
            f"model {name!r} needs {native[1]}x{native[2]} inputs; dataset {dataset!r} has "
            f"{shape[1]}x{shape[2]} images"
        )
    return shape


__all__ = ["DATASET_IMAGE_SHAPES", "MODELS", "build_model", "input_shape"]
