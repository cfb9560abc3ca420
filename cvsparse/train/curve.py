"""Validation accuracy measured inside the epochs of a run: ``curve.csv``.

A dense run measures its validation accuracy at the end of every epoch.  Early in a schedule,
and right after a drop of the learning rate, the accuracy climbs several points within one
epoch, so a line between two epoch ends is a poor estimate of it at a point inside the epoch.
With ``accuracy.curve_points = K`` a run also evaluates the validation split ``K`` times inside
each epoch, at evenly spaced steps; a constrained run that follows it
(``accuracy.reference``) judges its checks against those measured points (docs/method.md §8).

The measurements do not change the run: evaluation draws no random numbers and leaves the
modules' modes and BatchNorm statistics as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cvsparse.hyper.reference_run import CURVE_NAME

__all__ = ["CURVE_NAME", "ValidationCurve", "point_steps"]


def point_steps(points: int, steps: int) -> list[int]:
    """The step counts after which an epoch of ``steps`` training steps measures the
    validation accuracy: ``points`` evenly spaced counts strictly inside the epoch, fewer when
    the epoch is too short to hold them all apart."""
    return sorted({round(steps * j / (points + 1)) for j in range(1, points + 1)} - {0, steps})


class ValidationCurve:
    """The points measured so far: one dict per point with the 0-based ``epoch``, the training
    ``step`` count after which it was measured, the epoch's ``steps``, and the validation
    ``val_loss`` (mean cross-entropy) and ``val_acc`` (a fraction)."""

    def __init__(self, points: int) -> None:
        self.points = points
        self.rows: list[dict[str, Any]] = []
        self._due: set[int] = set()
        self._epoch, self._steps = 0, 0

    def start_epoch(self, epoch: int, steps: int) -> None:
        """Plan the points of ``epoch``, which runs ``steps`` training steps."""
        self._epoch, self._steps = epoch, steps
        self._due = set(point_steps(self.points, steps))

    def after_step(self, done: int, evaluate: Callable[[], dict[str, Any]]) -> None:
        """Call after the epoch's ``done``-th step (counting skipped ones): ``evaluate()`` (a
        dict with the validation ``loss`` and ``acc``) is measured when a point is due."""
        if done not in self._due:
            return
        val = evaluate()
        self.rows.append({"epoch": self._epoch, "step": done, "steps": self._steps,
                          "val_loss": val["loss"], "val_acc": val["acc"]})

    def state_dict(self) -> list[dict[str, Any]]:
        return list(self.rows)

    def load_state_dict(self, rows: list[dict[str, Any]]) -> None:
        self.rows = list(rows)
