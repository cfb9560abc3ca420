"""An accuracy constraint on compression: "validation accuracy ≥ reference − allowed drop".

A user who knows how much accuracy they can give up states it (``max_accuracy_drop`` D in
points, and/or ``max_relative_drop`` R in percent of the reference); the bound is

    b = min(a_ref − D/100, a_ref · (1 − R/100))        (accuracies as fractions)

taking the stricter of the two when both are given.  A reference measured in the run itself
(a dense phase) *rises*: whenever the mean of the last ``window`` checks exceeds it, it becomes
that mean, so the bound follows the best accuracy the run has shown so far — an early dense
phase underestimates what the network reaches with more epochs — without chasing the noise of
one lucky check.  A given reference stays fixed, or, from a dense run of the same schedule
(:class:`~cvsparse.hyper.reference_run.ReferenceCurve`), follows that run's validation
accuracy epoch by epoch: a check is then judged against what the dense network had reached at
the same point of the same schedule.  The constrained run (docs/method.md §8) drives
compression up and asks this object, at every check, what the validation accuracy ``a`` it
measured means:

- ``a ≥ b`` (the constraint holds): the check is *feasible*; when the network is also sparser
  than every feasible check before, it is the new *best* — the support the run will keep;
- ``a < b`` ``patience`` checks in a row: *stop* — the drive ends and the best support is
  fine-tuned.  A single violation (noise of a finite validation split) only counts.

Nothing here depends on the model: the verdicts are a function of the sequence of
``(accuracy, compression)`` pairs, so a larger D accepts every check a smaller one accepts and
stops no earlier — the kept support is never denser (monotone by construction).
"""

from __future__ import annotations

import math
from typing import Any

#: Verdicts of :meth:`AccuracyConstraint.observe`.
BEST, FEASIBLE, VIOLATED, STOP = "best", "feasible", "violated", "stop"


class AccuracyConstraint:
    """The bound, the best feasible check so far and the run of violations.

    Args:
        max_drop: D, allowed drop in accuracy points (``0.3`` = 0.3 points), or None.
        max_relative_drop: R, allowed drop in percent of the reference (0 ≤ R < 100), or None.
            At least one of the two is given.
        patience: violations in a row that stop the drive (≥ 1).
        window: checks averaged when a rising reference is raised (≥ 1).
    """

    def __init__(self, max_drop: float | None, max_relative_drop: float | None,
                 patience: int = 2, window: int = 3) -> None:
        if max_drop is None and max_relative_drop is None:
            raise ValueError("give max_drop or max_relative_drop")
        if max_drop is not None and not 0 <= max_drop < 100:
            raise ValueError(f"max_drop is in accuracy points in [0, 100), got {max_drop!r}")
        if max_relative_drop is not None and not 0 <= max_relative_drop < 100:
            raise ValueError("max_relative_drop is a percentage of the reference in [0, 100), "
                             f"got {max_relative_drop!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.window = window
        self.max_drop, self.max_relative_drop, self.patience = max_drop, max_relative_drop, patience
        self.reference: float | None = None
        self.source: str | None = None
        self.rising = False
        self.raised_at: list[int] | None = None
        self.best_compression = -math.inf
        self.best_accuracy: float | None = None
        self.best_at: list[int] | None = None
        self.violations = 0
        self.stopped_at: list[int] | None = None
        self.history: list[dict[str, Any]] = []   # every judged check, in order

    def set_reference(self, accuracy: float, source: str, *, rising: bool = False) -> None:
        """The reference validation accuracy (a fraction in [0, 1]) and how it was obtained;
        ``rising``: later checks that measure more raise it (a reference the run measured)."""
        if not 0 <= accuracy <= 1:
            raise ValueError(f"a reference accuracy is a fraction in [0, 1], got {accuracy!r}")
        self.reference, self.source, self.rising = float(accuracy), source, rising
        self.raised_at: list[int] | None = None

    @property
    def bound(self) -> float:
        """The lowest validation accuracy (a fraction) the constraint accepts."""
        if self.reference is None:
            raise RuntimeError("the reference accuracy is not known yet")
        return self.bound_for(self.reference)

    def bound_for(self, reference: float) -> float:
        """The bound the allowed drops give against ``reference`` (a fraction)."""
        bounds = []
        if self.max_drop is not None:
            bounds.append(reference - self.max_drop / 100)
        if self.max_relative_drop is not None:
            bounds.append(reference * (1 - self.max_relative_drop / 100))
        return max(bounds)

    def observe(self, accuracy: float, compression: float, at: tuple[int, int],
                reference: float | None = None) -> str:
        """Judge one check of a network of ``compression`` (a rate ≥ 1) measured at
        ``accuracy`` on the validation split; ``at`` = (global epoch, step in the epoch);
        ``reference``: the reference at this check (a dense run's accuracy at the same point
        of its schedule), default the run's one reference.

        Returns:
            :data:`BEST` (feasible and the sparsest feasible so far: keep its support),
            :data:`FEASIBLE`, :data:`VIOLATED`, or :data:`STOP` (the ``patience``-th violation
            in a row; every later call also returns STOP).
        """
        if self.stopped_at is not None:
            return STOP
        earlier = self.history[max(0, len(self.history) - self.window + 1):]
        recent = [*(h["val_acc"] for h in earlier), float(accuracy)]   # the last `window`
        smoothed = sum(recent) / len(recent)
        if self.rising and len(recent) == self.window and smoothed > self.reference:
            self.reference, self.raised_at = smoothed, list(at)
        bound = self.bound if reference is None else self.bound_for(reference)
        verdict = self._verdict(float(accuracy), bound, float(compression), list(at))
        self.history.append({"at": list(at), "compression": float(compression),
                             "val_acc": float(accuracy), "bound": bound, "verdict": verdict})
        return verdict

    def _verdict(self, accuracy: float, bound: float, compression: float, at: list[int]) -> str:
        """The verdict of :meth:`observe` once the check's bound is known."""
        if accuracy >= bound:
            self.violations = 0
            if compression > self.best_compression:
                self.best_compression, self.best_accuracy, self.best_at = compression, accuracy, at
                return BEST
            return FEASIBLE
        self.violations += 1
        if self.violations >= self.patience:
            self.stopped_at = at
            return STOP
        return VIOLATED

    def report(self) -> dict[str, Any]:
        """The report's entries: the reference, the bound, the kept support's check, and
        every check (``constraint_history``: where, compression, validation accuracy, bound,
        verdict)."""
        return {
            "reference_val_acc": self.reference,
            "reference_source": self.source,
            "reference_raised_at": self.raised_at,
            "max_accuracy_drop": self.max_drop,
            "max_relative_drop": self.max_relative_drop,
            "accuracy_bound": None if self.reference is None else self.bound,
            "constraint_checks": len(self.history),
            "selected_compression": (None if self.best_at is None else self.best_compression),
            "selected_val_acc": self.best_accuracy,
            "selected_at": self.best_at,
            "drive_stopped_at": self.stopped_at,
            "constraint_history": self.history,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "source": self.source, "rising": self.rising,
                "raised_at": self.raised_at,
                "best_compression": self.best_compression, "best_accuracy": self.best_accuracy,
                "best_at": self.best_at, "violations": self.violations,
                "stopped_at": self.stopped_at, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("reference", "source", "rising", "raised_at", "best_compression",
                    "best_accuracy", "best_at", "violations", "stopped_at", "history"):
            setattr(self, key, state[key])


def with_verdict(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` (a run's report) with ``constraint_met_val``: whether its final validation
    accuracy ``val_acc`` meets its ``accuracy_bound``, for a constrained run; unchanged
    otherwise."""
    if report.get("accuracy_bound") is not None:
        val = report.get("val_acc")
        report["constraint_met_val"] = val is not None and val >= report["accuracy_bound"]
    return report
