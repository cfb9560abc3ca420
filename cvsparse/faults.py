"""Divergence is a fault, not a result.

A training step whose loss is not finite or explodes (above :data:`EXPLODE_FACTOR` times the
running median of the recent losses), or whose gradient is not finite or explodes (its largest
entry above :data:`EXPLODE_FACTOR` times the running median of that optimizer's recent ones),
is skipped: it raises :class:`SkippedStep` before the optimizer changes anything.  A hyper
step whose hypergradient is not finite or explodes (its largest entry above
:data:`EXPLODE_FACTOR` times the running median of the recent ones) is skipped the same way
(λ, its moments and the floor unchanged; the λ optimizer clips the ones that pass).
:class:`StepGuard` counts the skips of each kind; ``max_consecutive`` skips of one kind in a
row raise :class:`Diverged`, which stops the run (the CLI exits 3, the last good epoch's
checkpoint stays).

Test hook: ``$CVSPARSE_TEST_FAULTS`` (read here only) makes chosen calls non-finite, e.g.
``loss:3-5,grad:7,hyper:1-1000`` poisons the 3rd to 5th training losses, the 7th gradient and
the first 1000 hypergradients of the process (counted per kind from 1); ``gradx:N`` and
``hyperx:N`` multiply the N-th gradient / hypergradient by 1e9 instead (finite, exploding).
"""

from __future__ import annotations

import math
import os
import statistics
from collections import deque
from collections.abc import Iterable
from typing import Any

from torch import Tensor

#: A loss above this multiple of the running median of recent losses counts as exploding.
EXPLODE_FACTOR = 1e4
#: Recent finite losses the running median is taken over, and how many it needs first.
WINDOW, MIN_HISTORY = 100, 10
#: ... and a loss must also be above this to explode: a cross-entropy of 100 means the true
#: class got a probability of e^-100, so a well-fit network's tiny median (1e-4) cannot turn an
#: ordinary hard batch (a loss of 2) into a fault.
MIN_EXPLODING_LOSS = 100.0
FAULTS_ENV = "CVSPARSE_TEST_FAULTS"
KINDS = ("loss", "grad", "gradx", "hyper", "hyperx")


class StepFault(ValueError):
    """A gradient or hypergradient is unusable (non-finite, exploding); nothing was updated."""


class NonFiniteError(StepFault):
    """A gradient or hypergradient holds NaN or inf; nothing was updated."""


class ExplodingGradientError(StepFault):
    """A gradient entry is above the optimizer's ``grad_norm_limit``; nothing was updated."""


class SkippedStep(Exception):
    """A training step was skipped (nothing it would have updated changed); the message says
    why."""


class Diverged(RuntimeError):
    """Too many consecutive steps were skipped, or an evaluation was not finite: the run
    stops."""


class StepGuard:
    """Judges training losses and counts skipped steps (``"step"``) and hyper steps
    (``"hyper"``); raises :class:`Diverged` at ``max_consecutive`` skips of one kind in a
    row."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.grads: dict[int, deque[float]] = {}   # per optimizer, in order of first use
        self.hypers: deque[float] = deque(maxlen=WINDOW)   # largest |dcv/dλ| of recent steps
        self._keys: dict[int, int] = {}
        self.consecutive = {"step": 0, "hyper": 0}
        self.counts = {"step": 0, "hyper": 0}   # in the current epoch

    def check_loss(self, loss: Tensor) -> None:
        """SkippedStep if ``loss`` is not finite or explodes; else it joins the history."""
        value = float(loss.detach())
        if not math.isfinite(value):
            raise SkippedStep(f"training loss is {value}")
        if len(self.recent) >= MIN_HISTORY:
            median = statistics.median(self.recent)
            if value > max(EXPLODE_FACTOR * median, MIN_EXPLODING_LOSS):
                raise SkippedStep(f"training loss {value:.3g} is above {EXPLODE_FACTOR:g} x "
                                  f"its running median {median:.3g}")
        self.recent.append(value)

    def check_hypergradient(self, *parts: Tensor) -> None:
        """SkippedStep if a hypergradient entry is not finite, or the largest one is above
        :data:`EXPLODE_FACTOR` times the median of the recent ones (once :data:`MIN_HISTORY`
        are known); else it joins the history."""
        value = max(float(part.detach().abs().max()) for part in parts)
        if not math.isfinite(value):
            raise SkippedStep(f"hypergradient is {value}")
        if len(self.hypers) >= MIN_HISTORY:
            median = statistics.median(self.hypers)
            if median > 0 and value > EXPLODE_FACTOR * median:
                raise SkippedStep(f"hypergradient {value:.3g} is above {EXPLODE_FACTOR:g} x "
                                  f"its running median {median:.3g}")
        self.hypers.append(value)

    def limit_gradients(self, optimizer: Any) -> None:
        """Set ``optimizer.grad_norm_limit`` (ProxSGD) from its recent gradients: None until
        :data:`MIN_HISTORY` are known, then :data:`EXPLODE_FACTOR` times their median."""
        if not hasattr(optimizer, "grad_norm_limit"):
            return
        history = self._history(optimizer)
        median = statistics.median(history) if len(history) >= MIN_HISTORY else 0.0
        optimizer.grad_norm_limit = EXPLODE_FACTOR * median if median > 0 else None

    def record_gradients(self, optimizer: Any) -> None:
        """Add ``optimizer.last_grad_norm`` of a step that went through to its history."""
        norm = getattr(optimizer, "last_grad_norm", None)
        if norm is not None:
            self._history(optimizer).append(norm)

    def _history(self, optimizer: Any) -> deque[float]:
        key = self._keys.setdefault(id(optimizer), len(self._keys))
        return self.grads.setdefault(key, deque(maxlen=WINDOW))

    def passed(self, kind: str) -> None:
        """A step of ``kind`` went through: the run of skips is broken."""
        self.consecutive[kind] = 0

    def skipped(self, kind: str, reason: str) -> None:
        """Count a skipped step of ``kind``; Diverged once ``max_consecutive`` are in a row."""
        self.counts[kind] += 1
        self.consecutive[kind] += 1
        if self.consecutive[kind] >= self.max_consecutive:
            what = "training steps" if kind == "step" else "hyper steps"
            raise Diverged(f"{self.consecutive[kind]} consecutive {what} skipped, the last "
                           f"because {reason}")

    def start_epoch(self) -> None:
        """Reset the per-epoch counts (the runs of consecutive skips carry over)."""
        self.counts = {"step": 0, "hyper": 0}

    def state_dict(self) -> dict[str, Any]:
        """The loss and gradient histories and the runs of skips (plain data)."""
        return {"recent": list(self.recent), "consecutive": dict(self.consecutive),
                "grads": {key: list(values) for key, values in self.grads.items()},
                "hypers": list(self.hypers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (optimizers are matched by their order of first use)."""
        self.recent = deque((float(v) for v in state["recent"]), maxlen=WINDOW)
        self.consecutive = {k: int(state["consecutive"][k]) for k in self.consecutive}
        self.grads = {int(key): deque((float(v) for v in values), maxlen=WINDOW)
                      for key, values in state.get("grads", {}).items()}
        self.hypers = deque((float(v) for v in state.get("hypers", [])), maxlen=WINDOW)


# ---- the test hook ----------------------------------------------------------------------------

def _plan() -> dict[str, set[int]] | None:
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return None
    plan: dict[str, set[int]] = {}
    for part in spec.split(","):
        kind, _, steps = part.strip().partition(":")
        if kind not in KINDS or not steps:
            raise ValueError(f"${FAULTS_ENV}: bad entry {part!r}; use KIND:N or KIND:A-B with "
                             f"KIND in {', '.join(KINDS)}")
        first, _, last = steps.partition("-")
        plan.setdefault(kind, set()).update(range(int(first), int(last or first) + 1))
    return plan


_PLAN = _plan()
_CALLS = dict.fromkeys(KINDS, 0)


def injected(kind: str) -> bool:
    """Whether this call of ``kind`` is one ``$CVSPARSE_TEST_FAULTS`` poisons (always False
    without it)."""
    if _PLAN is None:
        return False
    _CALLS[kind] += 1
    return _CALLS[kind] in _PLAN.get(kind, ())


def poisoned(kind: str, value: Tensor) -> Tensor:
    """``value``, or ``value * NaN`` when :func:`injected` says so for ``kind`` (or
    ``value * 1e9`` when it does for ``kind + "x"``, where that kind exists)."""
    if injected(kind):
        return value * float("nan")
    if kind + "x" in KINDS and injected(kind + "x"):
        return value * 1e9
    return value


def poison_grads(params: Iterable[Tensor]) -> None:
    """Fill the first gradient among ``params`` with NaN (or scale every one by 1e9) when
    :func:`injected` says so for ``grad`` (``gradx``)."""
    nan, scale = injected("grad"), injected("gradx")
    grads = [p.grad for p in params if p.grad is not None]
    if nan and grads:
        grads[0].fill_(float("nan"))
    if scale:
        for g in grads:
            g.mul_(1e9)
