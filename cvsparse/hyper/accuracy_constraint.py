"""An accuracy constraint on compression: "validation accuracy ≥ reference − allowed drop".

A user who knows how much accuracy they can give up states it (``max_accuracy_drop`` D in
points, and/or ``max_relative_drop`` R in percent of the reference); the bound is

    b = min(a_ref − D/100, a_ref · (1 − R/100))        (accuracies as fractions)

taking the stricter of the two when both are given.  A reference measured in the run itself
(a dense phase) *rises*: whenever the mean of the last ``window`` checks exceeds it, it becomes
that mean, so the bound follows the best accuracy the run has shown so far — an early dense
phase underestimates what the network reaches with more epochs — without chasing the noise of
one lucky check.  A given reference stays fixed, or, from a dense run of the same schedule
(:class:`ReferenceCurve`), follows that run's validation accuracy epoch by epoch: a check is
then judged against what the dense network had reached at the same point of the same
schedule.  The constrained run
(docs/method.md §8) drives compression up and asks this object, at every check, what the
validation accuracy ``a`` it measured means:

- ``a ≥ b`` (the constraint holds): the check is *feasible*; when the network is also sparser
  than every feasible check before, it is the new *best* — the support the run will keep;
- ``a < b`` ``patience`` checks in a row: *stop* — the drive ends and the best support is
  fine-tuned.  A single violation (noise of a finite validation split) only counts.

Nothing here depends on the model: the verdicts are a function of the sequence of
``(accuracy, compression)`` pairs, so a larger D accepts every check a smaller one accepts and
stops no earlier — the kept support is never denser (monotone by construction).
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
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


def read_reference(path: str | Path, config: Any = None) -> tuple[float, str]:
    """The validation accuracy (a fraction) of the finished run in folder ``path``, from its
    ``report.json``, and a description of the source for the report.

    With ``config`` (a :class:`~cvsparse.config.RunConfig`), the run must have measured it on
    the same validation split: same dataset, ``val_size`` and ``split_seed``.  ValueError (one
    line) when the folder, its report or its ``val_acc`` is missing, or the split differs."""
    folder = Path(path)
    report_path = folder / "report.json"
    if not report_path.is_file():
        raise ValueError(f"accuracy.reference: {folder} holds no report.json (give the folder "
                         "of a finished run)")
    try:
        report = json.loads(report_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"accuracy.reference: {report_path} cannot be read: {exc}") from None
    accuracy = report.get("val_acc") if isinstance(report, dict) else None
    if not isinstance(accuracy, (int, float)) or not 0 <= accuracy <= 1:
        raise ValueError(f"accuracy.reference: {report_path} has no validation accuracy "
                         "(val_acc)")
    stored = report.get("config", {}).get("data", {}) if isinstance(report, dict) else {}
    if config is not None:
        for key in ("dataset", "val_size", "split_seed"):
            mine = getattr(config.data, key)
            if key in stored and mine is not None and stored[key] != mine:
                raise ValueError(f"accuracy.reference: {folder} measured its accuracy with "
                                 f"data.{key} = {stored[key]!r}, this run has {mine!r} (the "
                                 "reference must come from the same validation split)")
    return float(accuracy), f"run folder {folder.name}"


#: The file of a run's validation points inside its epochs (``accuracy.curve_points``).
CURVE_NAME = "curve.csv"


@dataclass(frozen=True)
class ReferenceCurve:
    """A finished dense run's learning rate and validation accuracy (a fraction) in each epoch
    (its ``metrics.csv``), and the points it measured inside its epochs (``inner``: pairs of
    epochs trained and validation accuracy, from its ``curve.csv``), for a constrained run of
    the same schedule to follow; ``weight_l2``, the L2 it trained its weights with when that
    was constant (None otherwise: see :func:`constant_weight_l2`)."""

    lrs: tuple[float, ...]
    val_acc: tuple[float, ...]
    inner: tuple[tuple[float, float], ...] = ()
    weight_l2: float | None = None

    def accuracy_after(self, epochs: float) -> float:
        """The dense run's validation accuracy after ``epochs`` epochs of training (fractions
        included): linear between its measured points (the epoch ends and the ``inner``
        points), the first point's value before it."""
        knots = sorted([(e + 1.0, a) for e, a in enumerate(self.val_acc)] + list(self.inner))
        if epochs <= knots[0][0]:
            return knots[0][1]
        if epochs >= knots[-1][0]:
            return knots[-1][1]
        after = bisect.bisect_right([at for at, _ in knots], epochs)
        (x0, y0), (x1, y1) = knots[after - 1], knots[after]
        share = (epochs - x0) / (x1 - x0)
        return (1 - share) * y0 + share * y1

    def drops(self) -> list[int]:
        """The epochs whose learning rate is lower than the epoch before's."""
        return [e for e in range(1, len(self.lrs)) if self.lrs[e] < self.lrs[e - 1]]

    def phases(self, finetune_fraction: float) -> tuple[int, int] | None:
        """``(dense_end, drive_end)`` on this schedule: dense until the first drop of the
        learning rate, the drive until the second (without one: until the last
        ``finetune_fraction`` of the epochs), fine-tuning after; None when the schedule has
        no drop, or no epoch between the two."""
        drops = self.drops()
        if not drops:
            return None
        epochs = len(self.lrs)
        end = drops[1] if len(drops) > 1 else epochs - max(1, round(finetune_fraction * epochs))
        return (drops[0], end) if drops[0] < end < epochs else None


def read_reference_curve(path: str | Path, config: Any) -> tuple[ReferenceCurve | None, str]:
    """The per-epoch curve of the finished run in folder ``path`` when this run (``config``, a
    :class:`~cvsparse.config.RunConfig`) can follow it, with the points inside its epochs when
    it measured some (``curve.csv``), and a note for the report: why it cannot otherwise
    (another model, batch size or epoch count, no ``metrics.csv``, a schedule without a phase
    to drive in).  ValueError (one line) when its ``curve.csv`` is malformed."""
    folder = Path(path)
    try:
        report = json.loads((folder / "report.json").read_text())
        stored = report.get("config", {})
        with open(folder / "metrics.csv", newline="") as handle:
            rows = {int(r["epoch"]): (float(r["lr"]), float(r["val_acc"]))
                    for r in csv.DictReader(handle)}
    except FileNotFoundError as exc:
        return None, f"it has no {Path(exc.filename).name}"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"its metrics.csv cannot be read ({exc})"
    epochs = config.total_epochs
    if stored.get("model") != config.model:
        return None, f"it trained {stored.get('model')!r}, this run {config.model!r}"
    batch = stored.get("data", {}).get("batch_size")
    if batch is not None and batch != config.data.batch_size:
        return None, f"it used batch size {batch}, this run {config.data.batch_size}"
    if sorted(rows) != list(range(epochs)):
        return None, f"it has {len(rows)} epochs in metrics.csv, this run {epochs}"
    inner = _read_inner_points(folder / CURVE_NAME, epochs)
    curve = ReferenceCurve(tuple(rows[e][0] for e in range(epochs)),
                           tuple(rows[e][1] for e in range(epochs)), inner,
                           constant_weight_l2(stored))
    if curve.phases(config.accuracy.finetune_fraction) is None:
        return None, "its learning rate schedule has no drop to start a compression drive at"
    if inner:
        return curve, (f"followed epoch by epoch, with {len(inner)} validation points inside "
                       "its epochs")
    return curve, "followed epoch by epoch"


def constant_weight_l2(stored: dict[str, Any]) -> float | None:
    """The weight L2 a run of configuration ``stored`` (its report's ``config``) trained with,
    when it was one number for the whole run: ``cvgrad.lambda2`` unless cvgrad learned it,
    ``autoprune.weight_l2`` or ``magnitude.weight_l2``; None otherwise."""
    method = stored.get("method")
    section = stored.get(method) if isinstance(method, str) else None
    if not isinstance(section, dict):
        return None
    if method == "cvgrad":
        learned = section.get("learn_lambda2") and section.get("hyper_lr") != 0
        value = None if learned else section.get("lambda2")
    else:
        value = section.get("weight_l2")
    finite = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if finite and 0 <= value < float("inf") else None


def _read_inner_points(path: Path, epochs: int) -> tuple[tuple[float, float], ...]:
    """``(epochs trained, validation accuracy)`` of each point in the ``curve.csv`` at
    ``path`` (none when there is no such file), the epochs trained being ``epoch + step /
    steps``; ValueError naming the file when it is malformed or lies outside ``epochs``."""
    if not path.is_file():
        return ()
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        points = []
        for row in rows:
            epoch, step, steps = int(row["epoch"]), int(row["step"]), int(row["steps"])
            accuracy = float(row["val_acc"])
            if not (0 <= epoch < epochs and 0 < step < steps and 0 <= accuracy <= 1):
                raise ValueError(f"a row is out of range: {dict(row)}")
            points.append((epoch + step / steps, accuracy))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"accuracy.reference: {path} cannot be read ({exc})") from None
    return tuple(points)
