"""Structured shrink: remove dead channels from the traced graph of a model.

:func:`shrink` traces the model with ``torch.fx`` and builds its channel graph
(:mod:`cvsparse.export.channels`: which channels are one class across the graph — through
BatchNorm, activations, pooling, flatten, residual additions, concatenations and channel
padding — and which hold an input-independent constant).  A class is removed when it is not
pinned and, at every Conv/Linear that reads it, either the consumer's weights for it are all
zero, or it holds a constant that folds exactly into the consumer's bias: always for a Linear,
for a convolution when its padding is 0 (any kernel size), when it does not pad with zeros, or
when the constant is 0.  Every output channel / neuron whose weights are all zero is thus
removed unless its constant cannot be folded exactly (e.g. a nonzero constant read by a
zero-padded 3×3 convolution, whose borders would see it differ).

The result is the traced ``torch.fx.GraphModule`` (same submodule names, so the same
``state_dict`` keys with narrower tensors, plus a ``bias`` where a folded constant needed one)
in eval mode.  Outputs equal the input model's in
eval mode (BatchNorm with its running statistics; dropout off); the input model is not modified.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .channels import ChannelGraph, Layer, analyse, foldable, shape_of, weight64

__all__ = ["shrink"]

#: Relative tolerance of the self-check that compares the shrunk and the input model.
CHECK_RTOL = 1e-4


# --------------------------------------------------------------------------- decision


def _importance(g: ChannelGraph, roots: np.ndarray) -> np.ndarray:
    """Per class: the summed L2 norm of the output rows of its producing layers."""
    imp = np.zeros(len(roots))
    for layer in g.layers:
        w = layer.module.weight.detach().double().cpu()
        norms = w.reshape(w.shape[0], -1).norm(dim=1).numpy()
        np.add.at(imp, roots[g.info[layer.node].slots], norms)
    return imp


def _removable(g: ChannelGraph, roots: np.ndarray) -> np.ndarray:
    """Per class (indexed by root): removable — not pinned, and every dense layer reading it
    either has all-zero weights for it or folds its constant exactly."""
    blocked = np.zeros(len(roots), dtype=bool)
    blocked[roots[np.flatnonzero(g.slots.pinned)]] = True
    for layer in g.layers:
        if layer.kind != "dense":
            continue
        info = g.info[layer.src]
        unread = ~(weight64(layer.module) != 0).any(axis=(0, 2))
        ok = unread | foldable(layer.module, info.const)
        blocked[roots[info.slots[~ok]]] = True
    return ~blocked


def _node_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _keep_one(g: ChannelGraph, roots: np.ndarray, removed: np.ndarray, imp: np.ndarray) -> None:
    """No activation loses every channel: keep its most important class, with a warning."""
    for node, info in g.info.items():
        if info is None or len(info.slots) == 0:
            continue
        r = roots[info.slots]
        if removed[r].all():
            best = r[np.argmax(imp[r])]
            removed[best] = False
            warnings.warn(f"shrink: every channel of {_node_name(node)!r} is dead; keeping one "
                          f"channel so that the layer is not removed", stacklevel=3)


def _round_to(g: ChannelGraph, roots: np.ndarray, removed: np.ndarray, imp: np.ndarray,
              k: int) -> None:
    """Restore the most important removed classes until every layer's output channel count
    is a multiple of ``k`` (or it has all its channels back)."""
    changed = True
    while changed:
        changed = False
        for layer in g.layers:
            r = roots[g.info[layer.node].slots]
            while (~removed[r]).sum() % k and removed[r].any():
                cand = np.unique(r[removed[r]])
                removed[cand[np.argmax(imp[cand])]] = False
                changed = True


# --------------------------------------------------------------------------- surgery


def _set_param(module: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad))


def _fold(layer: nn.Module, dropped: np.ndarray, const: np.ndarray) -> None:
    """Add the contribution of the dropped input channels (their constants) to the bias."""
    w = weight64(layer)[:, dropped].sum(axis=2)  # (out, dropped)
    k = np.nan_to_num(const[dropped], nan=0.0)
    delta = w @ k
    if not delta.any():
        return
    weight = layer.weight
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype,
                                              device=weight.device))
    with torch.no_grad():
        new = layer.bias.detach().double() + torch.from_numpy(delta).to(weight.device)
    _set_param(layer, "bias", new)


def _cut_layer(g: ChannelGraph, layer: Layer, keep: Callable[[fx.Node], np.ndarray]) -> None:
    mod, keep_in, keep_out = layer.module, keep(layer.src), keep(layer.node)
    out_idx = torch.from_numpy(np.flatnonzero(keep_out)).to(mod.weight.device)
    w = mod.weight.detach()
    if layer.kind == "dense":
        if not keep_in.all():
            _fold(mod, ~keep_in, g.info[layer.src].const)
        in_idx = torch.from_numpy(np.flatnonzero(keep_in)).to(w.device)
        w = mod.weight.detach().index_select(1, in_idx)
    _set_param(mod, "weight", w.index_select(0, out_idx).contiguous())
    if mod.bias is not None:
        _set_param(mod, "bias", mod.bias.detach().index_select(0, out_idx))
    if isinstance(mod, nn.Linear):
        mod.in_features, mod.out_features = int(keep_in.sum()), int(keep_out.sum())
    else:
        mod.in_channels, mod.out_channels = int(keep_in.sum()), int(keep_out.sum())
        if layer.kind == "depthwise":
            mod.groups = mod.in_channels


def _cut_norm(bn: nn.Module, keep: np.ndarray) -> None:
    idx = torch.from_numpy(np.flatnonzero(keep)).to(bn.running_mean.device)
    for name in ("weight", "bias"):
        if getattr(bn, name) is not None:
            _set_param(bn, name, getattr(bn, name).detach().index_select(0, idx))
    bn.running_mean = bn.running_mean.index_select(0, idx)
    bn.running_var = bn.running_var.index_select(0, idx)
    bn.num_features = len(idx)


def _cut_pad(node: fx.Node, front: int, back: int) -> None:
    pad = list(node.args[1])
    ndim = len(shape_of(node))
    while len(pad) < 2 * (ndim - 1):
        pad.append(0)
    pad[2 * (ndim - 2)], pad[2 * (ndim - 2) + 1] = front, back
    node.args = (node.args[0], tuple(pad), *node.args[2:])


def _apply(g: ChannelGraph, roots: np.ndarray, removed: np.ndarray) -> None:
    def keep(node: fx.Node) -> np.ndarray:
        return ~removed[roots[g.info[node].slots]]

    for layer in g.layers:
        _cut_layer(g, layer, keep)
    for node, bn in g.norms:
        _cut_norm(bn, keep(node))
    for node, (fs, bs) in g.pads.items():
        _cut_pad(node, int((~removed[roots[fs]]).sum()), int((~removed[roots[bs]]).sum()))
    g.gm.graph.lint()
    g.gm.recompile()


# --------------------------------------------------------------------------- entry point


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure gets the same advice
        raise TypeError(
            f"shrink: torch.fx cannot trace {type(model).__name__} ({exc}); shrink needs a "
            f"forward without data-dependent control flow"
        ) from exc


def _check(want: object, shrunk: nn.Module, example_input: Tensor) -> None:
    """The shrunk model must reproduce the input model's output ``want`` on
    ``example_input``."""
    with torch.inference_mode():
        got = shrunk(example_input)
    if not isinstance(want, Tensor) or not isinstance(got, Tensor):
        return
    err = (want.double() - got.double()).abs().max().item()
    scale = want.double().abs().max().item()
    if got.shape != want.shape or not err <= CHECK_RTOL * max(scale, 1e-12):
        raise RuntimeError(f"shrink: the shrunk model differs from the input model by {err:.3g} "
                           f"(max |output| {scale:.3g}); please report this model")


def shrink(model: nn.Module, example_input: Tensor, *, round_to: int | None = None
           ) -> nn.Module:
    """A physically smaller copy of ``model`` without its dead channels.

    Args:
        model: any module ``torch.fx`` can trace (the cvsparse zoo, torchvision ResNets,
            MobileNet-V2, DenseNets, ...); it is deep-copied, not modified.
        example_input: one input batch, e.g. ``(N, C, H, W)``; fixes the shapes the graph is
            analysed with (flatten sizes, padding) and checks the result.
        round_to: if given, every Conv/Linear keeps a multiple of ``round_to`` output
            channels (the removable channels with the largest weight norm are put back), unless
            that means all of them.

    Returns:
        A ``torch.fx.GraphModule`` in eval mode, with the same submodule names as ``model``,
        whose outputs equal ``model.eval()``'s (float rounding aside).  An output channel /
        neuron is removed — with the matching inputs of every layer that reads it, through
        BatchNorm, activations, pooling, flatten, residual additions and concatenations — when
        nothing downstream can tell: every reader has zero weights for it, or it is a constant
        folded into the reader's bias (see the module docstring).  A layer whose every channel
        is removable keeps one (``UserWarning``).

    Raises:
        TypeError: the model cannot be traced.
        ValueError: ``round_to`` is not a positive int.
        RuntimeError: the shrunk model's output on ``example_input`` differs from the input
            model's by more than :data:`CHECK_RTOL` relative (a self-check; never expected).
    """
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int)
                                 or round_to < 1):
        raise ValueError(f"round_to must be a positive int or None, got {round_to!r}")
    work = copy.deepcopy(model).eval()
    gm = _trace(work).eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
        want = gm(example_input)
    g = analyse(gm)
    roots = g.slots.roots()
    removed = _removable(g, roots)
    imp = _importance(g, roots)
    _keep_one(g, roots, removed, imp)
    if round_to is not None and round_to > 1:
        _round_to(g, roots, removed, imp, round_to)
    with torch.no_grad():
        _apply(g, roots, removed)
    _check(want, gm, example_input)
    return gm
