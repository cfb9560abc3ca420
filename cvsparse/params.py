"""Which tensors of a model are regularized (docs/method.md §1: Conv and Linear weights).

By default every Conv/Linear weight; :func:`select_weights` narrows that to a chosen subset
(``include`` / ``exclude`` of :func:`cvsparse.compress`), and the methods, the hypergradient and
the metrics then share that one list of names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

PRUNABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

#: ``include`` / ``exclude``: module names (a name selects that module and every layer under
#: it) or a predicate ``(module_name, module) -> bool``.
Selector = Sequence[str] | Callable[[str, nn.Module], bool]


def regularized_parameters(model: nn.Module,
                           names: Sequence[str] | None = None) -> list[tuple[str, nn.Parameter]]:
    """``(name, weight)`` of every Conv/Linear layer of ``model`` (subclasses included), in
    module order; with ``names``, only the weights so named (as :func:`select_weights` returns
    them).  Biases and normalization parameters are not regularized."""
    chosen = None if names is None else set(names)
    out = []
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_LAYERS) and module.weight is not None:
            key = _weight_name(name)
            if chosen is None or key in chosen:
                out.append((key, module.weight))
    return out

def other_parameters(model: nn.Module,
                     names: Sequence[str] | None = None) -> list[tuple[str, nn.Parameter]]:
    """Every trainable parameter of ``model`` that :func:`regularized_parameters` (with the same
    ``names``) leaves out."""
    regularized = {id(p) for _, p in regularized_parameters(model, names)}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in regularized]


def select_weights(model: nn.Module, include: Selector | None = None,
                   exclude: Selector | None = None) -> list[str]:
    """Names (``"<module>.weight"``) of the Conv/Linear weights of ``model`` that ``include``
    selects (default: all) and ``exclude`` does not, in module order.

    Either argument is a list of module names — a name selects that module and every
    Conv/Linear layer below it (``"layer4"`` selects ``layer4.0.conv1`` …) — or a predicate
    ``(module_name, module) -> bool``.  ValueError (one line) for a name that is no module of
    ``model`` or a selection left empty."""
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, PRUNABLE_LAYERS) and m.weight is not None]
    known = {name for name, _ in model.named_modules()}

    def matcher(selector: Selector, arg: str) -> Callable[[str, nn.Module], bool]:
        if callable(selector):
            return selector
        if isinstance(selector, str):
            raise ValueError(f"{arg} must be a list of module names or a predicate, "
                             f"got the string {selector!r}")
        wanted = [_module_name(s) for s in selector]
        unknown = [s for s in wanted if s not in known]
        if unknown:
            raise ValueError(f"{arg}: {unknown} are not modules of the model")
        return lambda name, _m: any(name == w or name.startswith(w + ".") or w == ""
                                    for w in wanted)

    keep = matcher(include, "include") if include is not None else (lambda _n, _m: True)
    drop = matcher(exclude, "exclude") if exclude is not None else (lambda _n, _m: False)
    names = [_weight_name(name) for name, m in layers if keep(name, m) and not drop(name, m)]
    if not names:
        raise ValueError("include / exclude leave no Conv/Linear weight to regularize")
    return names


def chosen_weights(model: nn.Module, include: Selector | None = None,
                   exclude: Selector | None = None,
                   names: Sequence[str] | None = None) -> Sequence[str] | None:
    """The weight names a step-level optimizer regularizes: ``names`` as given, or those
    :func:`select_weights` chooses by ``include``/``exclude``, or None (every Conv/Linear
    weight) when none of the three is given.  ValueError when ``names`` comes with either."""
    if names is not None and (include is not None or exclude is not None):
        raise ValueError("give names or include/exclude, not both")
    if names is None and (include is not None or exclude is not None):
        return select_weights(model, include, exclude)
    return names


def _weight_name(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def _module_name(name: str) -> str:
    """A module name, also accepting a weight's name (``"fc.weight"`` → ``"fc"``)."""
    if name == "weight":
        return ""
    return name[: -len(".weight")] if name.endswith(".weight") else name
