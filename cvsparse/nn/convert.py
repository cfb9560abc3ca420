"""Model-level AutoPrune plumbing: swap plain Conv2d / Linear layers for gated ones and back.

    model = convert(model, granularity="neuron")        # in place; same weight/bias Parameters
    aux_opt = torch.optim.SGD([p for _, p in aux_parameters(model)], lr=...)
    ...
    model = strip(model)                                 # plain layers, pruned weights are zeros

Optimizer compatibility: :func:`convert` keeps the ``weight`` and ``bias`` Parameter objects
(an optimizer built before it keeps updating them and keeps its state); the new ``aux``
parameters must be given to an optimizer (see :func:`aux_parameters`).  :func:`strip` creates
new ``weight`` Parameters (their values change), so build a new optimizer after it.
Forward hooks registered on swapped layers are not carried over.  A layer used at several
places of the model is swapped everywhere by the same replacement.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .gated import DEFAULT_AUX_INIT, GATED_CLASSES, GATED_LAYERS, check_gating


def convert(
    model: nn.Module,
    granularity: str = "weight",
    ste: str = "linear",
    layers: Iterable[str] | None = None,
    *,
    slope: float = 0.01,
    update: str = "proposed",
    aux_init: tuple[float, float] = DEFAULT_AUX_INIT,
) -> nn.Module:
    """Replace, in place, every ``nn.Conv2d`` / ``nn.Linear`` of ``model`` (exact types; or only
    those whose qualified names are in ``layers``) by its gated version (see
    :mod:`cvsparse.nn.gated` for the options), on the layer's device and dtype.

    Returns ``model`` (or the gated layer when ``model`` itself is a Conv2d / Linear).  All
    arguments are checked before anything changes: an unknown option or a name in ``layers``
    that is not a convertible layer raises ValueError and leaves ``model`` untouched.
    """
    gating = dict(granularity=granularity, ste=ste, slope=slope, update=update,
                  aux_init=check_gating(granularity, ste, slope, update, aux_init))
    convertible = dict(_convertible(model))
    if layers is not None:
        names = [layers] if isinstance(layers, str) else list(layers)
        unknown = [n for n in names if n not in convertible]
        if unknown:
            raise ValueError(f"layers: {unknown} are not nn.Conv2d / nn.Linear layers of the "
                             f"model; convertible layers: {sorted(convertible)}")
        chosen = {id(convertible[n]) for n in names}
        convertible = {n: m for n, m in convertible.items() if id(m) in chosen}
    replacements = {id(m): GATED_CLASSES[type(m)].from_dense(m, **gating)
                    for m in convertible.values()}
    return _swap(model, {name: replacements[id(m)] for name, m in convertible.items()})


def strip(model: nn.Module) -> nn.Module:
    """Replace, in place, every gated layer of ``model`` by the plain layer it computes in eval
    mode (``weight ⊙ h(aux)``, zeros where gated off; the same ``bias`` Parameter).

    The stripped model has the state_dict keys of the model before :func:`convert` and gives
    identical eval-mode outputs.  Returns ``model`` (or the plain layer when ``model`` itself is
    a gated layer).
    """
    gated = {name: m for name, m in _all_named_modules(model) if isinstance(m, GATED_LAYERS)}
    replacements = {id(m): m.to_dense() for m in gated.values()}
    return _swap(model, {name: replacements[id(m)] for name, m in gated.items()})


def gated_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of every gated layer of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GATED_LAYERS)]


def aux_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, aux)`` of every gated layer of ``model``: the AutoPrune gate
    parameters (trained with their own optimizer and an L1 penalty, docs/method.md §6)."""
    return [(f"{name}.aux" if name else "aux", m.aux) for name, m in gated_layers(model)]


def convertible_layers(model: nn.Module) -> list[str]:
    """Qualified names of the layers :func:`convert` swaps when ``layers`` is None (modules of
    exactly ``nn.Conv2d`` / ``nn.Linear`` type)."""
    return [name for name, _ in _convertible(model)]


def _convertible(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in _all_named_modules(model) if type(m) in GATED_CLASSES]


def _all_named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every (name, module), a module reachable under several names once per name."""
    return list(model.named_modules(remove_duplicate=False))


def _swap(model: nn.Module, new: dict[str, nn.Module]) -> nn.Module:
    """Install ``new[name]`` at each qualified ``name`` of ``model``; returns the (new) root."""
    if "" in new:  # the model is itself a (gated) layer
        return new[""]
    for name, module in new.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, module)
    return model
