"""AutoPrune for a training loop of your own, torch.optim style.

    opt = AutoPruneOptimizer(model, lr=0.1)      # gates the model's Conv2d / Linear layers
    for (x, y), (xg, yg) in zip(weight_batches, gate_batches):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()                               # the weights (L2, momentum)
        opt.zero_grad()
        F.cross_entropy(model(xg), yg).backward()
        opt.gate_step()                          # the gates' auxiliary parameters (L1)
    plain = opt.strip()                          # plain layers, closed gates exact zeros

:class:`AutoPruneOptimizer` converts the model in place and owns the two fused proximal
optimizers (``.weight_opt``, ``.aux_opt``: hand either to any ``torch.optim.lr_scheduler``).
``cvsparse.compress(method="autoprune")`` and the command line drive the same object, so a loop
that calls it at the same points reproduces their run bit for bit (docs/api.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from cvsparse.config import AUTOPRUNE_AUX_LR, AUTOPRUNE_WEIGHT_L2
from cvsparse.nn import aux_parameters, convert, convertible_layers, strip
from cvsparse.optim import ProxSGD
from cvsparse.params import (
    Selector,
    chosen_weights,
    other_parameters,
    regularized_parameters,
)


@dataclass
class AutoPruneSettings:
    """The gates and their training (the ``autoprune.*`` keys of the same names, docs/cli.md):
    ``granularity`` (``"weight"`` or ``"neuron"``), the straight-through estimator ``ste`` and
    its ``slope``, the ``update`` rule, the gates' ``aux_lr`` and L1 ``aux_l1``, the weights' L2
    ``weight_l2``, and ``skip_layers`` left ungated."""

    granularity: str = "weight"
    ste: str = "leaky_relu"
    slope: float = 0.01
    update: str = "proposed"
    aux_lr: float = AUTOPRUNE_AUX_LR
    aux_l1: float = 2e-3
    weight_l2: float = AUTOPRUNE_WEIGHT_L2
    skip_layers: list[str] = field(default_factory=list)

    @classmethod
    def from_section(cls, section: Any) -> AutoPruneSettings:
        """The settings of an ``autoprune.*`` configuration section (a
        :class:`~cvsparse.config.AutoPruneConfig`), which holds these keys among its others."""
        values = {f.name: getattr(section, f.name) for f in dataclasses.fields(cls)}
        values["skip_layers"] = list(values["skip_layers"])
        return cls(**values)


class AutoPruneOptimizer:
    """Gated layers with straight-through gradients, trained by two fused proximal optimizers.

    Args:
        model: the network, converted in place: its Conv2d / Linear layers chosen by
            ``include``/``exclude`` or ``names`` (default all), less ``skip_layers``, become
            gated layers (:func:`cvsparse.nn.convert`).
        lr: the weights' learning rate.
        momentum: the momentum of both optimizers.
        settings: the gates and their training (default :class:`AutoPruneSettings`).
        names: the gated layers' weights by name, instead of ``include``/``exclude``.

    Attributes:
        weight_opt: ProxSGD of the weights (group 0 the Conv/Linear weights, L2 ``weight_l2``;
            group 1 every other trainable parameter but the gates).
        aux_opt: ProxSGD of the gates' auxiliary parameters (L1 ``aux_l1``, lr ``aux_lr``).
    """

    def __init__(self, model: nn.Module, *, lr: float, momentum: float = 0.9,
                 settings: AutoPruneSettings | None = None, include: Selector | None = None,
                 exclude: Selector | None = None, names: Sequence[str] | None = None) -> None:
        names = chosen_weights(model, include, exclude, names)
        self.model = model
        self.settings = s = settings if settings is not None else AutoPruneSettings()
        convert(model, granularity=s.granularity, ste=s.ste,
                layers=gated_names(model, s.skip_layers, names), slope=s.slope,
                update=s.update)
        aux = [p for _, p in aux_parameters(model)]
        aux_ids = {id(p) for p in aux}
        weights = [p for _, p in regularized_parameters(model)]
        others = [p for _, p in other_parameters(model) if id(p) not in aux_ids]
        self.weight_opt = ProxSGD([{"params": weights, "lambda2": s.weight_l2},
                                   {"params": others, "lambda2": 0.0}],
                                  lr=lr, momentum=momentum)
        self.aux_opt = ProxSGD(aux, lr=s.aux_lr, momentum=momentum, lambda1=s.aux_l1)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the weights and of the gates."""
        self.weight_opt.zero_grad(set_to_none=set_to_none)
        self.aux_opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """One step of the weights (after ``backward`` on a weight batch)."""
        self.weight_opt.step()

    def gate_step(self) -> None:
        """One proximal step of the gates' auxiliary parameters (after ``backward`` on a gate
        batch, which AutoPrune draws from a different half of the training data)."""
        self.aux_opt.step()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The weight optimizer's groups."""
        return self.weight_opt.param_groups

    def strip(self) -> nn.Module:
        """Replace the gated layers by the plain ones they compute (closed gates exact zeros),
        in place; returns the model.  The optimizer is done with the model after this."""
        return strip(self.model)

    def state_dict(self) -> dict[str, Any]:
        return {"weight_opt": self.weight_opt.state_dict(), "aux_opt": self.aux_opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weight_opt.load_state_dict(state["weight_opt"])
        self.aux_opt.load_state_dict(state["aux_opt"])


def gated_names(model: nn.Module, skip: list[str],
                regularized: Sequence[str] | None = None) -> list[str] | None:
    """Qualified names of the Conv2d / Linear layers to gate: all but ``skip``, and with
    ``regularized`` (weight names, ``cvsparse.params.select_weights``) only the layers of those
    weights (None = all)."""
    if not skip and regularized is None:
        return None
    names = convertible_layers(model)
    unknown = sorted(set(skip) - set(names))
    if unknown:
        raise ValueError(f"autoprune.skip_layers: {unknown} are not Conv2d / Linear layers of "
                         f"the model; its layers: {names}")
    if regularized is not None:
        chosen = {n.removesuffix(".weight") if n != "weight" else "" for n in regularized}
        names = [n for n in names if n in chosen]
    return [n for n in names if n not in skip]
