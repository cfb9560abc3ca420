"""AutoPrune's gated layers (docs/method.md §6): ``nn.Conv2d`` / ``nn.Linear`` whose weight is
used as ``ŵ = w ⊙ h(m)``, ``h(m) = 1[m > 0]``, with one auxiliary parameter ``m`` (``aux``) per
weight or per output unit.

They are drop-in subclasses: same constructor arguments, same ``weight`` / ``bias`` parameters
and state_dict keys plus ``aux``.  While ``m`` learns, the gate is computed by
:func:`cvsparse.ops.gated_weight`, whose backward sends ``∂L/∂ŵ ⊙ h(m)`` to ``w`` and a
straight-through estimate to ``m``; gates held fixed are a plain 0/1 mask.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cvsparse.ops import STE_CODES, gated_weight, reference

GRANULARITIES = ("weight", "neuron")
UPDATES = ("proposed", "bnn")
DEFAULT_AUX_INIT = (0.1, 0.05)


def check_gating(
    granularity: str, ste: str, slope: float, update: str, aux_init: tuple[float, float]
) -> tuple[float, float]:
    """Validate the gating options shared by every gated layer (ValueError naming the bad one).

    Returns ``aux_init`` as a ``(mean, std)`` pair of floats.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be 'weight' or 'neuron', got {granularity!r}")
    if not isinstance(ste, str) or ste not in STE_CODES:
        raise ValueError(f"ste must be one of {', '.join(STE_CODES)}, got {ste!r}")
    if (isinstance(slope, bool) or not isinstance(slope, (int, float))
            or not 0 <= slope < math.inf):
        raise ValueError(f"slope must be a finite float >= 0, got {slope!r}")
    if update not in UPDATES:
        raise ValueError(f"update must be 'proposed' or 'bnn', got {update!r}")
    try:
        mean, std = (float(v) for v in aux_init)
    except (TypeError, ValueError):
        raise ValueError(
            f"aux_init must be a (mean, std) pair of floats, got {aux_init!r}"
        ) from None
    if not (math.isfinite(mean) and math.isfinite(std) and std >= 0):
        raise ValueError(f"aux_init must be a finite (mean, std >= 0) pair, got {aux_init!r}")
    return mean, std


class _Gated:
    """The gating shared by :class:`GatedConv2d` and :class:`GatedLinear`: a mixin placed before
    the ``nn`` layer class; subclasses set ``dense_class`` and define ``layer_args``."""

    weight: nn.Parameter
    aux: nn.Parameter
    dense_class: type[nn.Module]  # the nn layer this class gates

    def __init__(
        self, *args: Any, granularity: str = "weight", ste: str = "linear", slope: float = 0.01,
        update: str = "proposed", aux_init: tuple[float, float] = DEFAULT_AUX_INIT,
        **kwargs: Any,
    ) -> None:
        """Check the gating options, build the ``nn`` layer from the arguments, add ``aux``."""
        aux_init = check_gating(granularity, ste, slope, update, aux_init)
        super().__init__(*args, **kwargs)  # the nn layer after this mixin in the MRO
        self._init_gating(granularity, ste, slope, update, aux_init)

    def _init_gating(
        self, granularity: str, ste: str, slope: float, update: str,
        aux_init: tuple[float, float],
    ) -> None:
        self.granularity = granularity
        self.ste = ste
        self.slope = float(slope)
        self.update = update
        self.aux_init = aux_init
        shape = self.weight.shape if granularity == "weight" else self.weight.shape[:1]
        self.aux = nn.Parameter(
            torch.empty(shape, device=self.weight.device, dtype=self.weight.dtype)
        )
        self.reset_aux()

    def reset_parameters(self) -> None:
        """Re-initialize ``weight`` and ``bias`` as the ``nn`` layer does, and ``aux``."""
        super().reset_parameters()
        if "aux" in self._parameters:  # absent while the nn layer's __init__ runs
            self.reset_aux()

    def reset_aux(self) -> None:
        """Draw ``aux ~ N(mean, std²)`` with ``(mean, std) = aux_init``."""
        mean, std = self.aux_init
        with torch.no_grad():
            self.aux.normal_(mean, std)

    def effective_weight(self) -> Tensor:
        """``weight ⊙ h(aux)``, shaped like ``weight`` (this is the weight the forward pass
        uses; under ``torch.no_grad()`` it is the stripped weight).

        Differentiable in ``weight``, and in ``aux`` through :func:`cvsparse.ops.gated_weight`
        when ``aux`` requires a gradient.  Gates held fixed (``aux.requires_grad`` False, or
        autograd off) are a constant 0/1 mask: the operator's plain-PyTorch reference, a
        ``torch.mul`` whose backward ``g ⊙ h(aux)`` is the op's weight gradient bit for bit,
        without the custom op's dispatch."""
        if self.aux.requires_grad and torch.is_grad_enabled():
            return gated_weight(self.weight, self.aux, ste=self.ste, slope=self.slope,
                                update=self.update)
        return reference.gated_weight(self.weight.contiguous(), self.aux.detach(),
                                      STE_CODES[self.ste], self.slope, self.update == "proposed")

    def gate(self) -> Tensor:
        """``aux > 0`` as a bool tensor shaped like ``aux`` (True = the unit is kept)."""
        return self.aux.detach() > 0

    @classmethod
    def from_dense(cls, layer: nn.Module, **gating: Any) -> _Gated:
        """A gated layer that shares ``layer``'s ``weight`` and ``bias`` Parameter objects (an
        optimizer holding them keeps working) with a fresh ``aux`` on their device and dtype.

        ``gating``: the keyword options of the gated constructor (granularity, ste, ...).
        """
        gated = cls(**cls.layer_args(layer), device="meta", dtype=layer.weight.dtype, **gating)
        gated.weight = layer.weight
        gated.bias = layer.bias
        gated.aux = nn.Parameter(torch.empty_like(gated.aux, device=layer.weight.device))
        gated.reset_aux()
        return gated.train(layer.training)

    def to_dense(self) -> nn.Module:
        """The plain layer computing this layer's eval-mode function: a new ``weight``
        Parameter holding ``weight ⊙ h(aux)`` (zeros where gated off) and this layer's ``bias``
        Parameter.  Hooks registered on this layer are not carried over."""
        dense = self.dense_class(**self.layer_args(self), device="meta", dtype=self.weight.dtype)
        with torch.no_grad():
            dense.weight = nn.Parameter(self.effective_weight(),
                                        requires_grad=self.weight.requires_grad)
        dense.bias = self.bias
        return dense.train(self.training)

    def extra_repr(self) -> str:
        gating = f"granularity={self.granularity}, ste={self.ste}, update={self.update}"
        if self.ste == "leaky_relu":
            gating += f", slope={self.slope}"
        return f"{super().extra_repr()}, {gating}"


class GatedConv2d(_Gated, nn.Conv2d):
    """``nn.Conv2d`` with AutoPrune gates; ``aux`` is ``(out, in/groups, kh, kw)`` for
    ``granularity="weight"`` or ``(out,)`` for ``"neuron"`` (one gate per output channel).
    Parameters, in registration order: ``weight``, ``bias`` (if any), ``aux``.

    Args:
        *args, **kwargs: those of ``nn.Conv2d`` (including ``device`` and ``dtype``).
        granularity: ``"weight"`` or ``"neuron"``.
        ste: straight-through estimator of ``h'``: ``"linear"``, ``"leaky_relu"``, ``"softplus"``.
        slope: LeakyReLU slope for ``m ≤ 0`` (only used by ``ste="leaky_relu"``).
        update: ``"proposed"`` (``∂m`` uses ``sgn(w)``) or ``"bnn"`` (uses ``w``).
        aux_init: ``(mean, std)`` of the normal draw of ``aux``.
    """

    dense_class = nn.Conv2d

    def forward(self, input: Tensor) -> Tensor:
        """``conv2d(input, weight ⊙ h(aux), bias)``: ``(N, in, H, W) → (N, out, H', W')``."""
        return self._conv_forward(input, self.effective_weight(), self.bias)

    @staticmethod
    def layer_args(layer: nn.Conv2d) -> dict[str, Any]:
        """Constructor arguments that rebuild ``layer``'s shape and behaviour."""
        return dict(
            in_channels=layer.in_channels, out_channels=layer.out_channels,
            kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
        )


class GatedLinear(_Gated, nn.Linear):
    """``nn.Linear`` with AutoPrune gates; ``aux`` is ``(out, in)`` for
    ``granularity="weight"`` or ``(out,)`` for ``"neuron"``.  Arguments as :class:`GatedConv2d`
    (the positional / ``nn.Linear`` ones being ``in_features, out_features, bias``)."""

    dense_class = nn.Linear

    def forward(self, input: Tensor) -> Tensor:
        """``linear(input, weight ⊙ h(aux), bias)``: ``(..., in) → (..., out)``."""
        return F.linear(input, self.effective_weight(), self.bias)

    @staticmethod
    def layer_args(layer: nn.Linear) -> dict[str, Any]:
        """Constructor arguments that rebuild ``layer``'s shape."""
        return dict(in_features=layer.in_features, out_features=layer.out_features,
                    bias=layer.bias is not None)


GATED_LAYERS = (GatedConv2d, GatedLinear)
#: The gated class of each plain layer class (exact types: subclasses are not converted).
GATED_CLASSES: dict[type[nn.Module], type[_Gated]] = {g.dense_class: g for g in GATED_LAYERS}
