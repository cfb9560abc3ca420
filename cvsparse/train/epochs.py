"""The epoch loop that both front ends run: the command line's :class:`~cvsparse.train.Trainer`
(the zoo's models on the built-in datasets) and the Python API's
:func:`~cvsparse.api.compress` (any model on the caller's loaders).

An epoch: the method's ``set_epoch``, its training steps under the step guard (a tqdm bar on
a terminal, one line when the pass ends otherwise), the validation points of ``curve.csv``,
the method's ``end_epoch`` (a hyper pass, a check ...), the ranks' agreement check, the
evaluation on validation and test, and one ``metrics.csv`` row.  After each epoch the rows and
the checkpoint are written; a finished run's model is its weight average when there is one.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cvsparse import metrics
from cvsparse.config import RunConfig
from cvsparse.faults import Diverged, SkippedStep, StepGuard
from cvsparse.hyper.accuracy_constraint import with_verdict
from cvsparse.hyper.reference_run import FollowedRun
from cvsparse.methods.base import CompressionMethod
from cvsparse.precision import Precision

from . import checkpoint, outputs
from .averaging import WeightAverage
from .curve import CURVE_NAME, ValidationCurve
from .distributed import Ranks


class EpochLoop:
    """Runs the epochs of a built run.  The front end sets these attributes first:

    ``config``, ``model``, ``precision``, ``device``, ``ranks``, then :meth:`_attach` (which
    sets ``method``, ``guard``, ``average``, ``curve``, ``rows``, ``epoch``, ``wall_time``);
    ``followed`` (the reference run of a constrained run, or None); ``progress`` (print the
    progress on stderr); ``train_loader`` / ``val_loader`` / ``test_loader`` (the batches
    of this rank; ``test_loader`` None: no test columns); ``loss_fn`` (the validation loss,
    ``loss_fn(outputs, targets)`` as a batch mean; None: cross-entropy summed over the
    samples); ``measured`` (the names of the weights each row's compression counts; None:
    every Conv/Linear weight); ``input_shape`` (one sample's shape; None: the first batch's).
    A resumed run's ``rows``, ``epoch`` and ``wall_time`` come back with :meth:`_restore_loop`.
    """

    config: RunConfig
    model: nn.Module
    method: CompressionMethod
    guard: StepGuard
    precision: Precision
    device: torch.device
    ranks: Ranks
    average: WeightAverage
    curve: ValidationCurve
    followed: FollowedRun | None
    progress: bool
    train_loader: Iterable[tuple[Tensor, Tensor]]
    val_loader: Iterable[tuple[Tensor, Tensor]]
    test_loader: Iterable[tuple[Tensor, Tensor]] | None
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None
    measured: list[str] | None
    input_shape: tuple[int, ...] | None
    rows: list[dict[str, Any]]
    epoch: int
    wall_time: float

    def _attach(self, method: CompressionMethod,
                average_loader: Iterable[tuple[Tensor, Tensor]]) -> None:
        """Make ``method`` the run's: its step guard, its precision (applied to the model after
        the method was built, so AutoPrune's gates too), the ranks' wrapper, a weight average
        whose BatchNorm statistics are recomputed over ``average_loader``, and an empty history
        (no rows, no validation points, epoch 0).  Needs ``config``, ``model``, ``precision``,
        ``device`` and ``ranks``."""
        self.method = method
        self.guard = method.guard = StepGuard(self.config.optim.max_skipped_steps)
        method.precision = self.precision
        self.precision.prepare(self.model)
        method.use_wrapper(self.ranks.wrap)   # DDP with several ranks
        self.average = WeightAverage(self.model, average_loader, self.device)
        self.rows = []
        self.curve = ValidationCurve(self.config.accuracy.curve_points)
        self.epoch = 0
        self.wall_time = 0.0

    def _train_epochs(self, total: int, out_dir: Path | None,
                      store: checkpoint.CheckpointStore | None) -> None:
        """Run the epochs up to global epoch ``total``; with ``out_dir`` and ``store``, write
        ``metrics.csv``, ``curve.csv`` and the checkpoint after each."""
        while self.epoch < total:
            start = time.perf_counter()
            row = self._run_epoch(self.epoch)
            self.wall_time += time.perf_counter() - start
            row["wall_time_s"] = round(self.wall_time, 3)
            self.rows.append(row)
            self.epoch += 1
            if self.epoch == self.config.total_epochs and self.average.count:
                self.average.copy_to_model()   # the finished model is the weight average
            if out_dir is not None and store is not None:
                outputs.write_metrics_csv(self.rows, out_dir / "metrics.csv")
                outputs.write_metrics_csv(self.curve.rows, out_dir / CURVE_NAME)
                store.save(self._state())

    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train, finish and evaluate global epoch ``epoch``; returns its ``metrics.csv`` row."""
        self.guard.start_epoch()
        lr = self.method.set_epoch(epoch)
        self._start_epoch()
        averaging = self._averages(epoch)
        self.model.train()
        n_steps = loader_length(self.train_loader)
        cap = self.config.optim.max_steps_per_epoch
        if cap is not None:
            n_steps = cap if n_steps is None else min(cap, n_steps)
        desc = f"epoch {epoch + 1}/{self.config.total_epochs}"
        live = self.progress and _is_terminal(sys.stderr)   # else one line when the pass ends
        bar = tqdm(total=n_steps, desc=desc, disable=not live, leave=False, dynamic_ncols=True,
                   file=sys.stderr)
        self.curve.start_epoch(epoch, n_steps)
        started, steps = time.perf_counter(), 0
        loss_sum, correct, seen = 0.0, 0, 0
        for step, (x, y) in enumerate(self.train_loader):
            if n_steps is not None and step >= n_steps:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.input_shape is None:
                self.input_shape = tuple(x.shape[1:])
            try:
                loss, logits = self._guarded_step(x, y)
            except SkippedStep:
                bar.update()
                self.curve.after_step(step + 1, self._validate)
                continue
            if averaging:
                self.average.update()
            loss_sum += float(loss) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            steps += 1
            bar.update()
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
            self.curve.after_step(step + 1, self._validate)
        bar.close()
        loss_sum, correct, seen = self.ranks.sum(loss_sum, correct, seen)
        if seen == 0 and self.guard.counts["step"] == 0:
            raise ValueError("train_loader yielded no batches")
        if self.progress and not live:
            print(f"{desc}: {steps} steps, loss {loss_sum / max(seen, 1):.4f}, acc "
                  f"{correct / max(seen, 1):.3f}, {time.perf_counter() - started:.1f} s",
                  file=sys.stderr, flush=True)
        extra = self.method.end_epoch(epoch)
        self.ranks.check_agreement(epoch, {
            "model": self.model.state_dict(),
            "method state (lambda, masks, gates, optimizer)": self.method.state_dict()})
        with self._evaluated():
            val = self._evaluate(self.val_loader)
            test = None if self.test_loader is None else self._evaluate(self.test_loader)
            totals = metrics.summarize(metrics.layer_table(
                self.method.measured_model(), self._shape(), self.measured))
        _check_evaluation(epoch, val["loss"], (test or val)["loss"])
        row = epoch_row(epoch, lr, (loss_sum, correct, seen), val, test, totals, self.guard,
                        extra)
        if self.progress:
            tested = "" if test is None else f"  test acc {row['test_acc']:.4f}"
            tqdm.write(f"epoch {epoch + 1}: train acc {row['train_acc']:.4f}  val acc "
                       f"{row['val_acc']:.4f}{tested}  compression "
                       f"{row['compression_rate']:.1f}x  " +
                       "  ".join(f"{k} {v:.3g}" for k, v in extra.items()), file=sys.stderr)
        return row

    def _start_epoch(self) -> None:
        """Called after the method has entered an epoch, before its steps (the command line
        switches its loaders' augmentation here)."""

    def _guarded_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The method's training step (:func:`guarded_step`)."""
        return guarded_step(self.model, self.method, self.guard, x, y)

    def _evaluate(self, loader: Iterable[tuple[Tensor, Tensor]]) -> dict[str, Any]:
        """Loss and accuracy of the model over the whole split of ``loader`` (every rank's
        shards)."""
        return self.ranks.evaluate(self.model, loader, self.device, self.precision,
                                   self.loss_fn)

    def _validate(self) -> dict[str, Any]:
        """The validation split's loss and accuracy now (a point of :attr:`curve`)."""
        with self._evaluated():
            return self._evaluate(self.val_loader)

    def _averages(self, epoch: int) -> bool:
        """Whether ``epoch`` lies in the weight-averaging window: the last ``optim.swa_epochs``
        epochs of the run, all of them fine-tuning epochs (``validate`` sees to that)."""
        window = self.config.optim.swa_epochs
        return window > 0 and epoch >= self.config.total_epochs - window

    def _evaluated(self) -> AbstractContextManager[None]:
        """The weights evaluation and the report see: the mean once averaging has begun (the
        training iterate comes back after the block), else the model as it is.  A finished
        run's model already holds the mean (copied in after its last epoch), so it is not
        swapped in again."""
        finished = self.epoch >= self.config.total_epochs
        return self.average.applied() if self.average.count and not finished else nullcontext()

    def _shape(self) -> tuple[int, ...]:
        """One sample's shape (the method's, before any batch was seen)."""
        if self.input_shape is None:
            self.input_shape = self.method.input_shape()
        return self.input_shape

    def _write_results(self, report: dict[str, Any], out_dir: Path) -> None:
        """``report.json`` and ``plots/`` in ``out_dir``."""
        outputs.write_json(report, out_dir / "report.json")
        outputs.write_plots(self.rows, report, out_dir / "plots", self.curve.rows)

    # ---- checkpoints --------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        """The checkpoint: the loop's entries (the front end adds its own)."""
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "rng": checkpoint.rng_state(),
            "average": self.average.state_dict(),
            "rows": self.rows,
            "curve": self.curve.state_dict(),
            "wall_time_s": self.wall_time,
            "config": self.config.to_dict(),
            "guard": self.guard.state_dict(),
            "precision": self.precision.state_dict(),
            "followed": None if self.followed is None else self.followed.to_dict(),
        }

    def _restore_loop(self, state: dict[str, Any]) -> None:
        """Put the loop's entries of a checkpoint back (the model and the method included)."""
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.average.load_state_dict(state["average"])
        if "guard" in state:   # checkpoints written before the step guard existed lack it
            self.guard.load_state_dict(state["guard"])
        if "precision" in state:   # ... and before mixed precision (their runs are fp32)
            self.precision.load_state_dict(state["precision"])
        checkpoint.set_rng_state(state["rng"])
        self.rows = state["rows"]
        self.curve.load_state_dict(state.get("curve", []))   # older checkpoints: no points
        self.epoch = state["epoch"]
        self.wall_time = state["wall_time_s"]


def guarded_step(model: nn.Module, method: Any, guard: StepGuard, x: Tensor,
                 y: Tensor) -> tuple[Tensor, Tensor]:
    """``method.train_step(x, y)`` on ``model`` under ``guard``.  A step the guard skips
    (docs: cvsparse.faults) leaves the model's buffers (BatchNorm statistics) as they were, is
    counted, and raises SkippedStep again; too many in a row raise Diverged."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        result = method.train_step(x, y)
    except SkippedStep as exc:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved, strict=True):
                buffer.copy_(value)
        model.train()   # a skipped online hyper step may have left eval mode on
        guard.skipped("step", str(exc))
        raise
    guard.passed("step")
    return result


def epoch_row(epoch: int, lr: float, train: tuple[float, int, int], val: dict[str, Any],
              test: dict[str, Any] | None, totals: dict[str, Any], guard: StepGuard,
              extra: dict[str, Any]) -> dict[str, Any]:
    """One ``metrics.csv`` row: ``train`` = (summed loss, correct predictions, samples) of the
    epoch's training steps, ``val`` / ``test`` evaluations (test None: no test columns), the
    model's totals (:func:`cvsparse.metrics.summarize`), the guard's skip counts, the
    method's ``extra`` columns."""
    loss_sum, correct, seen = train
    return {
        "epoch": epoch, "lr": lr,
        "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
        "val_loss": val["loss"], "val_acc": val["acc"],
        **({} if test is None else {"test_loss": test["loss"], "test_acc": test["acc"]}),
        "params_nonzero": totals["params_nonzero"],
        "compression_rate": totals["compression_rate"], "pruned_pct": totals["pruned_pct"],
        "skipped_steps": guard.counts["step"],
        "skipped_hyper_steps": guard.counts["hyper"],
        **extra,
    }


def run_report(method: CompressionMethod, rows: list[dict[str, Any]],
               input_shape: tuple[int, ...], config: RunConfig, wall_time: float,
               world_size: int, regularized: list[str] | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The docs/method.md §7 report of ``method``'s model as it is now: the last row's
    accuracies, the totals and per-layer table of ``regularized`` (None: every Conv/Linear
    weight) for inputs of ``input_shape``, the method's own entries, the settings, and
    ``extra`` (the command line's provenance, the API's model class ...); with the accuracy
    constraint's verdict when there is one."""
    measured = method.measured_model()
    layers = metrics.layer_table(measured, input_shape, regularized)
    last = rows[-1] if rows else {}
    return with_verdict({
        "test_acc": last.get("test_acc"),
        "val_acc": last.get("val_acc"),
        **metrics.summarize(layers, measured),
        **method.report(),
        "layers": layers,
        **({} if regularized is None else {"regularized": regularized}),
        "epochs": rows and rows[-1]["epoch"] + 1,
        "config": config.to_dict(),
        "wall_time_s": wall_time,
        **(extra or {}),
        "world_size": world_size,
    })


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def loader_length(loader: Iterable[Any]) -> int | None:
    """``len(loader)``, or None when the loader has no length (an iterable dataset)."""
    try:
        return len(loader)   # type: ignore[arg-type]
    except TypeError:
        return None


def _is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (tqdm redraws its bar there with carriage returns; a
    pipe or file gets one line per epoch instead)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return False


def _check_evaluation(epoch: int, val_loss: float, test_loss: float) -> None:
    """Diverged if epoch ``epoch``'s evaluation is not finite: such an epoch is never
    checkpointed (the previous one stays the last good epoch)."""
    if not (math.isfinite(val_loss) and math.isfinite(test_loss)):
        raise Diverged(f"epoch {epoch + 1} evaluated to a non-finite loss (validation "
                       f"{val_loss}, test {test_loss})")
