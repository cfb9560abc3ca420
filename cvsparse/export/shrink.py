"""Structured shrink: remove dead channels from the traced graph of a model.

:func:`shrink` traces the model with ``torch.fx``, gives every channel (dim 1 of an activation)
an identity — a *slot* — and follows the slots through the graph op by op:

- a Conv (``groups=1``) or Linear *consumes* its input slots and *produces* fresh output slots;
- channel-wise ops (BatchNorm, activations, pooling, dropout, spatial slicing, depthwise convs)
  keep their input's slots; ``flatten`` repeats each slot over the H·W features it becomes;
- additions and multiplications of two activations merge their slots position by position (a
  residual stream is one set of slots across every block); ``torch.cat`` on dim 1 lists the
  slots of its inputs one after another (the concat offset); ``F.pad`` on the channel dimension
  adds fresh slots that hold the padding value;
- any other op, the model input and the model output *pin* their slots (never removed), as do
  the layers called more than once (shared weights).

Alongside the slots every channel carries its value where that value does not depend on the
input (a constant, computed in float64 with the module's real parameters, e.g. the
``β − γ·μ/σ`` a BatchNorm emits for a channel whose conv weights are all zero, through the
activation); elsewhere it is "varying".  Merged slots form *classes* that are removed together.
A class is removed when it is not pinned and, at every Conv/Linear that reads it, either the
consumer's weights for it are all zero, or it holds a constant that folds exactly into the
consumer's bias: always for a Linear, for a convolution when its padding is 0 (any kernel size),
when it does not pad with zeros, or when the constant is 0.  Every output channel / neuron whose
weights are all zero is thus removed unless its constant cannot be folded exactly (e.g. a
nonzero constant read by a zero-padded 3×3 convolution, whose borders would see it differ).

The result is the traced ``torch.fx.GraphModule`` (same submodule names, so the same
``state_dict`` keys with narrower tensors, plus a ``bias`` where a folded constant needed one)
in eval mode.  Outputs equal the input model's in
eval mode (BatchNorm with its running statistics; dropout off); the input model is not modified.
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["shrink"]

#: Relative tolerance of the self-check that compares the shrunk and the input model.
CHECK_RTOL = 1e-4

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
class _Info:
    """What is known about one activation ``(N, C, ...)``: ``slots`` (int64 ``(C,)``), the
    slot of each channel; ``const`` (float64 ``(C,)``), its input-independent value, NaN where
    it varies with the input."""

    slots: np.ndarray
    const: np.ndarray


class _Slots:
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
class _Layer:
    """A Conv/Linear call: ``kind`` "dense" (groups=1 conv or Linear: consumes its input
    slots) or "depthwise" (groups = in_channels: keeps them)."""

    node: fx.Node
    module: nn.Module
    kind: str
    src: fx.Node


@dataclass
class _Graph:
    """The analysed graph: slot infos per node, the layers, the BatchNorm calls and the channel
    pads (node → fresh front / back slots)."""

    gm: fx.GraphModule
    slots: _Slots = field(default_factory=_Slots)
    info: dict[fx.Node, _Info | None] = field(default_factory=dict)
    layers: list[_Layer] = field(default_factory=list)
    norms: list[tuple[fx.Node, nn.Module]] = field(default_factory=list)
    pads: dict[fx.Node, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


# --------------------------------------------------------------------------- analysis


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _nodes_in(args: object) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, lambda n: found.append(n) or n)
    return found


def _unknown(g: _Graph, node: fx.Node) -> _Info | None:
    """An op not understood: pin every input activation; a tensor output gets pinned slots."""
    for arg in _nodes_in((node.args, node.kwargs)):
        info = g.info.get(arg)
        if info is not None:
            g.slots.pin(info.slots)
    shape = _shape(node)
    if shape is None or len(shape) < 2:
        return None
    return _Info(g.slots.new(shape[1], pinned=True), np.full(shape[1], np.nan))


def _uniform(y: Tensor, known: np.ndarray) -> np.ndarray:
    """Per channel of ``y`` ``(N, C, ...)``: its value if ``known`` and the same everywhere
    (to 1e-12 relative), NaN otherwise."""
    flat = y.transpose(0, 1).reshape(y.shape[1], -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    scale = 1.0 + torch.maximum(lo.abs(), hi.abs())
    same = ((hi - lo) <= 1e-12 * scale).numpy() & np.isfinite(hi.numpy())
    return np.where(known & same, flat.mean(dim=1).numpy(), np.nan)


def _channelwise(g: _Graph, node: fx.Node, fn: Callable[[Tensor], Tensor]) -> _Info | None:
    """An op that maps channel c to channel c only: same slots; constants are pushed through
    ``fn`` on a filled float64 tensor of the input's shape (batch 1), which catches padding."""
    src = node.args[0]
    info = g.info.get(src) if isinstance(src, fx.Node) else None
    shape, out_shape = _shape(src) if info is not None else None, _shape(node)
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
    return _Info(info.slots, const)


def _rest(node: fx.Node) -> tuple[tuple, dict] | None:
    """``node``'s arguments after the first, or None if any of them is another node."""
    rest, kwargs = node.args[1:], dict(node.kwargs)
    kwargs.pop("inplace", None)
    return None if _nodes_in((rest, kwargs)) else (rest, kwargs)


def _batchnorm(g: _Graph, node: fx.Node, bn: nn.Module) -> _Info | None:
    info = g.info.get(node.args[0])
    if info is None or bn.running_mean is None or len(info.slots) != bn.num_features:
        return _unknown(g, node)
    mean, var = bn.running_mean.double().cpu().numpy(), bn.running_var.double().cpu().numpy()
    const = (info.const - mean) / np.sqrt(var + bn.eps)
    if bn.weight is not None:
        const = const * bn.weight.detach().double().cpu().numpy()
        const = const + bn.bias.detach().double().cpu().numpy()
    g.norms.append((node, bn))
    return _Info(info.slots, const)


def _foldable(layer: nn.Module, const: np.ndarray) -> np.ndarray:
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


def _weight64(layer: nn.Module) -> np.ndarray:
    """``layer``'s weight as float64 ``(out, in, k)`` (k = 1 for a Linear)."""
    w = layer.weight.detach().double().cpu()
    return w.reshape(w.shape[0], w.shape[1], -1).numpy()


def _bias64(layer: nn.Module) -> np.ndarray:
    if layer.bias is None:
        return np.zeros(layer.weight.shape[0])
    return layer.bias.detach().double().cpu().numpy()


def _dense(g: _Graph, node: fx.Node, layer: nn.Module) -> _Info | None:
    """A groups=1 conv or a Linear on ``(N, F)``: fresh output slots; an output is constant
    when every input it reads with a nonzero weight is a foldable constant."""
    src = node.args[0]
    info = g.info.get(src)
    if info is None or len(info.slots) != layer.weight.shape[1]:
        return _unknown(g, node)
    if isinstance(layer, nn.Linear) and len(_shape(src) or ()) != 2:
        return _unknown(g, node)
    w = _weight64(layer)
    reads = (w != 0).any(axis=2)  # (out, in)
    ok = _foldable(layer, info.const)
    k = np.where(ok, info.const, 0.0)
    const = _bias64(layer) + w.sum(axis=2) @ k
    const[(reads & ~ok).any(axis=1)] = np.nan
    g.layers.append(_Layer(node, layer, "dense", src))
    return _Info(g.slots.new(layer.weight.shape[0]), const)


def _depthwise(g: _Graph, node: fx.Node, conv: nn.Module) -> _Info | None:
    """A conv with groups = in_channels: output channel o reads input channel o // m only, so
    it keeps that channel's slot."""
    src = node.args[0]
    info = g.info.get(src)
    if info is None or len(info.slots) != conv.in_channels:
        return _unknown(g, node)
    m = conv.out_channels // conv.in_channels
    w = _weight64(conv)[:, 0]  # (out, k)
    const_in = np.repeat(info.const, m)
    ok = _foldable(conv, const_in)
    const = _bias64(conv) + w.sum(axis=1) * np.where(ok, const_in, 0.0)
    const[(w != 0).any(axis=1) & ~ok] = np.nan
    g.layers.append(_Layer(node, conv, "depthwise", src))
    return _Info(np.repeat(info.slots, m), const)


def _flatten(g: _Graph, node: fx.Node) -> _Info | None:
    """``(N, C, *S) → (N, C·prod(S))``: each slot repeated over its prod(S) features."""
    src = node.args[0]
    info = g.info.get(src) if isinstance(src, fx.Node) else None
    shape, out_shape = _shape(src) if info is not None else None, _shape(node)
    if info is None or shape is None or out_shape is None:
        return _unknown(g, node)
    per = math.prod(shape[2:])
    if out_shape != (shape[0], shape[1] * per):
        return _unknown(g, node)
    return _Info(np.repeat(info.slots, per), np.repeat(info.const, per))


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


def _binary(g: _Graph, node: fx.Node, op: Callable) -> _Info | None:
    """``a ∘ b`` with ∘ in {+, −, ×}: two activations of the same channels merge their slots;
    an activation and a number keep the activation's."""
    if len(node.args) != 2 or node.kwargs:
        return _unknown(g, node)
    a, b = node.args
    ia = g.info.get(a) if isinstance(a, fx.Node) else None
    ib = g.info.get(b) if isinstance(b, fx.Node) else None
    out_shape = _shape(node)
    if out_shape is None:
        return _unknown(g, node)
    if ia is not None and ib is not None:
        same = len(ia.slots) == len(ib.slots) == out_shape[1]
        if not same or len(_shape(a) or ()) != len(_shape(b) or ()):
            return _unknown(g, node)
        g.slots.union(ia.slots, ib.slots)
        return _Info(ia.slots, op(ia.const, ib.const))
    info, other = (ia, b) if ia is not None else (ib, a)
    if info is None or not isinstance(other, (int, float)) or len(info.slots) != out_shape[1]:
        return _unknown(g, node)
    const = op(info.const, other) if ia is not None else op(other, info.const)
    return _Info(info.slots, np.asarray(const, dtype=np.float64))


def _cat(g: _Graph, node: fx.Node) -> _Info | None:
    """``torch.cat(xs, dim=1)``: the inputs' slots one after another."""
    xs = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out_shape = _shape(node)
    if not isinstance(xs, (list, tuple)) or not isinstance(dim, int):
        return _unknown(g, node)
    infos = [g.info.get(x) if isinstance(x, fx.Node) else None for x in xs]
    if out_shape is None or any(i is None for i in infos) or dim % len(out_shape) != 1:
        return _unknown(g, node)
    return _Info(np.concatenate([i.slots for i in infos]),
                 np.concatenate([i.const for i in infos]))


def _pad(g: _Graph, node: fx.Node) -> _Info | None:
    """``F.pad(x, pad, "constant", value)``: channel padding adds fresh slots holding
    ``value``; spatial padding keeps a constant only where it equals ``value``."""
    x, pad = node.args[0], node.args[1]
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    value = 0.0 if value is None else value
    info, shape = g.info.get(x), _shape(x)
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
    return _Info(np.concatenate([fs, info.slots, bs]),
                 np.concatenate([np.full(front, float(value)), const,
                                 np.full(back, float(value))]))


def _getitem(g: _Graph, node: fx.Node) -> _Info | None:
    """``x[:, :, <slices>]``: spatial slicing keeps channels (and constants)."""
    x, idx = node.args
    info = g.info.get(x) if isinstance(x, fx.Node) else None
    if info is None:
        return None if _shape(node) is None else _unknown(g, node)
    idx = idx if isinstance(idx, tuple) else (idx,)
    full = slice(None, None, None)
    slices = all(isinstance(i, slice) and not _nodes_in((i.start, i.stop, i.step)) for i in idx)
    if not slices or any(i != full for i in idx[:2]):
        return _unknown(g, node)
    return _Info(info.slots, info.const)


def _call_module(g: _Graph, node: fx.Node, calls: Counter) -> _Info | None:
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


def _call_function(g: _Graph, node: fx.Node) -> _Info | None:
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


def _call_method(g: _Graph, node: fx.Node) -> _Info | None:
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


def _analyse(gm: fx.GraphModule) -> _Graph:
    """Slots, constants and layers of every node of ``gm`` (shapes already propagated)."""
    g = _Graph(gm)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = _shape(node)
            g.info[node] = None if shape is None or len(shape) < 2 else _Info(
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


def _pin_attribute_users(g: _Graph) -> None:
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


# --------------------------------------------------------------------------- decision


def _importance(g: _Graph, roots: np.ndarray) -> np.ndarray:
    """Per class: the summed L2 norm of the output rows of its producing layers."""
    imp = np.zeros(len(roots))
    for layer in g.layers:
        w = layer.module.weight.detach().double().cpu()
        norms = w.reshape(w.shape[0], -1).norm(dim=1).numpy()
        np.add.at(imp, roots[g.info[layer.node].slots], norms)
    return imp


def _removable(g: _Graph, roots: np.ndarray) -> np.ndarray:
    """Per class (indexed by root): removable — not pinned, and every dense layer reading it
    either has all-zero weights for it or folds its constant exactly."""
    blocked = np.zeros(len(roots), dtype=bool)
    blocked[roots[np.flatnonzero(g.slots.pinned)]] = True
    for layer in g.layers:
        if layer.kind != "dense":
            continue
        info = g.info[layer.src]
        unread = ~(_weight64(layer.module) != 0).any(axis=(0, 2))
        ok = unread | _foldable(layer.module, info.const)
        blocked[roots[info.slots[~ok]]] = True
    return ~blocked


def _node_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _keep_one(g: _Graph, roots: np.ndarray, removed: np.ndarray, imp: np.ndarray) -> None:
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


def _round_to(g: _Graph, roots: np.ndarray, removed: np.ndarray, imp: np.ndarray,
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
    w = _weight64(layer)[:, dropped].sum(axis=2)  # (out, dropped)
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


def _cut_layer(g: _Graph, layer: _Layer, keep: Callable[[fx.Node], np.ndarray]) -> None:
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
    ndim = len(_shape(node))
    while len(pad) < 2 * (ndim - 1):
        pad.append(0)
    pad[2 * (ndim - 2)], pad[2 * (ndim - 2) + 1] = front, back
    node.args = (node.args[0], tuple(pad), *node.args[2:])


def _apply(g: _Graph, roots: np.ndarray, removed: np.ndarray) -> None:
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
    g = _analyse(gm)
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
