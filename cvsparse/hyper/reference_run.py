"""The finished run an accuracy-constrained run is judged against (``accuracy.reference``,
docs/method.md §8), read once when the constrained run starts.

A run folder gives its final validation accuracy (``report.json``) and, when the constrained run
trains the same model with the same batch size and epoch count, a schedule to follow: the
learning rate and validation accuracy of every epoch (``metrics.csv``) and the points measured
inside its epochs (``curve.csv``).  :func:`read_followed_run` reads the folder into a
:class:`FollowedRun`; the run hands that one object to its defaults, its validation and its
method, and stores it in its checkpoints, so a resumed run is judged against what the run
started with, even when the folder has changed or gone since.
"""

from __future__ import annotations

import bisect
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The file of a run's validation points inside its epochs (``accuracy.curve_points``).
CURVE_NAME = "curve.csv"

#: The ``data`` settings that fix the validation split an accuracy was measured on.
SPLIT_KEYS = ("dataset", "val_size", "split_seed")


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


@dataclass(frozen=True)
class FollowedRun:
    """A finished run as a constrained run read it: its final validation accuracy
    (``accuracy``, a fraction), where it comes from (``source``, for the report), the
    ``data`` settings of the split it was measured on (``split``, those of :data:`SPLIT_KEYS`
    it stored), and its ``curve`` when the constrained run follows its schedule (None
    otherwise), with a ``note`` saying how, or why not."""

    accuracy: float
    source: str
    curve: ReferenceCurve | None
    note: str
    split: dict[str, Any] = field(default_factory=dict)

    def check(self, config: Any) -> None:
        """ValueError (one line) unless a run of ``config`` (a
        :class:`~cvsparse.config.RunConfig`) can be judged against this run: the same
        validation split (settings still unset are not compared) and, when it follows the
        curve, the same epoch count."""
        for key in SPLIT_KEYS:
            mine = getattr(config.data, key)
            if key in self.split and mine is not None and self.split[key] != mine:
                raise ValueError(f"accuracy.reference: {self.source} measured its accuracy with "
                                 f"data.{key} = {self.split[key]!r}, this run has {mine!r} "
                                 "(the reference must come from the same validation split)")
        if self.curve is not None and len(self.curve.lrs) != config.total_epochs:
            raise ValueError(f"accuracy.reference: the run follows the {len(self.curve.lrs)} "
                             f"epochs of {self.source}, its configuration has "
                             f"{config.total_epochs} (a run that follows a schedule keeps its "
                             "epoch count)")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, for a checkpoint (:meth:`from_dict` reads them back exactly)."""
        curve = None if self.curve is None else {
            "lrs": list(self.curve.lrs), "val_acc": list(self.curve.val_acc),
            "inner": [list(point) for point in self.curve.inner],
            "weight_l2": self.curve.weight_l2}
        return {"accuracy": self.accuracy, "source": self.source, "curve": curve,
                "note": self.note, "split": dict(self.split)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> FollowedRun:
        curve = state["curve"]
        if curve is not None:
            curve = ReferenceCurve(tuple(curve["lrs"]), tuple(curve["val_acc"]),
                                   tuple((at, acc) for at, acc in curve["inner"]),
                                   curve["weight_l2"])
        return cls(state["accuracy"], state["source"], curve, state["note"],
                   dict(state["split"]))


def followed_run_of(config: Any) -> FollowedRun | None:
    """The run a constrained run of ``config`` (a :class:`~cvsparse.config.RunConfig`) is
    judged against, read from its folder (:func:`read_followed_run`); None when the run is
    not constrained or not by a run folder (``accuracy.reference``)."""
    acc = config.accuracy
    if not acc.active or acc.reference is None or acc.reference_accuracy is not None:
        return None
    return read_followed_run(acc.reference, config)


def followed_run_in(state: dict[str, Any], config: Any) -> FollowedRun | None:
    """The reference run a run's checkpoint ``state`` stored (key ``"followed"``), or, for a
    checkpoint that holds none (written before runs stored it), the one of ``config`` read
    from its folder (:func:`followed_run_of`)."""
    stored = state.get("followed")
    return FollowedRun.from_dict(stored) if stored is not None else followed_run_of(config)


def read_followed_run(path: str | Path, config: Any = None) -> FollowedRun:
    """The finished run in folder ``path``, each of its files read once.

    With ``config`` (a :class:`~cvsparse.config.RunConfig`) the run must have measured its
    accuracy on the same validation split, and its curve comes along when a run of
    ``config`` can follow it (same model, batch size and epoch count, a schedule with a drop
    to start the drive at); without, the curve is None.  ValueError (one line) when the
    folder, its report or the report's ``val_acc`` is missing, the split differs, or its
    ``curve.csv`` is malformed."""
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
    stored = report.get("config")
    stored = stored if isinstance(stored, dict) else {}
    data = stored.get("data")
    split = {k: data[k] for k in SPLIT_KEYS if k in data} if isinstance(data, dict) else {}
    source = f"run folder {folder.name}"
    if config is None:
        return FollowedRun(float(accuracy), source, None,
                           "no run configuration was given to follow its schedule", split)
    curve, note = _followed_curve(folder, stored, config)
    run = FollowedRun(float(accuracy), source, curve, note, split)
    run.check(config)
    return run


def _followed_curve(folder: Path, stored: dict[str, Any],
                    config: Any) -> tuple[ReferenceCurve | None, str]:
    """The curve of the run in ``folder`` (configuration ``stored``, its report's) when a run
    of ``config`` can follow it, and a note for the report: how, or why it cannot (another
    model, batch size or epoch count, no ``metrics.csv``, a schedule without a phase to drive
    in).  ValueError (one line) when its ``curve.csv`` is malformed."""
    try:
        with open(folder / "metrics.csv", newline="") as handle:
            rows = {int(r["epoch"]): (float(r["lr"]), float(r["val_acc"]))
                    for r in csv.DictReader(handle)}
    except FileNotFoundError:
        return None, "it has no metrics.csv"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return None, f"its metrics.csv cannot be read ({exc})"
    epochs = config.total_epochs
    if stored.get("model") != config.model:
        return None, f"it trained {stored.get('model')!r}, this run {config.model!r}"
    data = stored.get("data")
    batch = data.get("batch_size") if isinstance(data, dict) else None
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
