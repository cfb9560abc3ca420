"""The channel graph of a traced model: which channels are one, and which are constant.

:func:`analyse` takes a ``torch.fx.GraphModule`` whose shapes were propagated, gives every
channel (dim 1 of an activation) an identity — a *slot* — and follows the slots through the
graph op by op:

- a Conv (``groups=1``) or Linear *consumes* its input slots and *produces* fresh output slots;
- channel-wise ops (BatchNorm, activations, pooling, dropout, spatial slicing, depthwise convs)
  keep their input's slots; ``flatten`` repeats each slot over the H·W features it becomes;
- additions and multiplications of two activations merge their slots position by position (a
  residual stream is one set of slots across every block); ``torch.cat`` on dim 1 lists the
  slots of its inputs one after another (the concat offset); ``F.pad`` on the channel dimension
  adds fresh slots that hold the padding value;
- any other op, the model input and the model output *pin* their slots (never removed), as do
  the layers called more than once (shared weights) and the layers whose parameters the graph
  also reads directly.

Alongside the slots every channel carries its value where that value does not depend on the
input (a constant, computed in float64 with the module's real parameters, e.g. the
``β − γ·μ/σ`` a BatchNorm emits for a channel whose conv weights are all zero, through the
activation); elsewhere it is "varying" (NaN).  Merged slots form *classes*: the union-find
:class:`Slots` gives each slot its class.  :mod:`cvsparse.export.shrink` decides from this
graph which classes to remove and cuts them out.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["ActivationInfo", "ChannelGraph", "Layer", "Slots", "analyse", "foldable",
           "shape_of", "weight64"]

_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
_CHANNELWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish,
    F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.max_pool1d,
    F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d,
}
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
_BINARY = {
    operator.add: operator.add, torch.add: operator.add, "add": operator.add,
    "add_": operator.add, operator.iadd: operator.add,
    operator.sub: operator.sub, torch.sub: operator.sub, "sub": operator.sub,
    operator.mul: operator.mul, torch.mul: operator.mul, "mul": operator.mul,
    "mul_": operator.mul, operator.imul: operator.mul,
}
_NEUTRAL_METHODS = {"size", "dim"}  # read no channel value and return no activation
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class ActivationInfo:
    """What is known about one activation ``(N, C, ...)``: ``slots`` (int64 ``(C,)``), the
    slot of each channel; ``const`` (float64 ``(C,)``), its input-independent value, NaN where
    it varies with the input."""

    slots: np.ndarray
    const: np.ndarray


class Slots:
    """Union-find over slot ids, with a pinned flag per slot."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pinned: list[bool] = []

    def new(self, n: int, pinned: bool = False) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.pinned.extend([pinned] * n)
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx

    def pin(self, slots: np.ndarray) -> None:
        for s in slots.tolist():
            self.pinned[s] = True

    def roots(self) -> np.ndarray:
        """Class id (root) of every slot, int64 ``(n_slots,)``."""
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


@dataclass
class Layer:
    """A Conv/Linear call: ``kind`` "dense" (groups=1 conv or Linear: consumes its input
    slots) or "depthwise" (groups = in_channels: keeps them)."""

    node: fx.Node
    module: nn.Module
    kind: str
    src: fx.Node


@dataclass
class ChannelGraph:
    """The analysed graph: slot infos per node, the layers, the BatchNorm calls and the channel
    pads (node → fresh front / back slots)."""

    gm: fx.GraphModule
    slots: Slots = field(default_factory=Slots)
    info: dict[fx.Node, ActivationInfo | None] = field(default_factory=dict)
    layers: list[Layer] = field(default_factory=list)
    norms: list[tuple[fx.Node, nn.Module]] = field(default_factory=list)
    pads: dict[fx.Node, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The shape ``ShapeProp`` recorded for ``node``'s output, None if it is not a tensor."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _nodes_in(args: object) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, lambda n: found.append(n) or n)
    return found


def _unknown(g: ChannelGraph, node: fx.Node) -> ActivationInfo | None:
    """An op not understood: pin every input activation; a tensor output gets pinned slots."""
    for arg in _nodes_in((node.args, node.kwargs)):
        info = g.info.get(arg)
        if info is not None:
            g.slots.pin(info.slots)
    shape = shape_of(node)
    if shape is None or len(shape) < 2:
        return None
    return ActivationInfo(g.slots.new(shape[1], pinned=True), np.full(shape[1], np.nan))


def _uniform(y: Tensor, known: np.ndarray) -> np.ndarray:
    """Per channel of ``y`` ``(N, C, ...)``: its value if ``known`` and the same everywhere
    (to 1e-12 relative), NaN otherwise."""
    flat = y.transpose(0, 1).reshape(y.shape[1], -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    scale = 1.0 + torch.maximum(lo.abs(), hi.abs())
    same = ((hi - lo) <= 1e-12 * scale).numpy() & np.isfinite(hi.numpy())
    return np.where(known & same, flat.mean(dim=1).numpy(), np.nan)


def _channelwise(g: ChannelGraph, node: fx.Node,
                 fn: Callable[[Tensor], Tensor]) -> ActivationInfo | None:
    """An op that maps channel c to channel c only: same slots; constants are pushed through
    ``fn`` on a filled float64 tensor of the input's shape (batch 1), which catches padding."""
    src = node.args[0]
    info = g.info.get(src) if isinstance(src, fx.Node) else None
    shape, out_shape = shape_of(src) if info is not None else None, shape_of(node)
    if info is None or shape is None or out_shape is None or out_shape[1:2] != shape[1:2]:
        return _unknown(g, node)
    known = ~np.isnan(info.const)
    const = np.full(len(known), np.nan)
    if known.any():
        filled = torch.zeros((1, *shape[1:]), dtype=torch.float64)
        view = filled.view(1, shape[1], -1)
        view[0] = torch.from_numpy(np.nan_to_num(info.const, nan=0.0))[:, None]
        with torch.no_grad():
            const = _uniform(fn(filled), known)
    return ActivationInfo(info.slots, const)


def _rest(node: fx.Node) -> tuple[tuple, dict] | None:
    """``node``'s arguments after the first, or None if any of them is another node."""
    rest, kwargs = node.args[1:], dict(node.kwargs)
    kwargs.pop("inplace", None)
    return None if _nodes_in((rest, kwargs)) else (rest, kwargs)


def _batchnorm(g: ChannelGraph, node: fx.Node, bn: nn.Module) -> ActivationInfo | None:
    info = g.info.get(node.args[0])
    if info is None or bn.running_mean is None or len(info.slots) != bn.num_features:
        return _unknown(g, node)
    mean, var = bn.running_mean.double().cpu().numpy(), bn.running_var.double().cpu().numpy()
    const = (info.const - mean) / np.sqrt(var + bn.eps)
    if bn.weight is not None:
        const = const * bn.weight.detach().double().cpu().numpy()
        const = const + bn.bias.detach().double().cpu().numpy()
    g.norms.append((node, bn))
    return ActivationInfo(info.slots, const)


def foldable(layer: nn.Module, const: np.ndarray) -> np.ndarray:
    """Per input channel: its constant (NaN: none) can be folded exactly into ``layer``'s
    output — always for a Linear; for a conv if it pads nothing, pads other than with zeros, or
    the constant is 0."""
    known = ~np.isnan(const)
    if isinstance(layer, nn.Linear):
        return known
    pads_zeros = layer.padding_mode == "zeros" and (
        layer.padding == "same" or any(p != 0 for p in np.atleast_1d(layer.padding))
    )
    return known if not pads_zeros else known & (const == 0)


def weight64(layer: nn.Module) -> np.ndarray:
    """``layer``'s weight as float64 ``(out, in, k)`` (k = 1 for a Linear)."""
    w = layer.weight.detach().double().cpu()
    return w.reshape(w.shape[0], w.shape[1], -1).numpy()


def _bias64(layer: nn.Module) -> np.ndarray:
    if layer.bias is None:
        return np.zeros(layer.weight.shape[0])
    return layer.bias.detach().double().cpu().numpy()


def _dense(g: ChannelGraph, node: fx.Node, layer: nn.Module) -> ActivationInfo | None:
    """A groups=1 conv or a Linear on ``(N, F)``: fresh output slots; an output is constant
    when every input it reads with a nonzero weight is a foldable constant."""
    src = node.args[0]
    info = g.info.get(src)
    if info is None or len(info.slots) != layer.weight.shape[1]:
        return _unknown(g, node)
    if isinstance(layer, nn.Linear) and len(shape_of(src) or ()) != 2:
        return _unknown(g, node)
    w = weight64(layer)
    reads = (w != 0).any(axis=2)  # (out, in)
    ok = foldable(layer, info.const)
    k = np.where(ok, info.const, 0.0)
    const = _bias64(layer) + w.sum(axis=2) @ k
    const[(reads & ~ok).any(axis=1)] = np.nan
    g.layers.append(Layer(node, layer, "dense", src))
    return ActivationInfo(g.slots.new(layer.weight.shape[0]), const)


def _depthwise(g: ChannelGraph, node: fx.Node, conv: nn.Module) -> ActivationInfo | None:
    """A conv with groups = in_channels: output channel o reads input channel o // m only, so
    it keeps that channel's slot."""
    src = node.args[0]
    info = g.info.get(src)
    if info is None or len(info.slots) != conv.in_channels:
        return _unknown(g, node)
    m = conv.out_channels // conv.in_channels
    w = weight64(conv)[:, 0]  # (out, k)
    const_in = np.repeat(info.const, m)
    ok = foldable(conv, const_in)
    const = _bias64(conv) + w.sum(axis=1) * np.where(ok, const_in, 0.0)
    const[(w != 0).any(axis=1) & ~ok] = np.nan
    g.layers.append(Layer(node, conv, "depthwise", src))
    return ActivationInfo(np.repeat(info.slots, m), const)


def _flatten(g: ChannelGraph, node: fx.Node) -> ActivationInfo | None:
    """``(N, C, *S) → (N, C·prod(S))``: each slot repeated over its prod(S) features."""
    src = node.args[0]
    info = g.info.get(src) if isinstance(src, fx.Node) else None
    shape, out_shape = shape_of(src) if info is not None else None, shape_of(node)
    if info is None or shape is None or out_shape is None:
        return _unknown(g, node)
    per = math.prod(shape[2:])
    if out_shape != (shape[0], shape[1] * per):
        return _unknown(g, node)
    return ActivationInfo(np.repeat(info.slots, per), np.repeat(info.const, per))


def _is_flatten(node: fx.Node) -> bool:
    """``torch.flatten(x, 1)``, ``x.flatten(1)``, ``x.view(n, -1)`` or ``x.reshape(n, -1)``."""
    args, kw = node.args, node.kwargs
    if node.target in (torch.flatten, "flatten"):
        start = args[1] if len(args) > 1 else kw.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kw.get("end_dim", -1)
        return start == 1 and end == -1
    if node.target in ("view", "reshape"):
        sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        return len(sizes) == 2 and sizes[1] == -1 and not kw
    return False


def _binary(g: ChannelGraph, node: fx.Node, op: Callable) -> ActivationInfo | None:
    """``a ∘ b`` with ∘ in {+, −, ×}: two activations of the same channels merge their slots;
    an activation and a number keep the activation's."""
    if len(node.args) != 2 or node.kwargs:
        return _unknown(g, node)
    a, b = node.args
    ia = g.info.get(a) if isinstance(a, fx.Node) else None
    ib = g.info.get(b) if isinstance(b, fx.Node) else None
    out_shape = shape_of(node)
    if out_shape is None:
        return _unknown(g, node)
    if ia is not None and ib is not None:
        same = len(ia.slots) == len(ib.slots) == out_shape[1]
        if not same or len(shape_of(a) or ()) != len(shape_of(b) or ()):
            return _unknown(g, node)
        g.slots.union(ia.slots, ib.slots)
        return ActivationInfo(ia.slots, op(ia.const, ib.const))
    info, other = (ia, b) if ia is not None else (ib, a)
    if info is None or not isinstance(other, (int, float)) or len(info.slots) != out_shape[1]:
        return _unknown(g, node)
    const = op(info.const, other) if ia is not None else op(other, info.const)
    return ActivationInfo(info.slots, np.asarray(const, dtype=np.float64))


def _cat(g: ChannelGraph, node: fx.Node) -> ActivationInfo | None:
    """``torch.cat(xs, dim=1)``: the inputs' slots one after another."""
    xs = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out_shape = shape_of(node)
    if not isinstance(xs, (list, tuple)) or not isinstance(dim, int):
        return _unknown(g, node)
    infos = [g.info.get(x) if isinstance(x, fx.Node) else None for x in xs]
    if out_shape is None or any(i is None for i in infos) or dim % len(out_shape) != 1:
        return _unknown(g, node)
    return ActivationInfo(np.concatenate([i.slots for i in infos]),
                 np.concatenate([i.const for i in infos]))


def _pad(g: ChannelGraph, node: fx.Node) -> ActivationInfo | None:
    """``F.pad(x, pad, "constant", value)``: channel padding adds fresh slots holding
    ``value``; spatial padding keeps a constant only where it equals ``value``."""
    x, pad = node.args[0], node.args[1]
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    value = 0.0 if value is None else value
    info, shape = g.info.get(x), shape_of(x)
    ok = isinstance(pad, (tuple, list)) and all(isinstance(p, int) for p in pad)
    if info is None or shape is None or mode != "constant" or not ok or len(pad) % 2:
        return _unknown(g, node)
    pairs = [tuple(pad[i:i + 2]) for i in range(0, len(pad), 2)]  # last dim first
    ndim = len(shape)
    if any(p < 0 for p in pad) or len(pairs) > ndim or (len(pairs) == ndim and any(pairs[-1])):
        return _unknown(g, node)
    front, back = pairs[ndim - 2] if len(pairs) >= ndim - 1 else (0, 0)
    spatial = any(any(p) for p in pairs[: ndim - 2])
    const = np.where(info.const == value, info.const, np.nan) if spatial else info.const
    fs, bs = g.slots.new(front), g.slots.new(back)
    g.pads[node] = (fs, bs)
    return ActivationInfo(np.concatenate([fs, info.slots, bs]),
                 np.concatenate([np.full(front, float(value)), const,
                                 np.full(back, float(value))]))


def _getitem(g: ChannelGraph, node: fx.Node) -> ActivationInfo | None:
    """``x[:, :, <slices>]``: spatial slicing keeps channels (and constants)."""
    x, idx = node.args
    info = g.info.get(x) if isinstance(x, fx.Node) else None
    if info is None:
        return None if shape_of(node) is None else _unknown(g, node)
    idx = idx if isinstance(idx, tuple) else (idx,)
    full = slice(None, None, None)
    slices = all(isinstance(i, slice) and not _nodes_in((i.start, i.stop, i.step)) for i in idx)
    if not slices or any(i != full for i in idx[:2]):
        return _unknown(g, node)
    return ActivationInfo(info.slots, info.const)


def _call_module(g: ChannelGraph, node: fx.Node, calls: Counter) -> ActivationInfo | None:
    mod = g.gm.get_submodule(node.target)
    stateful = any(True for _ in mod.parameters()) or any(True for _ in mod.buffers())
    if stateful and calls[node.target] > 1:
        return _unknown(g, node)  # shared weights: left as they are
    if isinstance(mod, _CONV) and mod.groups == 1:
        return _dense(g, node, mod)
    if isinstance(mod, _CONV) and mod.groups == mod.in_channels:
        return _depthwise(g, node, mod)
    if isinstance(mod, nn.Linear):
        return _dense(g, node, mod)
    if isinstance(mod, _BATCHNORM):
        return _batchnorm(g, node, mod)
    if isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1:
        return _flatten(g, node)
    if isinstance(mod, _CHANNELWISE_MODULES) and len(node.args) == 1 and not node.kwargs:
        fn = copy.deepcopy(mod).double()
        if hasattr(fn, "inplace"):
            fn.inplace = False
        return _channelwise(g, node, fn.eval())
    return _unknown(g, node)


def _call_function(g: ChannelGraph, node: fx.Node) -> ActivationInfo | None:
    target = node.target
    if target in _CHANNELWISE_FUNCTIONS:
        rest = _rest(node)
        if rest is None:
            return _unknown(g, node)
        if target is F.dropout:  # eval mode: the identity
            return _channelwise(g, node, lambda t: t)
        return _channelwise(g, node, lambda t: target(t, *rest[0], **rest[1]))
    if target is torch.flatten and _is_flatten(node):
        return _flatten(g, node)
    if target in _BINARY:
        return _binary(g, node, _BINARY[target])
    if target in (torch.cat, torch.concat):
        return _cat(g, node)
    if target is F.pad:
        return _pad(g, node)
    if target is operator.getitem:
        return _getitem(g, node)
    if target is getattr and node.args[1] in ("shape", "dtype", "device"):
        return None
    return _unknown(g, node)


def _call_method(g: ChannelGraph, node: fx.Node) -> ActivationInfo | None:
    target = node.target
    if target in _NEUTRAL_METHODS:
        return None
    if target in _CHANNELWISE_METHODS:
        rest = _rest(node)
        if rest is None:
            return _unknown(g, node)
        name = target.rstrip("_")
        return _channelwise(g, node, lambda t: getattr(t, name)(*rest[0], **rest[1]))
    if _is_flatten(node):
        return _flatten(g, node)
    if target in _BINARY:
        return _binary(g, node, _BINARY[target])
    return _unknown(g, node)


def analyse(gm: fx.GraphModule) -> ChannelGraph:
    """Slots, constants and layers of every node of ``gm`` (shapes already propagated)."""
    g = ChannelGraph(gm)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = shape_of(node)
            g.info[node] = None if shape is None or len(shape) < 2 else ActivationInfo(
                g.slots.new(shape[1], pinned=True), np.full(shape[1], np.nan))
        elif node.op == "get_attr":
            g.info[node] = None
        elif node.op == "call_module":
            g.info[node] = _call_module(g, node, calls)
        elif node.op == "call_function":
            g.info[node] = _call_function(g, node)
        elif node.op == "call_method":
            g.info[node] = _call_method(g, node)
        elif node.op == "output":
            _unknown(g, node)
    _pin_attribute_users(g)
    return g


def _pin_attribute_users(g: ChannelGraph) -> None:
    """A layer whose parameters the graph also reads directly (``get_attr``) is left as is."""
    attrs = [n.target for n in g.gm.graph.nodes if n.op == "get_attr"]
    kept = []
    for layer in g.layers:
        prefix = f"{layer.node.target}."
        if any(a.startswith(prefix) for a in attrs):
            g.slots.pin(g.info[layer.src].slots)
            g.slots.pin(g.info[layer.node].slots)
        else:
            kept.append(layer)
    g.layers = kept
