"""Which tensors of a model are regularized (docs/method.md §1: Conv and Linear weights)."""

from __future__ import annotations

from torch import nn

PRUNABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def regularized_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, weight)`` of every Conv/Linear layer of ``model`` (subclasses included), in
    module order.  Biases and normalization parameters are not regularized."""
    return [
        (f"{name}.weight" if name else "weight", module.weight)
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE_LAYERS) and module.weight is not None
    ]


def other_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every trainable parameter of ``model`` that :func:`regularized_parameters` leaves out."""
    regularized = {id(p) for _, p in regularized_parameters(model)}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in regularized]
