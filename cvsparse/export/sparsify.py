"""Swap sparse-enough ``Conv2d`` / ``Linear`` layers for :mod:`cvsparse.nn`'s sparse inference
layers where they measure faster on this machine.

A layer is a candidate when the fraction of exact zeros in its weight is at least
``min_sparsity`` (and, for a convolution, :meth:`SparseConv2d.supports` it).  In a
``nn.Sequential``, an eval-mode ``BatchNorm2d`` right after a convolution is folded into it
(rows of W scaled by γ/√(var + ε), which keeps every zero), a ``ReLU`` after the layer (or
after the folded BatchNorm) is fused into the kernel, and a non-overlapping ``MaxPool2d``
after a convolution (kernel = stride, no padding) into the layer (the ReLU may also come after
the pool: the two commute); the replaced followers become ``nn.Identity``.  Each candidate is
timed on the input shape it receives when ``example_input`` runs through the model: the dense
layer with its followers against the sparse replacement, interleaved, in
``torch.inference_mode`` at the current thread count.  It is replaced only when the sparse
median is lower.  Everything measured goes into the returned report.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from cvsparse.nn.sparse import SparseConv2d, SparseLinear

__all__ = ["sparsify", "SparsifyReport", "LayerChoice"]


@dataclass
class LayerChoice:
    """What :func:`sparsify` decided for one Conv2d / Linear layer.

    Times are medians in milliseconds of the dense layer (with the followers that were fused)
    and of its sparse replacement on the recorded input shape; ``None`` when not timed.
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    sparsity: float
    input_shape: tuple[int, ...] | None = None
    fused: list[str] = field(default_factory=list)
    dense_ms: float | None = None
    sparse_ms: float | None = None
    replaced: bool = False
    reason: str = ""

    @property
    def speedup(self) -> float | None:
        """dense / sparse time (> 1: the sparse layer is faster)."""
        if self.dense_ms is None or not self.sparse_ms:
            return None
        return self.dense_ms / self.sparse_ms


@dataclass
class SparsifyReport:
    """The decisions of one :func:`sparsify` call, in module order."""

    min_sparsity: float
    threads: int
    layers: list[LayerChoice] = field(default_factory=list)

    @property
    def replaced(self) -> list[str]:
        """Names of the layers that were replaced."""
        return [c.name for c in self.layers if c.replaced]

    def to_dict(self) -> dict:
        """JSON-ready form (times in ms)."""
        return {"min_sparsity": self.min_sparsity, "threads": self.threads,
                "layers": [asdict(c) | {"speedup": c.speedup} for c in self.layers]}

    def __str__(self) -> str:
        lines = ["| layer | kind | sparsity | input | fused | dense ms | sparse ms | speed-up | "
                 "replaced |", "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | --- |"]
        for c in self.layers:
            def ms(v: float | None) -> str:
                return "—" if v is None else f"{v:.4f}"
            speed = "—" if c.speedup is None else f"{c.speedup:.2f}x"
            shape = "—" if c.input_shape is None else "x".join(map(str, c.input_shape))
            lines.append(f"| {c.name} | {c.kind} | {c.sparsity:.2%} | {shape} | "
                         f"{'+'.join(c.fused) or '—'} | {ms(c.dense_ms)} | {ms(c.sparse_ms)} | "
                         f"{speed} | {'yes' if c.replaced else 'no: ' + c.reason} |")
        return "\n".join(lines)


def sparsify(model: nn.Module, min_sparsity: float = 0.7, example_input: Tensor | None = None,
             *, fuse: bool = True, min_time: float = 0.02) -> SparsifyReport:
    """Replaces, in place, each eligible Conv2d / Linear of ``model`` by its sparse layer.

    Args:
        model: the model, on CPU; call ``model.eval()`` first (BatchNorm is folded only in eval
            mode, where it is a fixed affine map).
        min_sparsity: smallest fraction of zero weights, in [0, 1], for a layer to be tried.
        example_input: a batch the model accepts; its shape per layer is what gets timed.
            Without it only Linear layers are timed (at batch 1); convolutions stay dense.
        fuse: fold a following eval-mode BatchNorm2d and fuse a following ReLU and
            non-overlapping MaxPool2d (in a ``nn.Sequential``).
        min_time: seconds of timing per implementation and layer (at least 5 calls each).

    Returns:
        A :class:`SparsifyReport` with one :class:`LayerChoice` per Conv2d / Linear layer.
    """
    if not 0.0 <= float(min_sparsity) <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    report = SparsifyReport(float(min_sparsity), torch.get_num_threads())
    shapes = _input_shapes(model, example_input)
    for name, module, parent, key in _layers(model):
        weight = module.weight.detach()
        choice = LayerChoice(name, type(module).__name__, tuple(weight.shape),
                             float((weight == 0).sum()) / max(weight.numel(), 1),
                             input_shape=shapes.get(name))
        report.layers.append(choice)
        if weight.device.type != "cpu":
            choice.reason = f"on {weight.device} (the choice is timed on CPU)"
            continue
        if choice.sparsity < min_sparsity:
            choice.reason = f"sparsity below {min_sparsity:.0%}"
            continue
        if isinstance(module, nn.Conv2d) and SparseConv2d.supports(module):
            choice.reason = f"unsupported: {SparseConv2d.supports(module)}"
            continue
        if choice.input_shape is None:
            if isinstance(module, nn.Linear) and example_input is None:
                choice.input_shape = (1, module.in_features)
            else:
                choice.reason = "not reached by example_input" if example_input is not None \
                    else "no example_input to time it on"
                continue
        followers = _followers(parent, key, module) if fuse else []
        dense = nn.Sequential(module, *(m for _, m in followers))
        sparse = _sparse_layer(module, [m for _, m in followers])
        choice.fused = [type(m).__name__ for _, m in followers]
        x = torch.randn(choice.input_shape, dtype=weight.dtype)
        with torch.inference_mode():
            if not torch.allclose(sparse(x), dense(x), rtol=1e-4, atol=1e-4):
                choice.reason = "sparse output differs from dense"  # never expected
                continue
            choice.dense_ms, choice.sparse_ms = _time_pair(dense, sparse, x, min_time)
        if choice.sparse_ms >= choice.dense_ms:
            choice.reason = "dense is faster here"
            continue
        choice.replaced = True
        _set(parent, key, sparse)
        for follower_key, _ in followers:
            _set(parent, follower_key, nn.Identity())
    return report


def _layers(model: nn.Module):
    """(qualified name, module, parent, key in parent) of every Conv2d / Linear, in order."""
    out = []
    for parent_name, parent in model.named_modules():
        for key, child in parent.named_children():
            if isinstance(child, (nn.Conv2d, nn.Linear)) and type(child) in (nn.Conv2d,
                                                                              nn.Linear):
                out.append((f"{parent_name}.{key}" if parent_name else key, child, parent, key))
    return out


def _input_shapes(model: nn.Module, example_input: Tensor | None) -> dict[str, tuple[int, ...]]:
    """Input shape of every Conv2d / Linear when ``example_input`` runs through ``model``."""
    if example_input is None:
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, module, _, _ in _layers(model):
        def hook(mod, args, name=name):
            shapes.setdefault(name, tuple(args[0].shape))
        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _followers(parent: nn.Module, key: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """What follows ``module`` in a Sequential and fuses into it: for a convolution an
    eval-mode BatchNorm2d, then a ReLU and a non-overlapping MaxPool2d in either order; for a
    Linear a ReLU."""
    if not isinstance(parent, nn.Sequential):
        return []
    keys = [k for k, _ in parent.named_children()]
    out: list[tuple[str, nn.Module]] = []
    i = keys.index(key) + 1

    def take(kind: type) -> None:  # the next module, if it is a `kind` not taken yet
        nonlocal i
        if i < len(keys) and type(parent.get_submodule(keys[i])) is kind \
                and not any(type(m) is kind for _, m in out):
            out.append((keys[i], parent.get_submodule(keys[i])))
            i += 1

    if not isinstance(module, nn.Conv2d):
        take(nn.ReLU)
        return out
    if i < len(keys) and type(parent.get_submodule(keys[i])) is nn.BatchNorm2d:
        bn = parent.get_submodule(keys[i])
        if not bn.training and bn.track_running_stats and bn.running_mean is not None:
            take(nn.BatchNorm2d)
    for _ in range(2):  # ReLU then pool, or pool then ReLU
        if i < len(keys) and _pool_size(parent.get_submodule(keys[i])) is not None:
            take(nn.MaxPool2d)
        else:
            take(nn.ReLU)
    return out


def _pool_size(module: nn.Module) -> int | None:
    """k if ``module`` is a ``MaxPool2d`` that a sparse convolution can fuse (k × k, stride k,
    no padding, dilation 1, floor, no indices), else None."""
    if type(module) is not nn.MaxPool2d or module.return_indices or module.ceil_mode:
        return None
    pairs = [(v, v) if isinstance(v, int) else tuple(v)
             for v in (module.kernel_size, module.stride, module.padding, module.dilation)]
    kernel, stride, padding, dilation = pairs
    if kernel[0] != kernel[1] or stride != kernel or padding != (0, 0) or dilation != (1, 1):
        return None
    return int(kernel[0])


def _sparse_layer(module: nn.Module, followers: list[nn.Module]) -> nn.Module:
    relu = any(isinstance(m, nn.ReLU) for m in followers)
    if isinstance(module, nn.Linear):
        return SparseLinear.from_dense(module, relu=relu)
    weight = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()
    bns = [m for m in followers if isinstance(m, nn.BatchNorm2d)]
    if bns:
        bn = bns[0]
        scale = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_var)
        shift = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
        scale = scale / torch.sqrt(bn.running_var + bn.eps)
        weight = weight * scale.reshape(-1, 1, 1, 1).to(weight.dtype)
        bias = shift - bn.running_mean * scale + (0 if bias is None else bias * scale)
    pools = [_pool_size(m) for m in followers if isinstance(m, nn.MaxPool2d)]
    return SparseConv2d.from_dense(module, relu=relu, weight=weight, bias=bias,
                                   pool=pools[0] if pools else 1)


def _time_pair(dense: Callable[[Tensor], object], sparse: Callable[[Tensor], object], x: Tensor,
               min_time: float) -> tuple[float, float]:
    """Median ms of ``dense(x)`` and ``sparse(x)``, sampled alternately for ``min_time`` s each
    (≥ 5 samples)."""
    for fn in (dense, sparse):
        fn(x)  # warm-up (first-call allocations, caches)
    times: dict[int, list[float]] = {0: [], 1: []}
    spent = 0.0
    while spent < 2 * min_time or len(times[0]) < 5:
        for k, fn in enumerate((dense, sparse)):
            start = time.perf_counter()
            fn(x)
            elapsed = time.perf_counter() - start
            times[k].append(elapsed)
            spent += elapsed
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def _set(parent: nn.Module, key: str, module: nn.Module) -> None:
    setattr(parent, key, module)
