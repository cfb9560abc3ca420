"""What a compressed model costs: parameters, nonzeros, FLOPs, dead units; and its accuracy.

FLOP convention (docs/method.md §7: a multiply and an add count one each), for Conv and Linear
layers only (normalization, activations, pooling and additions are not counted):

- dense FLOPs of a layer = 2 · ``weight.numel()`` · output positions, where output positions is
  H_out·W_out for a Conv2d (likewise for Conv1d/3d) and 1 for a Linear on ``(N, F)`` inputs,
  for one input sample.  Biases are not counted separately: a dot product of n terms plus a bias
  is exactly n multiplies and n adds.  Kernel taps over zero padding count (the usual convention).
- effective FLOPs = 2 · (nonzero weights that read a live input) · output positions.  An input
  channel (or feature) is *dead* when it is provably zero for every input.  That is established
  only inside an ``nn.Sequential`` the model calls as a whole (so its children run in order):
  the output units of a Conv/Linear whose weights are all zero and whose bias is zero or absent
  are dead; zero-preserving layers (ReLU-like activations, dropout, max/avg pooling, identity)
  keep them dead; a BatchNorm keeps a channel dead only if it maps 0 to exactly 0; ``Flatten``
  maps a dead channel to its H·W features; any other layer ends the chain.  Everywhere else
  (residual blocks, concatenations, custom ``forward``) only the zero weights are discounted.
  Layers called more than once (shared weights) count every call and no dead inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .params import PRUNABLE_LAYERS, regularized_parameters
from .precision import FP32, Precision

_ZERO_PRESERVING = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs of one Conv/Linear layer for one input sample (see the module docstring).

    ``name``: module name; ``kind``: "conv" or "linear"; ``positions``: output positions summed
    over calls; ``dead_inputs``: input channels/features proven zero; ``nonzero_live``: nonzero
    weights reading a live input."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    positions: int
    dead_inputs: int
    nonzero_live: int
    flops_dense: int
    flops_effective: int


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive ints (C, H, W), got {input_shape!r}")
    return shape


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _chain(seq: nn.Sequential) -> Iterator[nn.Module]:
    """The leaves of a plain Sequential in execution order (nested plain Sequentials inlined)."""
    for child in seq:
        if _is_plain_sequential(child):
            yield from _chain(child)
        else:
            yield child


def _dead_outputs(layer: nn.Module) -> Tensor:
    """Output units of a Conv/Linear that are zero for every input (zero weights, zero bias)."""
    w = layer.weight.detach()
    dead = (w.reshape(w.shape[0], -1) == 0).all(dim=1)
    if layer.bias is not None:
        dead &= layer.bias.detach() == 0
    return dead.cpu()


def _propagate_dead(
    sequentials: Iterable[nn.Module],
    in_shapes: dict[nn.Module, tuple[int, ...]],
    calls: dict[nn.Module, int],
) -> dict[nn.Module, Tensor]:
    """Dead-input masks of the Conv/Linear layers reached by a dead-channel chain.  Runs the
    BatchNorm layers on zeros: call in eval mode under ``torch.no_grad``."""
    dead_in: dict[nn.Module, Tensor] = {}
    for seq in sequentials:
        dead: Tensor | None = None  # per channel of the current activation; None = unknown
        for m in _chain(seq):
            if isinstance(m, PRUNABLE_LAYERS):
                grouped = getattr(m, "groups", 1) != 1
                if dead is not None and calls.get(m) == 1 and not grouped:
                    if len(dead) == m.weight.shape[1]:
                        dead_in[m] = dead
                dead = _dead_outputs(m)
            elif isinstance(m, _ZERO_PRESERVING):
                continue
            elif isinstance(m, _BATCHNORM) and dead is not None and m in in_shapes:
                p = next(m.parameters(), None)
                zeros = torch.zeros(
                    in_shapes[m],
                    device=p.device if p is not None else None,
                    dtype=p.dtype if p is not None else None,
                )
                out = m(zeros).transpose(0, 1).reshape(len(dead), -1)
                dead = dead & (out == 0).all(dim=1).cpu()
            elif isinstance(m, nn.Flatten) and dead is not None and m in in_shapes:
                shape = in_shapes[m]
                if m.start_dim != 1 or m.end_dim != -1 or len(shape) < 2:
                    dead = None
                else:
                    dead = dead.repeat_interleave(math.prod(shape[2:]))
            else:
                dead = None
    return dead_in


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> list[LayerFlops]:
    """Per Conv/Linear layer (module order, layers the forward pass never reaches left out),
    dense and effective FLOPs of one forward pass on one sample of shape ``input_shape``
    (``(C, H, W)``, without the batch dimension).  Runs one forward pass on zeros with every
    module in eval mode (so no BatchNorm statistic changes and no RNG is drawn)."""
    shape = _check_input_shape(input_shape)
    ref = next(model.parameters(), None)
    x = torch.zeros(
        (1, *shape),
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None and ref.is_floating_point() else None,
    )
    positions: dict[nn.Module, int] = {}
    calls: dict[nn.Module, int] = {}
    in_shapes: dict[nn.Module, tuple[int, ...]] = {}
    called_sequentials: list[nn.Module] = []

    def layer_hook(m: nn.Module, _args: tuple, out: Tensor) -> None:
        positions[m] = positions.get(m, 0) + out.numel() // m.weight.shape[0]
        calls[m] = calls.get(m, 0) + 1

    def input_hook(m: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            in_shapes[m] = tuple(args[0].shape)

    def sequential_hook(m: nn.Module, _args: tuple) -> None:
        if m not in called_sequentials:
            called_sequentials.append(m)

    handles = []
    for m in model.modules():
        if isinstance(m, PRUNABLE_LAYERS):
            handles.append(m.register_forward_hook(layer_hook))
        elif isinstance(m, (*_BATCHNORM, nn.Flatten)):
            handles.append(m.register_forward_pre_hook(input_hook))
        elif _is_plain_sequential(m):
            handles.append(m.register_forward_pre_hook(sequential_hook))
    with eval_mode(model), torch.no_grad():
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
        dead_in = _propagate_dead(called_sequentials, in_shapes, calls)
    out = []
    for name, m in model.named_modules():
        if m not in positions:
            continue
        nonzero = m.weight.detach() != 0
        dead = dead_in.get(m)
        if dead is not None:
            nonzero = nonzero[:, ~dead.to(nonzero.device)]
        nonzero_live = int(nonzero.sum())
        out.append(
            LayerFlops(
                name=name,
                kind="linear" if isinstance(m, nn.Linear) else "conv",
                weight_shape=tuple(m.weight.shape),
                positions=positions[m],
                dead_inputs=int(dead.sum()) if dead is not None else 0,
                nonzero_live=nonzero_live,
                flops_dense=2 * m.weight.numel() * positions[m],
                flops_effective=2 * nonzero_live * positions[m],
            )
        )
    return out


def layer_table(model: nn.Module, input_shape: Sequence[int],
                names: Sequence[str] | None = None) -> list[dict]:
    """One row per regularized tensor (``cvsparse.params.regularized_parameters`` order; with
    ``names``, only the weights so named, see ``cvsparse.params.select_weights``):

    ``name`` (parameter name), ``shape``, ``params``, ``nonzero``, ``pruned_pct`` (100 · zero
    / params), ``compression_rate`` (params / nonzero; inf when all zero), ``flops_dense``,
    ``flops_effective`` (per sample, see :func:`count_flops`; 0 for a layer the forward pass
    never reaches), ``units_total`` (output channels / neurons = ``shape[0]``), ``units_zero``
    (those whose weights are all zero, bias ignored)."""
    flops = {f"{f.name}.weight" if f.name else "weight": f for f in count_flops(model, input_shape)}
    rows = []
    for name, w in regularized_parameters(model, names):
        w = w.detach()
        params = w.numel()
        nonzero = int((w != 0).sum())
        f = flops.get(name)
        rows.append(
            {
                "name": name,
                "shape": tuple(w.shape),
                "params": params,
                "nonzero": nonzero,
                "pruned_pct": 100.0 * (params - nonzero) / params if params else 0.0,
                "compression_rate": params / nonzero if nonzero else math.inf,
                "flops_dense": f.flops_dense if f else 0,
                "flops_effective": f.flops_effective if f else 0,
                "units_total": w.shape[0],
                "units_zero": int((w.reshape(w.shape[0], -1) == 0).all(dim=1).sum()),
            }
        )
    return rows


def summarize(rows: Sequence[dict], model: nn.Module | None = None) -> dict:
    """Totals over :func:`layer_table` rows.

    ``params_total`` / ``params_nonzero``: elements / nonzeros of the regularized tensors;
    ``compression_rate`` = params_total / params_nonzero (inf if 0); ``pruned_pct`` =
    100 · (1 − params_nonzero / params_total); ``flops_dense``, ``flops_effective``,
    ``units_total``, ``units_zero``: sums; ``params_all``: every parameter of ``model``
    (biases, normalization, ...), or None without ``model``."""
    total = sum(r["params"] for r in rows)
    nonzero = sum(r["nonzero"] for r in rows)
    return {
        "params_total": total,
        "params_nonzero": nonzero,
        "compression_rate": total / nonzero if nonzero else math.inf,
        "pruned_pct": 100.0 * (total - nonzero) / total if total else 0.0,
        "flops_dense": sum(r["flops_dense"] for r in rows),
        "flops_effective": sum(r["flops_effective"] for r in rows),
        "units_total": sum(r["units_total"] for r in rows),
        "units_zero": sum(r["units_zero"] for r in rows),
        "params_all": sum(p.numel() for p in model.parameters()) if model is not None else None,
    }


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str | None = None,
    precision: Precision | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict:
    """Mean ``loss`` and top-1 accuracy ``acc`` (in [0, 1]) of ``model`` over the ``(x, y)``
    batches of ``loader``, plus the sample count ``n``; eval mode (every module's own mode is
    restored afterwards), no grad.  Batches go to ``device`` (default: the model's).
    ``precision`` (default fp32, contiguous): the forward passes run under its autocast, on its
    layout of the batches; the loss is computed on float32 logits.  ``loss_fn``: None sums the
    cross-entropy over the samples; else ``loss_fn(logits, y)``, a batch mean, is weighted by
    the batch's size."""
    precision = FP32 if precision is None else precision
    if device is None:
        ref = next(model.parameters(), None)
        device = ref.device if ref is not None else torch.device("cpu")
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    with eval_mode(model), torch.no_grad():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with precision.autocast():
                logits = model(precision.input(x))
            if loss_fn is None:
                loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            else:
                loss_sum += loss_fn(logits.float(), y).double() * len(y)
            correct += (logits.argmax(dim=1) == y).sum()
            n += len(y)
    if n == 0:
        raise ValueError("loader yielded no samples")
    return {"loss": float(loss_sum) / n, "acc": int(correct) / n, "n": n}
