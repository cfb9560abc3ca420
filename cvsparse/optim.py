"""ProxSGD: proximal SGD with momentum for L1 + L2 regularized weights (docs/method.md §2, §4).

Each ``step()`` runs, per param group, one fused :func:`cvsparse.ops.prox_sgd_` call over the
group's parameters that have gradients (one call per dtype/device if the group mixes them),
followed by one :func:`cvsparse.ops.threshold_` call when the group has a ``threshold``.  Before
any of them, one read-only :func:`cvsparse.ops.max_abs` pass over every gradient tests them for
NaN / inf and measures the largest entry (``check_finite``, ``grad_norm_limit``).

Per-step Python work is O(groups) in checks: what a step derives from a group's structure (its
parameters with a gradient split by device and dtype, their positions, the operator's λ tensors
for float λ) is kept between steps and rebuilt only when the group's parameter list, or which of
its parameters have a gradient, changes; options (lr, momentum, λ, threshold) are validated at
every step, a tensor λ with one reduction.  Per tensor, a step only gathers gradients, momentum
buffers and masks into lists.
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
from .ops._backend import resolve

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
            read of every gradient (:func:`cvsparse.ops.max_abs`, one pass over all of them)
            and one device sync per step; disable it for the last bit of speed.

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
        self._plans: list[_GroupPlan | None] = []
        self._validated: dict[str, tuple[Tensor, int]] = {}  # tensor λ checked at a _version
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
        self._plans.append(None)

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
        plans = []
        offset = 0
        for index, group in enumerate(self.param_groups):
            _check_group(group, index, self._validated)
            plan = self._plan(index, group)
            plan.offset = offset
            offset += len(group["params"])
            plans.append(plan)
        grads = [[part.gradients(plan.offset) for part in plan.parts] for plan in plans]
        if self.check_finite or self.grad_norm_limit is not None:
            self._check_gradients(plans, grads)
        self._update(plans, grads)
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
        self._plans = [None] * len(self.param_groups)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.__setstate__`; cached step plans start empty."""
        super().__setstate__(state)
        self.__dict__.setdefault("check_finite", True)
        self.__dict__.setdefault("grad_norm_limit", None)
        self.__dict__.setdefault("last_grad_norm", None)
        self._validated = {}
        self.last_nonzero = [None] * len(self.param_groups)
        self._plans = [None] * len(self.param_groups)

    # ---- internals -------------------------------------------------------------------------

    def _plan(self, index: int, group: dict[str, Any]) -> _GroupPlan:
        """The group's cached :class:`_GroupPlan`, rebuilt when its parameter list or the set of
        its parameters with a gradient changed (a C-level scan of identities, no checks)."""
        plan = self._plans[index]
        params = group["params"]
        if (plan is None or plan.params is not params or plan.ids != list(map(id, params))
                or plan.has_grad != [p.grad is not None for p in params]):
            plan = self._plans[index] = _GroupPlan(params)
        return plan

    def _check_gradients(self, plans: list[_GroupPlan], grads: list[list[list[Tensor]]]) -> None:
        """Finiteness and ``grad_norm_limit``: one read-only :func:`cvsparse.ops.max_abs` pass
        per (device, dtype) over every gradient, one device sync."""
        lists: dict[tuple, tuple[list[Tensor], list[int]]] = {}
        for plan, group_grads in zip(plans, grads, strict=True):
            for part, part_grads in zip(plan.parts, group_grads, strict=True):
                tensors, where = lists.setdefault(part.key, ([], []))
                tensors += part_grads
                where += [plan.offset + j for j in part.idx]
        largest = 0.0
        for key, (tensors, where) in lists.items():
            values = resolve("max_abs", key[0])(tensors)
            top = float(values.max())
            if not math.isfinite(top):
                k = where[int((~values.isfinite()).nonzero()[0])]
                raise NonFiniteError(f"gradient of parameter {k} (index in optimizer order) "
                                     "contains NaN or inf; nothing was updated")
            largest = max(largest, top)
        limit = self.grad_norm_limit
        if limit is not None and largest > limit:
            raise ExplodingGradientError(f"gradient entry {largest:.3g} is above the limit "
                                         f"{limit:.3g}; nothing was updated")
        self.last_grad_norm = largest

    def _update(self, plans: list[_GroupPlan], grads: list[list[list[Tensor]]]) -> None:
        """The proximal step of every group, then each group's pruning, then the counts.

        Parts of any groups that share device, dtype, lr, momentum and the presence of masks
        go to one ``prox_sgd_`` call (λ is per tensor anyway): one parallel region for, e.g.,
        the regularized weights and the unregularized biases of a model together."""
        calls: dict[tuple, list[tuple[_Part, list[Tensor], Tensor, Tensor]]] = {}
        work_of: dict[int, list[Tensor]] = {}
        for group, plan, group_grads in zip(self.param_groups, plans, grads, strict=True):
            lr, momentum = float(group["lr"]), float(group["momentum"])
            n = len(group["params"])
            for part, part_grads in zip(plan.parts, group_grads, strict=True):
                masked = self._masks(part.params, create=False) is not None
                calls.setdefault((*part.key, lr, momentum, masked), []).append(
                    (part, part_grads, part.lambdas(group["lambda1"], n),
                     part.lambdas(group["lambda2"], n)))
        results: dict[int, Tensor] = {}
        for (device, _, lr, momentum, masked), items in calls.items():
            ps = [p for part, *_ in items for p in part.params]
            orders = _orders([part for part, *_ in items])
            work = [_working(p, o) for p, o in zip(ps, orders, strict=True)] if orders else [
                p if p.is_contiguous() else p.contiguous() for p in ps]
            bufs = self._in_storage_order(ps, self._buffers(ps, create=momentum != 0),
                                          "momentum_buffer", orders)
            masks = self._in_storage_order(ps, self._masks(ps, create=False) if masked
                                           else None, "mask", orders)
            cat = (lambda ts: ts[0]) if len(items) == 1 else torch.cat
            counts = resolve("prox_sgd_", device)(
                work, [g for _, part_grads, _, _ in items for g in part_grads], bufs or [],
                masks or [], cat([l1 for *_, l1, _ in items]), cat([l2 for *_, l2 in items]),
                lr, momentum)
            start = 0
            for part, *_ in items:
                stop = start + len(part.params)
                results[id(part)] = counts[start:stop] if len(items) > 1 else counts
                work_of[id(part)] = work[start:stop]
                start = stop
        for index, (group, plan) in enumerate(zip(self.param_groups, plans, strict=True)):
            counts = plan.idle_counts()
            threshold = group["threshold"]
            for part in plan.parts:
                ps, work = part.params, work_of[id(part)]
                result = results[id(part)]
                if threshold is not None:
                    orders = _orders([part])
                    bufs = self._in_storage_order(ps, self._buffers(
                        ps, create=any("momentum_buffer" in self.state[p] for p in ps)),
                        "momentum_buffer", orders)
                    kept = resolve("threshold_", part.key[0])(
                        work, bufs or [],
                        self._in_storage_order(ps, self._masks(ps, create=True), "mask",
                                               orders),
                        float(threshold))
                    if threshold > 0:
                        result = kept
                _write_back(ps, work)
                counts = part.place(result, counts)
            self.last_nonzero[index] = counts

    def _threshold(self, indexed: list[tuple[int, Tensor]], tau: float, counts: Tensor) -> None:
        """``threshold_`` over ``indexed`` params; kept counts go to ``counts`` when τ > 0 (at
        τ = 0 nothing is pruned and ``counts`` already holds the nonzeros)."""
        for items in _partition(indexed).values():
            ps = [p for _, p in items]
            existing = [self.state[p].get("momentum_buffer") for p in ps]
            orders = [None if p.is_contiguous() else _storage_order(p) for p in ps]
            bufs = self._in_storage_order(
                ps, self._buffers(ps, create=any(b is not None for b in existing)),
                "momentum_buffer", orders)
            work = [_working(p, o) for p, o in zip(ps, orders, strict=True)]
            kept = ops.threshold_(work, bufs,
                                  self._in_storage_order(ps, self._masks(ps, create=True),
                                                         "mask", orders), tau)
            _write_back(ps, work)
            if tau > 0:
                _scatter(counts, [j for j, _ in items], kept)

    def _buffers(self, ps: list[Tensor], *, create: bool) -> list[Tensor] | None:
        """Momentum buffers of ``ps`` (zeros where missing), or None when not ``create``."""
        if not create:
            return None
        state = self.state
        bufs = [state[p].get("momentum_buffer") for p in ps]
        if any(b is None for b in bufs):
            for p in ps:
                if "momentum_buffer" not in state[p]:
                    state[p]["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=_state_format(p))
            bufs = [state[p]["momentum_buffer"] for p in ps]
        return bufs

    def _masks(self, ps: list[Tensor], *, create: bool) -> list[Tensor] | None:
        """Masks of ``ps`` (all-True where missing) if any exists or ``create``; else None."""
        state = self.state
        masks = [state[p].get("mask") for p in ps]
        missing = [b is None for b in masks]
        if not any(missing):
            return masks
        if not create and all(missing):
            return None
        for p in ps:
            if "mask" not in state[p]:
                state[p]["mask"] = torch.ones_like(
                    p, dtype=torch.bool, memory_format=_state_format(p))
        return [state[p]["mask"] for p in ps]

    def _in_storage_order(self, ps: list[Tensor], tensors: list[Tensor] | None, key: str,
                          orders: list[tuple[int, ...] | None] | None) -> list[Tensor] | None:
        """The state tensors ``tensors`` (``state[p][key]`` of each of ``ps``) as the operators
        take them: as they are where ``orders`` (:func:`_orders`) has None; for a dense
        non-contiguous parameter (channels-last) the view in its storage order, after moving
        the state tensor into the parameter's layout if it is not (a buffer saved from a
        contiguous model, say) — the operators update the state itself, never a copy."""
        if tensors is None or not orders or all(o is None for o in orders):
            return tensors
        out = []
        for p, t, order in zip(ps, tensors, orders, strict=True):
            if order is not None:
                if t.stride() != p.stride():
                    t = self.state[p][key] = torch.empty_like(p, dtype=t.dtype).copy_(t)
                t = t.permute(order)
            out.append(t)
        return out


class _Part:
    """The parameters of one group on one (device, dtype): one operator call per step."""

    def __init__(self, key: tuple, idx: list[int], params: list[Tensor], n: int) -> None:
        self.key = key
        self.idx = idx
        self.params = params
        self.whole = idx == list(range(n))  # the whole group, in order: counts need no scatter
        self.positions = torch.tensor(idx, dtype=torch.int64)
        self._fixed: dict[float, Tensor] = {}
        self._strides: list[tuple[int, ...]] | None = None
        self._orders: list[tuple[int, ...] | None] | None = None

    def orders(self) -> list[tuple[int, ...] | None] | None:
        """Per parameter, its storage order (:func:`_storage_order`) when it is dense but not
        contiguous, else None; None for the whole part when no parameter has one.  Kept while
        the parameters' strides stay (``model.to(memory_format=...)`` changes them)."""
        strides = [p.stride() for p in self.params]
        if strides != self._strides:
            self._strides = strides
            orders = [None if p.is_contiguous() else _storage_order(p) for p in self.params]
            self._orders = orders if any(o is not None for o in orders) else None
        return self._orders

    def gradients(self, offset: int) -> list[Tensor]:
        """The parameters' gradients as the operators take them (:func:`_dense`);
        ``offset``: the group's first position in optimizer order, for error messages."""
        grads = [p.grad for p in self.params]
        orders = self.orders()
        if orders is None and all(g.is_contiguous() for g in grads):
            return grads
        return [_dense(g, offset + j, None if orders is None else orders[i])
                for i, (g, j) in enumerate(zip(grads, self.idx, strict=True))]

    def lambdas(self, value: Hyper, n: int) -> Tensor:
        """The operator's float64 λ tensor for this part from the group's λ (a float: cached;
        a tensor: read now, so in-place updates count)."""
        device = self.key[0]
        if not isinstance(value, Tensor):
            value = float(value)
            found = self._fixed.get(value)
            if found is None:
                self._fixed.clear()
                found = self._fixed[value] = torch.full(
                    (len(self.idx),), value, dtype=torch.float64, device=device)
            return found
        flat = value.detach().reshape(-1).to(device=device, dtype=torch.float64)
        if flat.numel() == 1:
            return flat.expand(len(self.idx)).contiguous()
        if self.whole:
            return flat.contiguous()
        return flat[self.positions.to(device)]

    def place(self, result: Tensor, counts: Tensor | None) -> Tensor:
        """``result`` (this part's counts) written into the group's ``counts``."""
        if self.whole:
            return result
        counts[self.positions.to(counts.device)] = result.to(counts.device)
        return counts


class _GroupPlan:
    """What :meth:`ProxSGD.step` derives from a group's structure, kept between steps: its
    parameters with a gradient split by (device, dtype), positions, λ tensors of float λ."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.ids = list(map(id, params))
        self.has_grad = [p.grad is not None for p in params]
        self.offset = 0  # position of the group's first parameter in optimizer order
        with_grad = [(j, p) for j, p in enumerate(params) if p.grad is not None]
        self.idle = [p for p in params if p.grad is None]
        self.parts = [_Part(key, [j for j, _ in items], [p for _, p in items], len(params))
                      for key, items in _partition(with_grad).items()]

    def idle_counts(self) -> Tensor | None:
        """Counts of the group with the parameters without a gradient filled in, or None when
        every parameter has one (a single whole part then returns its own counts)."""
        if not self.idle and len(self.parts) == 1 and self.parts[0].whole:
            return None
        return _count_nonzero(self.idle, like=self.params)


def _dense(grad: Tensor, k: int, order: tuple[int, ...] | None) -> Tensor:
    """``grad`` of parameter ``k`` (optimizer order) as the operators take it: permuted to
    the parameter's storage ``order`` when it has one (:func:`_working`), then contiguous — a
    copy only where the gradient's layout differs.  ValueError if it is sparse."""
    if grad.layout != torch.strided:
        raise ValueError(f"parameter {k} has a sparse gradient; ProxSGD needs dense ones")
    if order is not None:
        grad = grad.permute(order)
    return grad if grad.is_contiguous() else grad.contiguous()


def _storage_order(t: Tensor) -> tuple[int, ...] | None:
    """The permutation of ``t``'s dimensions that lists them in memory order when ``t`` is dense
    and non-overlapping (``t.permute(order)`` is then a contiguous view: channels-last weights,
    transposes); None when it has no such view (a slice with gaps)."""
    order = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    return order if t.permute(order).is_contiguous() else None


def _orders(parts: list[_Part]) -> list[tuple[int, ...] | None] | None:
    """The storage orders of the parameters of ``parts`` in turn (:meth:`_Part.orders`); None
    when none has one."""
    found = [part.orders() for part in parts]
    if all(o is None for o in found):
        return None
    return [o for part, f in zip(parts, found, strict=True)
            for o in (f if f is not None else [None] * len(part.params))]


def _working(p: Tensor, order: tuple[int, ...] | None) -> Tensor:
    """``p`` as the operators update it: its view in storage ``order`` when it has one (no
    copy: the update lands in ``p``), itself when contiguous, else a contiguous copy that
    :func:`_write_back` copies back."""
    if order is not None:
        return p.permute(order)
    return p if p.is_contiguous() else p.contiguous()


def _state_format(p: Tensor) -> torch.memory_format:
    """The layout of new momentum buffers and masks of ``p``: ``p``'s own when the operators
    take its storage-order view, contiguous when they take a copy."""
    if p.is_contiguous() or _storage_order(p) is None:
        return torch.contiguous_format
    return torch.preserve_format


def _partition(indexed: list[tuple[int, Tensor]]) -> dict[tuple, list[tuple[int, Tensor]]]:
    """Split ``(position, param)`` pairs by (device, dtype): one operator call each."""
    parts: dict[tuple, list[tuple[int, Tensor]]] = {}
    for j, p in indexed:
        parts.setdefault((p.device, p.dtype), []).append((j, p))
    return parts


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
    """Copy contiguous working copies back into non-contiguous parameters (views of the
    parameters were updated in place)."""
    for p, w in zip(params, work, strict=True):
        if w is not p and w.data_ptr() != p.data_ptr():
            p.copy_(w)


def _check_group(group: dict[str, Any], index: int,
                 validated: dict[str, tuple[Tensor, int]] | None = None) -> None:
    """Validate a group's options; ValueError naming the option and group.

    With ``validated`` (per option name, the tensor λ whose values passed last and its
    ``_version`` then), a tensor λ not replaced or modified since it passed is not read again."""
    where = f"param group {index}"
    for key in ("lr", "momentum"):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} of {where} must be a float, got {type(value).__name__}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{key} of {where} must be finite and >= 0, got {value}")
    n = len(group["params"])
    for key in ("lambda1", "lambda2"):
        _check_lambda(f"{key} of {where}", group[key], n, validated)
    if group["threshold"] is not None:
        _check_threshold(f"threshold of {where}", group["threshold"])


def _check_lambda(name: str, value: Hyper, n: int,
                  validated: dict[str, tuple[Tensor, int]] | None = None) -> None:
    if isinstance(value, Tensor):
        if value.dim() > 1 or value.numel() not in (1, n):
            raise ValueError(f"{name} must be a float or a 1-D tensor of 1 or {n} values, got "
                             f"shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {value.dtype}")
        seen = None if validated is None else validated.get(name)
        if seen is not None and seen[0] is value and seen[1] == value._version:
            return
        lo, hi = torch.aminmax(value.detach()) if value.numel() else (value.new_zeros(()),) * 2
        if not (float(lo) >= 0 and float(hi) < math.inf):  # False for NaN
            raise ValueError(f"{name} must be finite and >= 0, got {value.tolist()}")
        if validated is not None:
            validated[name] = (value, value._version)
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
