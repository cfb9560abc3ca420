"""Model factories for tests/test_sources.py, named on the command line as
``sources_helpers:<factory>`` (``tests/`` is on ``sys.path`` while the tests run)."""

from __future__ import annotations

from torch import nn

#: The keyword arguments of every factory call, in order.
CALLS: list[dict[str, int]] = []

#: Not a factory: ``sources_helpers:NOT_CALLABLE`` is refused.
NOT_CALLABLE = 3


def tiny_mlp(num_classes: int = 7) -> nn.Module:
    """A 784-16-``num_classes`` perceptron for 28×28 one-channel images."""
    CALLS.append({"num_classes": num_classes})
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, num_classes))


def fixed_mlp() -> nn.Module:
    """A 784-16-10 perceptron; takes no ``num_classes``."""
    CALLS.append({})
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))


def three_outputs() -> nn.Module:
    """Three logits per image, whatever the dataset has."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 3))
