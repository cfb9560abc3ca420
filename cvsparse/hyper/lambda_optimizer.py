"""Gradient steps on the regularization strengths λ = (λ1, λ2) from hypergradients
(docs/method.md §5.3)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from cvsparse.faults import NonFiniteError

METHODS = ("adam", "sgd")   # cvgrad.hyper_method
CLIP_MODES = ("norm", "value")
Bounds = tuple[float, float | None]


class LambdaOptimizer:
    """Holds λ1, λ2 ≥ 0 as float64 CPU tensors and updates them with ``dcv/dλ``.

    ``method="sgd"``: ``x ← x − lr·g``; ``method="adam"``: Adam (bias-corrected, ``betas``,
    ``eps``) on ``x``.  ``x`` is λ itself, or ``log λ`` with ``log_space=True`` (then
    ``g = dcv/dλ · λ`` by the chain rule and λ stays > 0).  After every step λ is clamped to
    its bounds (by default ``[0, ∞)``, so SGD on λ is ``λ ← max(0, λ − lr·g)``).

    Clipping acts on ``g`` in the optimized variable (λ or log λ), over λ1 and λ2 together:
    ``clip_mode="norm"`` rescales the whole vector to L2 norm ≤ ``clip``; ``"value"`` clamps
    each component to ``[−clip, clip]``.  With SGD the step is then at most ``lr·clip``.

    Args:
        lambda1, lambda2: initial values ≥ 0 (> 0 in log space): floats or 1-D tensors.
        lr: hyper learning rate ≥ 0, or a pair ``(lr_λ1, lr_λ2)``.
        per_layer: None → one global pair (shape ``(1,)``) unless a tensor of n values is given;
            an int n → one pair per regularized tensor (floats are repeated).
        lambda1_bounds, lambda2_bounds: ``(min, max)`` for each component (max None = ∞).
    """

    def __init__(
        self,
        lambda1: float | Tensor,
        lambda2: float | Tensor,
        lr: float | tuple[float, float],
        *,
        method: str = "adam",
        log_space: bool = False,
        clip: float | None = None,
        clip_mode: str = "norm",
        per_layer: int | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        lambda1_bounds: Bounds = (0.0, None),
        lambda2_bounds: Bounds = (0.0, None),
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {', '.join(CLIP_MODES)}, got {clip_mode!r}")
        if clip is not None:
            _finite("clip", clip, positive=True)
        lrs = lr if isinstance(lr, tuple) else (lr, lr)
        if len(lrs) != 2:
            raise ValueError(f"lr must be a float or a pair of floats, got {lr!r}")
        for value in lrs:
            _finite("lr", value, positive=False)
        if not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
        _finite("eps", eps, positive=True)
        n = _size(lambda1, lambda2, per_layer)
        lam = torch.stack([_initial("lambda1", lambda1, n), _initial("lambda2", lambda2, n)])
        tiny = torch.finfo(torch.float64).tiny if log_space else 0.0
        self._low, self._high = _bounds([lambda1_bounds, lambda2_bounds], tiny)
        if log_space and not bool((lam > 0).all()):
            raise ValueError("log_space=True needs lambda1 and lambda2 > 0")
        if not bool(((lam >= self._low) & (lam <= self._high)).all()):
            raise ValueError(f"initial lambdas {lam.tolist()} lie outside their bounds")
        self.method, self.log_space, self.clip, self.clip_mode = method, log_space, clip, clip_mode
        self.lr = torch.tensor(lrs, dtype=torch.float64).reshape(2, 1)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self._lam = lam
        self._exp_avg = torch.zeros_like(lam)
        self._exp_avg_sq = torch.zeros_like(lam)
        self._step = 0

    @property
    def lambda1(self) -> Tensor:
        """λ1, float64 ``(n,)`` (n = 1 when global): a live view, updated in place by step."""
        return self._lam[0]

    @property
    def lambda2(self) -> Tensor:
        """λ2, float64 ``(n,)``: a live view, updated in place by :meth:`step`."""
        return self._lam[1]

    def step(self, d_lambda1: float | Tensor, d_lambda2: float | Tensor) -> None:
        """One update from the hypergradients (shaped like λ; a global λ also takes a float or
        0-dim tensor).  Non-finite input → ValueError with λ and optimizer state unchanged."""
        n = self._lam.shape[1]
        grad = torch.stack([_hypergradient("d_lambda1", d_lambda1, n),
                            _hypergradient("d_lambda2", d_lambda2, n)])
        x = self._lam.log() if self.log_space else self._lam
        if self.log_space:
            grad = grad * self._lam
        grad = self._clipped(grad)
        exp_avg, exp_avg_sq, t = self._exp_avg, self._exp_avg_sq, self._step
        if self.method == "sgd":
            update = self.lr * grad
        else:
            beta1, beta2 = self.betas
            t += 1
            exp_avg = beta1 * exp_avg + (1 - beta1) * grad
            exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad.square()
            denom = (exp_avg_sq / (1 - beta2**t)).sqrt() + self.eps
            update = self.lr * (exp_avg / (1 - beta1**t)) / denom
        x = x - update
        new = x.exp() if self.log_space else x
        self._lam.copy_(torch.minimum(torch.maximum(new, self._low), self._high))
        self._exp_avg, self._exp_avg_sq, self._step = exp_avg, exp_avg_sq, t

    def rescale_lambda1_(self, factor: float, at_least: Tensor | None = None) -> None:
        """``λ1 ← max(λ1, at_least) · factor``, clamped to λ1's bounds; the optimizer's moments
        are untouched.  A constraint's multiplier acts on λ1 this way (``CompressionFloor``)."""
        if not (isinstance(factor, (int, float)) and 0 < factor < math.inf):
            raise ValueError(f"factor must be a finite number > 0, got {factor!r}")
        lam1 = self._lam[0]
        if at_least is not None:
            torch.maximum(lam1, at_least.to(lam1), out=lam1)
        lam1.mul_(factor).clamp_(self._low[0, 0], self._high[0, 0])

    def state_dict(self) -> dict[str, Any]:
        """λ, the Adam moments (copies) and the Adam step count."""
        return {"lambda": self._lam.clone(), "exp_avg": self._exp_avg.clone(),
                "exp_avg_sq": self._exp_avg_sq.clone(), "step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (λ is copied into the live tensors)."""
        tensors = {}
        for key in ("lambda", "exp_avg", "exp_avg_sq"):
            value = torch.as_tensor(state[key], dtype=torch.float64)
            if value.shape != self._lam.shape or not bool(value.isfinite().all()):
                raise ValueError(f"state[{key!r}] must be finite of shape "
                                 f"{tuple(self._lam.shape)}, got {tuple(value.shape)}")
            tensors[key] = value
        if not bool((tensors["lambda"] >= 0).all()):
            raise ValueError("state['lambda'] must be >= 0")
        self._lam.copy_(tensors["lambda"])
        self._exp_avg = tensors["exp_avg"].clone()
        self._exp_avg_sq = tensors["exp_avg_sq"].clone()
        self._step = int(state["step"])

    def _clipped(self, grad: Tensor) -> Tensor:
        if self.clip is None:
            return grad
        if self.clip_mode == "value":
            return grad.clamp(-self.clip, self.clip)
        norm = float(grad.norm())
        return grad * (self.clip / norm) if norm > self.clip else grad


def _finite(name: str, value: object, *, positive: bool) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value) and (value > 0 if positive else value >= 0))
    if not ok:
        raise ValueError(f"{name} must be a finite float {'>' if positive else '>='} 0, got "
                         f"{value!r}")


def _size(lambda1: float | Tensor, lambda2: float | Tensor, per_layer: int | None) -> int:
    """Number of λ pairs: ``per_layer``, else the length of a tensor argument, else 1."""
    if per_layer is not None:
        if isinstance(per_layer, bool) or not isinstance(per_layer, int) or per_layer < 1:
            raise ValueError(f"per_layer must be None or an integer >= 1, got {per_layer!r}")
        return per_layer
    sizes = [v.numel() for v in (lambda1, lambda2) if isinstance(v, Tensor) and v.numel() > 1]
    return max(sizes, default=1)


def _initial(name: str, value: float | Tensor, n: int) -> Tensor:
    if isinstance(value, Tensor):
        if value.dim() > 1 or value.numel() not in (1, n):
            raise ValueError(f"{name} must hold 1 or {n} values, got shape {tuple(value.shape)}")
        out = value.detach().to("cpu", torch.float64).reshape(-1).expand(n).clone()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out = torch.full((n,), float(value), dtype=torch.float64)
    else:
        raise ValueError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not bool((out.isfinite() & (out >= 0)).all()):
        raise ValueError(f"{name} must be finite and >= 0, got {out.tolist()}")
    return out


def _bounds(pairs: list[Bounds], tiny: float) -> tuple[Tensor, Tensor]:
    """``(low, high)`` as float64 ``(2, 1)``; ``low`` is at least ``tiny``."""
    low, high = [], []
    for name, (lo, hi) in zip(("lambda1_bounds", "lambda2_bounds"), pairs, strict=True):
        _finite(f"{name}[0]", lo, positive=False)
        if hi is not None:
            _finite(f"{name}[1]", hi, positive=False)
            if hi < lo:
                raise ValueError(f"{name} must have min <= max, got ({lo}, {hi})")
        low.append(max(float(lo), tiny))
        high.append(math.inf if hi is None else float(hi))
    return (torch.tensor(low, dtype=torch.float64).reshape(2, 1),
            torch.tensor(high, dtype=torch.float64).reshape(2, 1))


def _hypergradient(name: str, value: float | Tensor, n: int) -> Tensor:
    """A hypergradient as float64 ``(n,)`` on the CPU (ValueError naming it if bad)."""
    if isinstance(value, Tensor):
        if value.numel() != n or value.dim() > 1:
            raise ValueError(f"{name} must have {n} value(s) like lambda, got shape "
                             f"{tuple(value.shape)}")
        out = value.detach().to("cpu", torch.float64).reshape(n)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and n == 1:
        out = torch.tensor([float(value)], dtype=torch.float64)
    else:
        raise ValueError(f"{name} must be a tensor of {n} value(s), got {type(value).__name__}")
    if not bool(out.isfinite().all()):
        raise NonFiniteError(f"{name} contains NaN or inf ({out.tolist()}); lambda unchanged")
    return out
