"""ProxSGD: proximal SGD with momentum for L1 + L2 regularized weights (docs/method.md §2, §4).

Each ``step()`` runs, per param group, one fused :func:`cvsparse.ops.prox_sgd_` call over the
group's parameters that have gradients (one call per dtype/device if the group mixes them),
followed by one :func:`cvsparse.ops.threshold_` call when the group has a ``threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import ops
from .faults import ExplodingGradientError, NonFiniteError

Hyper = float | Tensor


class ProxSGD(Optimizer):
    """Proximal SGD with momentum: ``d = g + λ2·w``; ``v = μ·v + d``; ``z = w − lr·v``;
    ``w = sign(z)·max(|z| − lr·λ1, 0)``; pruned weights (``mask`` False) stay at zero.

    With ``lambda1 = lambda2 = 0`` this is ``torch.optim.SGD(momentum=μ)`` (no dampening, no
    Nesterov); with ``lambda1 = 0`` it is ``SGD(weight_decay=λ2)``.

    Args:
        params: parameters or param-group dicts; every group may override the options below.
        lr: learning rate ≥ 0 (LR schedulers may change ``group["lr"]``).
        momentum: μ ≥ 0; buffers ``state[p]["momentum_buffer"]`` start at zero (none when μ = 0).
        lambda1, lambda2: L1 / L2 strength ≥ 0 of the group, a float or a 1-D tensor with one
            value per parameter of the group (a 0-dim or 1-element tensor applies to all).  A
            tensor is used by reference: updating it in place takes effect at the next step.
        threshold: magnitude-pruning threshold τ ≥ 0 applied after every step of the group
            (``None``: no pruning).  Pruning stores ``state[p]["mask"]`` (bool, False = pruned).
        check_finite: reject non-finite gradients before updating anything.  Costs one extra
            read of every gradient (``torch._foreach_norm`` with ord=inf) and one device sync
            per step; disable it for the last bit of speed.

    ``grad_norm_limit`` (attribute, default None): a step whose largest gradient entry
    (``|g|`` max over every parameter, read in the same pass as ``check_finite``) is above it
    raises :class:`~cvsparse.faults.ExplodingGradientError` before anything is updated.

    Attributes:
        last_nonzero: per param group, an int64 tensor ``(len(group["params"]),)`` with each
            parameter's nonzero count after the latest :meth:`step` / :meth:`prune`, or ``None``
            before the first one.
        last_grad_norm: the largest gradient entry of the latest checked :meth:`step`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        lambda1: Hyper = 0.0,
        lambda2: Hyper = 0.0,
        threshold: float | None = None,
        *,
        check_finite: bool = True,
    ) -> None:
        self.check_finite = check_finite
        self.grad_norm_limit: float | None = None
        self.last_grad_norm: float | None = None
        self.last_nonzero: list[Tensor | None] = []
        defaults = {"lr": lr, "momentum": momentum, "lambda1": lambda1, "lambda2": lambda2,
                    "threshold": threshold}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after validating its options (ValueError naming the option)."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        _check_group({**self.defaults, **param_group, "params": params}, len(self.param_groups))
        super().add_param_group({**param_group, "params": params})
        self.last_nonzero.append(None)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One proximal step on every group (then pruning where ``threshold`` is set).

        Every option and (if ``check_finite``) every gradient is validated first: on a
        ``ValueError`` no parameter, buffer or mask has been modified.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            _check_group(group, index)
        if self.check_finite or self.grad_norm_limit is not None:
            self._check_finite_gradients()
        for index, group in enumerate(self.param_groups):
            self._step_group(index, group)
        return loss

    @torch.no_grad()
    def prune(self, tau: float | None = None) -> Tensor:
        """Apply magnitude pruning now: with ``tau``, to every group at ``tau``; without, to the
        groups that have a ``threshold``, each at its own.

        Returns:
            int64 tensor: the nonzero count of every parameter, groups concatenated in order.
        """
        if tau is not None:
            _check_threshold("tau", tau)
        for index, group in enumerate(self.param_groups):
            _check_group(group, index)
        out = []
        for index, group in enumerate(self.param_groups):
            level = tau if tau is not None else group["threshold"]
            counts = _count_nonzero(group["params"])
            if level is not None:
                self._threshold(list(enumerate(group["params"])), float(level), counts)
            self.last_nonzero[index] = counts
            out.append(counts)
        return torch.cat([c.to(out[0].device) for c in out])

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`torch.optim.Optimizer.state_dict`, with tensor λ copied (a snapshot)."""
        state = super().state_dict()
        for group in state["param_groups"]:
            for key in ("lambda1", "lambda2"):
                if isinstance(group[key], Tensor):
                    group[key] = group[key].detach().clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore groups (λ included), momentum buffers and masks (kept as bool).

        Tensor λ come back as the saved copies: re-assign live λ tensors (e.g. a
        :class:`~cvsparse.hyper.LambdaOptimizer`'s) to the groups afterwards.
        """
        for index, group in enumerate(state_dict["param_groups"]):
            _check_group(group, index)
        super().load_state_dict(state_dict)
        for param_state in self.state.values():
            if "mask" in param_state:
                param_state["mask"] = param_state["mask"].to(torch.bool)
        self.last_nonzero = [None] * len(self.param_groups)

    # ---- internals -------------------------------------------------------------------------

    def _check_finite_gradients(self) -> None:
        indexed = [(k, p.grad) for k, p in enumerate(_all_params(self.param_groups))
                   if p.grad is not None]
        by_device: dict[torch.device, list[tuple[int, Tensor]]] = {}
        for k, grad in indexed:
            if grad.is_sparse:
                raise ValueError(f"parameter {k} has a sparse gradient; ProxSGD needs dense ones")
            by_device.setdefault(grad.device, []).append((k, grad))
        largest = 0.0
        for items in by_device.values():
            norms = torch.stack(torch._foreach_norm([g for _, g in items], math.inf))
            finite = norms.isfinite()
            if not bool(finite.all()):
                k = items[int((~finite).nonzero()[0])][0]
                raise NonFiniteError(f"gradient of parameter {k} (index in optimizer order) "
                                     "contains NaN or inf; nothing was updated")
            largest = max(largest, float(norms.max()))
        limit = self.grad_norm_limit
        if limit is not None and largest > limit:
            raise ExplodingGradientError(f"gradient entry {largest:.3g} is above the limit "
                                         f"{limit:.3g}; nothing was updated")
        self.last_grad_norm = largest

    def _step_group(self, index: int, group: dict[str, Any]) -> None:
        params = group["params"]
        counts = _count_nonzero([p for p in params if p.grad is None], like=params)
        with_grad = [(j, p) for j, p in enumerate(params) if p.grad is not None]
        for items in _partition(with_grad).values():
            idx = [j for j, _ in items]
            ps = [p for _, p in items]
            bufs = self._buffers(ps, create=group["momentum"] != 0)
            masks = self._masks(ps, create=False)
            work = [p if p.is_contiguous() else p.contiguous() for p in ps]
            result = ops.prox_sgd_(
                work, [p.grad.contiguous() for p in ps], bufs,
                lr=float(group["lr"]), momentum=float(group["momentum"]),
                lambda1=_select(group["lambda1"], idx, len(params)),
                lambda2=_select(group["lambda2"], idx, len(params)), masks=masks,
            )
            _write_back(ps, work)
            _scatter(counts, idx, result)
        if group["threshold"] is not None:
            self._threshold(with_grad, float(group["threshold"]), counts)
        self.last_nonzero[index] = counts

    def _threshold(self, indexed: list[tuple[int, Tensor]], tau: float, counts: Tensor) -> None:
        """``threshold_`` over ``indexed`` params; kept counts go to ``counts`` when τ > 0 (at
        τ = 0 nothing is pruned and ``counts`` already holds the nonzeros)."""
        for items in _partition(indexed).values():
            ps = [p for _, p in items]
            existing = [self.state[p].get("momentum_buffer") for p in ps]
            bufs = self._buffers(ps, create=any(b is not None for b in existing))
            work = [p if p.is_contiguous() else p.contiguous() for p in ps]
            kept = ops.threshold_(work, bufs, self._masks(ps, create=True), tau)
            _write_back(ps, work)
            if tau > 0:
                _scatter(counts, [j for j, _ in items], kept)

    def _buffers(self, ps: list[Tensor], *, create: bool) -> list[Tensor] | None:
        """Momentum buffers of ``ps`` (zeros where missing), or None when not ``create``."""
        if not create:
            return None
        for p in ps:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.contiguous_format)
        return [self.state[p]["momentum_buffer"] for p in ps]

    def _masks(self, ps: list[Tensor], *, create: bool) -> list[Tensor] | None:
        """Masks of ``ps`` (all-True where missing) if any exists or ``create``; else None."""
        if not create and all("mask" not in self.state[p] for p in ps):
            return None
        for p in ps:
            if "mask" not in self.state[p]:
                self.state[p]["mask"] = torch.ones_like(
                    p, dtype=torch.bool, memory_format=torch.contiguous_format)
        return [self.state[p]["mask"] for p in ps]


def _all_params(groups: list[dict[str, Any]]) -> list[Tensor]:
    return [p for group in groups for p in group["params"]]


def _partition(indexed: list[tuple[int, Tensor]]) -> dict[tuple, list[tuple[int, Tensor]]]:
    """Split ``(position, param)`` pairs by (device, dtype): one operator call each."""
    parts: dict[tuple, list[tuple[int, Tensor]]] = {}
    for j, p in indexed:
        parts.setdefault((p.device, p.dtype), []).append((j, p))
    return parts


def _select(value: Hyper, idx: list[int], n: int) -> Hyper:
    """The λ values of the params at positions ``idx`` of a group of ``n`` params."""
    if not isinstance(value, Tensor):
        return float(value)
    flat = value.detach().reshape(-1)
    if flat.numel() == 1:
        return flat.expand(len(idx))
    if len(idx) == n:
        return flat
    return flat[torch.tensor(idx, device=flat.device)]


def _count_nonzero(params: list[Tensor], like: list[Tensor] | None = None) -> Tensor:
    """int64 counts shaped like ``like`` (default ``params``); positions of ``params`` filled."""
    like = params if like is None else like
    device = like[0].device if like else torch.device("cpu")
    counts = torch.zeros(len(like), dtype=torch.int64, device=device)
    positions = {id(p): j for j, p in enumerate(like)}
    for p in params:
        counts[positions[id(p)]] = torch.count_nonzero(p).to(device)
    return counts


def _scatter(counts: Tensor, idx: list[int], values: Tensor) -> None:
    counts[torch.tensor(idx, device=counts.device)] = values.to(counts.device)


def _write_back(params: list[Tensor], work: list[Tensor]) -> None:
    """Copy contiguous working copies back into non-contiguous parameters."""
    for p, w in zip(params, work, strict=True):
        if w is not p:
            p.copy_(w)


def _check_group(group: dict[str, Any], index: int) -> None:
    """Validate a group's options; ValueError naming the option and group."""
    where = f"param group {index}"
    for key in ("lr", "momentum"):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} of {where} must be a float, got {type(value).__name__}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{key} of {where} must be finite and >= 0, got {value}")
    n = len(group["params"])
    for key in ("lambda1", "lambda2"):
        _check_lambda(f"{key} of {where}", group[key], n)
    if group["threshold"] is not None:
        _check_threshold(f"threshold of {where}", group["threshold"])


def _check_lambda(name: str, value: Hyper, n: int) -> None:
    if isinstance(value, Tensor):
        if value.dim() > 1 or value.numel() not in (1, n):
            raise ValueError(f"{name} must be a float or a 1-D tensor of 1 or {n} values, got "
                             f"shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {value.dtype}")
        if not bool((value.isfinite() & (value >= 0)).all()):
            raise ValueError(f"{name} must be finite and >= 0, got {value.tolist()}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")


def _check_threshold(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
