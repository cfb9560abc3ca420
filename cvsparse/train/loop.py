"""The training loop shared by every compression method: the outer shell of the alternating
training / hyper-step schedule ("Algorithm 1", docs/method.md §5.1).

Per epoch: train on the training split (a tqdm bar on a terminal, one line per epoch on a pipe
or file), let the method finish the epoch (e.g. a hyper pass), evaluate on validation and test,
append a ``metrics.csv`` row and write ``checkpoint.pt`` atomically.  At the end:
``report.json``, ``plots/*.png`` and a summary table.
``Trainer(..., resume=True)`` continues a run from its checkpoint bit for bit on the CPU.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cvsparse import metrics, provenance, sources
from cvsparse.config import RunConfig, from_dict, resolve_defaults, validate
from cvsparse.data import (
    CROP_PADDING,
    BatchLoader,
    default_val_size,
    load_dataset,
    split_indices,
)
from cvsparse.faults import Diverged, SkippedStep, StepGuard
from cvsparse.hyper.accuracy_constraint import with_verdict
from cvsparse.hyper.reference_run import FollowedRun, followed_run_in, followed_run_of
from cvsparse.imagefolder import crop_padding, is_image_folder
from cvsparse.methods import METHOD_CLASSES
from cvsparse.methods.base import CompressionMethod, RunData
from cvsparse.precision import Precision

from . import checkpoint, distributed, outputs, rundir
from .averaging import WeightAverage
from .curve import CURVE_NAME, ValidationCurve

#: Keys every checkpoint state holds (a state without one of them is incomplete).
_STATE_KEYS = ("epoch", "model", "method", "generator", "hyper_generator", "rng", "split",
               "average", "rows", "wall_time_s", "config")


class Trainer:
    """Runs ``config`` and writes its outputs into ``out_dir``."""

    def __init__(self, config: RunConfig, out_dir: str | Path, *, resume: bool = False,
                 overwrite: bool = False, progress: bool = True,
                 on_resume: Callable[[RunConfig], RunConfig] | None = None) -> None:
        """``resume``: continue the run in ``out_dir`` (``config`` is ignored; ``on_resume``
        may adjust the stored configuration, or refuse it with ValueError); else a new run
        of ``config``, refused if ``out_dir`` holds another run's files unless ``overwrite``
        (which removes them when the run starts).  The folder is checked before any data is
        loaded; RunDirError / CheckpointError / ValueError name the problem."""
        self.out_dir = Path(out_dir)
        self.ranks = distributed.Ranks.from_env()   # one process unless started by torchrun
        self.followed: FollowedRun | None = None   # the reference run, read once
        if not resume:
            self.followed = followed_run_of(config)
            resolve_defaults(config, self.followed)
            validate(config, followed=self.followed)
        if self.ranks.is_main:   # only rank 0 writes into the folder
            rundir.check_writable(self.out_dir)
            rundir.check_unlocked(self.out_dir)
            if not resume:
                rundir.check_free(self.out_dir, overwrite)
        self.config = config
        self.progress = progress and self.ranks.is_main
        self._overwrite = overwrite
        self._owns_folder = resume   # a new run claims the folder when it first runs
        self.checkpoints = checkpoint.CheckpointStore(self.out_dir, required=_STATE_KEYS)
        state = self.checkpoints.load() if resume else None
        if state is not None:
            self.config = config = from_dict(state["config"])
            if on_resume is not None:
                self.config = config = on_resume(config)
            self.followed = followed_run_in(state, config)
            validate(config, followed=self.followed)
        self.ranks.check_batch_sizes(**{"data.batch_size": config.data.batch_size,
                                        "data.val_batch_size": config.data.val_batch_size})
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = self.ranks.join(_device(config.device))
        self.precision = Precision(config.precision, config.channels_last, self.device)
        _seed_everything(config.seed)

        provenance.check_data_root(config.data.dataset, config.data.root)
        self.dataset = load_dataset(config.data.dataset, config.data.root, config.data.download,
                                    image_size=config.data.image_size)
        self.provenance = provenance.collect(self.dataset, self.device)
        if state is not None:
            provenance.check_same_data(state.get("data_sha256"), self.provenance)
        n_train = len(self.dataset.y_train)
        val_size = config.data.val_size or default_val_size(config.data.dataset, n_train)
        config.data.val_size = val_size
        validate(config, n_train=n_train, followed=self.followed)
        if state is not None:
            self.train_idx, self.val_idx = state["split"]
        else:
            self.train_idx, self.val_idx = split_indices(n_train, val_size, config.data.split_seed)

        self.input_shape = tuple(self.dataset.x_train.shape[1:])
        config.num_classes = sources.resolve_num_classes(
            config.num_classes, self.dataset.num_classes, config.data.dataset)
        self.model = sources.build(config.model, config.num_classes, self.input_shape[0])
        sources.check_fits(self.model, config.model, self.input_shape, config.num_classes,
                           config.data.dataset)
        self.model.to(self.device)
        self.generator = torch.Generator().manual_seed(config.seed)
        hyper_generator = torch.Generator().manual_seed(config.seed + 1)
        method_class = METHOD_CLASSES[config.method]
        run_data = self._build_loaders(method_class, hyper_generator)
        self.method = method_class.from_config(config, self.model, run_data, self.followed)
        self.guard = self.method.guard = StepGuard(config.optim.max_skipped_steps)
        self.method.precision = self.precision
        self.precision.prepare(self.model)   # after the method: AutoPrune's gates too
        self.method.use_wrapper(self.ranks.wrap)   # DDP with several ranks
        self.average = WeightAverage(self.model, self.bn_loader, self.device)
        self.rows: list[dict[str, Any]] = []
        self.curve = ValidationCurve(config.accuracy.curve_points)
        self.epoch = 0
        self.wall_time = 0.0
        if state is not None:
            self._restore(state, hyper_generator)
        self._set_augmentation()

    # ---- public -------------------------------------------------------------------------------

    def run(self, max_epochs: int | None = None) -> dict[str, Any]:
        """Train to the end of the schedule (or to global epoch ``max_epochs``, leaving a
        checkpoint to resume from); returns the report, also written to report.json.

        The folder is locked while the run writes (RunDirError if another process holds it).
        In a data-parallel run only rank 0 locks and writes."""
        if not self.ranks.is_main:
            return self._run_locked(max_epochs)
        with rundir.RunLock(self.out_dir):
            self._claim_folder()
            return self._run_locked(max_epochs)

    def _claim_folder(self) -> None:
        """On a new run's first :meth:`run`: refuse (or, with ``overwrite``, clear) another
        run's files, checked again now that the folder is locked."""
        if self._owns_folder:
            return
        rundir.check_free(self.out_dir, self._overwrite)
        rundir.clear(self.out_dir)
        self._owns_folder = True

    def _run_locked(self, max_epochs: int | None) -> dict[str, Any]:
        total = self.config.total_epochs
        if max_epochs is not None:
            total = min(total, max_epochs)
        while self.epoch < total:
            start = time.perf_counter()
            row = self._run_epoch(self.epoch)
            self.wall_time += time.perf_counter() - start
            row["wall_time_s"] = round(self.wall_time, 3)
            self.rows.append(row)
            self.epoch += 1
            if self.epoch == self.config.total_epochs and self.average.count:
                self.average.copy_to_model()   # the finished model is the weight average
            if self.ranks.is_main:
                outputs.write_metrics_csv(self.rows, self.out_dir / "metrics.csv")
                outputs.write_metrics_csv(self.curve.rows, self.out_dir / CURVE_NAME)
                self.checkpoints.save(self._state())
        report = self.report()
        if self.ranks.is_main:
            outputs.write_json(report, self.out_dir / "report.json")
            outputs.write_plots(self.rows, report, self.out_dir / "plots", self.curve.rows)
        if self.progress:
            print(outputs.summary_table(report))
        return report

    def report(self) -> dict[str, Any]:
        """The docs/method.md §7 report of the model as it is now (its weight average, once
        averaging has begun)."""
        with self._evaluated():
            return run_report(self.method, self.rows, self.input_shape, self.config,
                              self.wall_time, self.ranks.world_size,
                              extra={"provenance": self.provenance})

    # ---- internals ----------------------------------------------------------------------------

    def _build_loaders(self, method_class: type, hyper_generator: torch.Generator) -> RunData:
        """Training, validation and test loaders (``self.*_loader``) and the method's extras.

        Validation batches come from the held-out part of the training set, never augmented;
        ``self.generator`` orders the weight batches, ``hyper_generator`` everything else."""
        ds, dc = self.dataset, self.config.data
        if ds.name.startswith("cifar"):
            augment, padding, flip = dc.augment, CROP_PADDING, True
        elif is_image_folder(ds.name):
            augment, padding, flip = dc.augment, crop_padding(ds.image_shape[1]), True
        else:
            augment, padding, flip = dc.augment and dc.mnist_shift > 0, dc.mnist_shift, False

        def loader(images, labels, indices, batch_size, *, shuffle, augment, generator,
                   whole=False):   # whole: every rank iterates all of it, else its shards
            made = BatchLoader(images, labels, indices, batch_size, shuffle=shuffle,
                               augment=augment, mean=ds.mean, std=ds.std, generator=generator,
                               crop_padding=padding, flip=flip)
            return made if whole else self.ranks.shard(made)

        self._augment = augment   # what the data config asks for; _set_augmentation applies it
        weight_idx, reserved_idx = method_class.split_training(self.train_idx)
        self.train_loader = loader(ds.x_train, ds.y_train, weight_idx, dc.batch_size,
                                   shuffle=True, augment=augment, generator=self.generator)
        self.val_loader = loader(ds.x_train, ds.y_train, self.val_idx, dc.val_batch_size,
                                 shuffle=False, augment=False, generator=None)
        self.test_loader = loader(ds.x_test, ds.y_test, torch.arange(len(ds.y_test)),
                                  dc.val_batch_size, shuffle=False, augment=False, generator=None)
        self.bn_loader = loader(ds.x_train, ds.y_train, self.train_idx, dc.val_batch_size,
                                shuffle=False, augment=False, generator=None, whole=True)
        return RunData(
            val=self.val_loader,
            train_for_hvp=loader(ds.x_train, ds.y_train, self.train_idx, dc.batch_size,
                                 shuffle=True, augment=False, generator=hyper_generator),
            hyper_generator=hyper_generator,
            second_half=None if reserved_idx is None else loader(
                ds.x_train, ds.y_train, reserved_idx, dc.batch_size, shuffle=True,
                augment=augment, generator=hyper_generator),
            input_shape=self.input_shape,
            loss_fn=self.ranks.loss(F.cross_entropy),
            reduce=self.ranks.reducer(),
        )

    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        self.guard.start_epoch()
        lr = self.method.set_epoch(epoch)
        self._set_augmentation()
        averaging = self._averages(epoch)
        self.model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        cap = self.config.optim.max_steps_per_epoch
        n_steps = len(self.train_loader) if cap is None else min(cap, len(self.train_loader))
        desc = f"epoch {epoch + 1}/{self.config.total_epochs}"
        live = self.progress and _is_terminal(sys.stderr)   # else one line when the pass ends
        bar = tqdm(total=n_steps, desc=desc, disable=not live, leave=False, dynamic_ncols=True)
        self.curve.start_epoch(epoch, n_steps)
        started, steps = time.perf_counter(), 0
        for step, (x, y) in enumerate(self.train_loader):
            if step >= n_steps:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
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
        if self.progress and not live:
            print(f"{desc}: {steps} steps, loss {loss_sum / max(seen, 1):.4f}, acc "
                  f"{correct / max(seen, 1):.3f}, {time.perf_counter() - started:.1f} s",
                  file=sys.stderr, flush=True)
        extra = self.method.end_epoch(epoch)
        self.ranks.check_agreement(epoch, {
            "model": self.model.state_dict(),
            "method state (lambda, masks, gates, optimizer)": self.method.state_dict()})
        with self._evaluated():
            val = self.ranks.evaluate(self.model, self.val_loader, self.device, self.precision)
            test = self.ranks.evaluate(self.model, self.test_loader, self.device,
                                       self.precision)
            totals = metrics.summarize(
                metrics.layer_table(self.method.measured_model(), self.input_shape))
        _check_evaluation(epoch, val["loss"], test["loss"])
        row = epoch_row(epoch, lr, (loss_sum, correct, seen), val, test, totals, self.guard,
                        extra)
        if self.progress:
            tqdm.write(f"epoch {epoch + 1}: train acc {row['train_acc']:.4f}  val acc "
                       f"{row['val_acc']:.4f}  test acc {row['test_acc']:.4f}  compression "
                       f"{row['compression_rate']:.1f}x  " +
                       "  ".join(f"{k} {v:.3g}" for k, v in extra.items()))
        return row

    def _guarded_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
        """The method's training step (:func:`guarded_step`)."""
        return guarded_step(self.model, self.method, self.guard, x, y)

    def _validate(self) -> dict[str, Any]:
        """The validation split's loss and accuracy now (a point of :attr:`curve`)."""
        with self._evaluated():
            return self.ranks.evaluate(self.model, self.val_loader, self.device, self.precision)

    def _averages(self, epoch: int) -> bool:
        """Whether ``epoch`` lies in the weight-averaging window: the last ``optim.swa_epochs``
        epochs of the run, all of them fine-tuning epochs (``validate`` sees to that)."""
        window = self.config.optim.swa_epochs
        return window > 0 and epoch >= self.config.total_epochs - window

    def _evaluated(self) -> AbstractContextManager[None]:
        """The weights evaluation and the report see: the mean once averaging has begun (the
        training iterate comes back after the block), else the model as it is.  A finished run's
        model already holds the mean (``run`` copied it in), so it is not swapped in again."""
        finished = self.epoch >= self.config.total_epochs
        return self.average.applied() if self.average.count and not finished else nullcontext()

    def _set_augmentation(self) -> None:
        """Switch the training batches' augmentation for the epoch about to run: always on with
        ``data.augment_phase = "all"``, only while the method fine-tunes with ``"finetune"``."""
        phase = self.config.data.augment_phase
        on = self._augment and (phase == "all" or self.method.finetuning)
        for loader in (self.train_loader, self.method.data.second_half):
            if loader is not None:
                loader.augment = on

    def _state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "generator": self.generator.get_state(),
            "hyper_generator": self.method.data.hyper_generator.get_state(),
            "rng": checkpoint.rng_state(),
            "split": (self.train_idx, self.val_idx),
            "average": self.average.state_dict(),
            "rows": self.rows,
            "curve": self.curve.state_dict(),
            "wall_time_s": self.wall_time,
            "config": self.config.to_dict(),
            "guard": self.guard.state_dict(),
            "precision": self.precision.state_dict(),
            "data_sha256": [f["sha256"] for f in self.provenance["data"]["files"]],
            "followed": None if self.followed is None else self.followed.to_dict(),
        }

    def _restore(self, state: dict[str, Any], hyper_generator: torch.Generator) -> None:
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.average.load_state_dict(state["average"])
        if "guard" in state:   # checkpoints written before the step guard existed lack it
            self.guard.load_state_dict(state["guard"])
        if "precision" in state:   # ... and before mixed precision (their runs are fp32)
            self.precision.load_state_dict(state["precision"])
        self.generator.set_state(state["generator"])
        hyper_generator.set_state(state["hyper_generator"])
        checkpoint.set_rng_state(state["rng"])
        self.rows = state["rows"]
        self.curve.load_state_dict(state.get("curve", []))   # older checkpoints: no points
        self.epoch = state["epoch"]
        self.wall_time = state["wall_time_s"]


class CVTrainer(Trainer):
    """:class:`Trainer` for the cross-validation-gradient method (``method="cvgrad"``)."""

    def __init__(self, config: RunConfig, out_dir: str | Path, **kwargs: Any) -> None:
        if config.method != "cvgrad":
            raise ValueError(f"CVTrainer runs method 'cvgrad', got {config.method!r}")
        super().__init__(config, out_dir, **kwargs)


def guarded_step(model: torch.nn.Module, method: Any, guard: StepGuard, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
