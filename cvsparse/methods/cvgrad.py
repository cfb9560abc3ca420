"""Cross-validation-gradient compression (docs/method.md §1–5; the alternating schedule of
§5.1, "Algorithm 1" of the cross-validation-gradient paper).

Weights are trained by :class:`cvsparse.optim.ProxSGD` on ``CE + λ1‖W‖₁ + λ2/2‖W‖²`` with λ
fixed; after every ``optim.epochs`` epochs (one outer iteration) a pass over the validation split
moves λ along the implicit-function hypergradient of the validation loss.  ``online_every = k``
adds a hyper step every k training steps.

With a budget (``target_compression`` or ``target_flops``) the L1 phase ends at the first epoch
end, from ``threshold_start_epoch`` on, that meets it; with ``target_check_every = k`` also at
the first of every k training steps that does, and the rest of that epoch runs without L1,
thresholding or hyper steps on the support it reached.  The epochs left in the run (those of
the remaining outer iterations and ``finetune_epochs``) fine-tune that support.

With a floor (``min_compression``) λ1 is learned subject to "compression ≥ a floor that ramps
up to ``min_compression`` over ``min_compression_epochs``": at every hyper step the floor's
multiplier (:class:`cvsparse.hyper.CompressionFloor`) raises λ1 where the network is below it
and keeps the hypergradient from lowering λ1 there.  A budget above the floor then ends the L1
phase near the size asked for.

With an accuracy constraint (``accuracy.max_accuracy_drop`` / ``max_relative_drop``,
docs/method.md §8) the run has three phases, scheduled by
:class:`~cvsparse.methods.accuracy_drive.AccuracyDrive`: a dense phase that measures the
reference validation accuracy (none when the reference is given); a compression drive whose
level rises geometrically to ``accuracy.max_compression``, global magnitude cuts holding the
network to it while L1 with the learned λ shapes the magnitudes, the support probed at every
check; and fine-tuning of the sparsest support that met the constraint, from the weights it had
then.  The drive ends at ``accuracy.patience`` failed checks in a row or when its epochs run
out.

The phase is never stored: ``finetuning`` and ``hyper_active`` are functions of the epoch and
of the one piece of phase state each kind of run keeps — ``stopped_at`` (the first fine-tuning
epoch, once a budget is met) or the drive (its phases, its stop, whether its kept network was
restored).  A resumed run therefore cannot disagree with itself about where it is.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from cvsparse import faults
from cvsparse.config import AccuracyConfig, CVGradConfig, OptimConfig
from cvsparse.faults import NonFiniteError, SkippedStep
from cvsparse.hyper import CompressionFloor
from cvsparse.hyper.accuracy_constraint import STOP
from cvsparse.hyper.reference_run import FollowedRun

from .accuracy_drive import DENSE, DRIVE, AccuracyDrive
from .base import (
    CompressionMethod,
    RunData,
    budget_met,
    finetune_base_lr,
    finetune_weight_l2,
    supervised_step,
    warn_if_budget_missed,
)
from .cvgrad_optimizer import CVGradOptimizer, CVGradSettings
from .schedules import LRPhase

#: ``cvgrad.lambda_range`` of a constrained run when none is given: the drive's checks come ten
#: times an epoch, and each hyper step may move λ by a factor of e^hyper_lr; unbounded, λ2 rose
#: 59x in one drive epoch of ResNet-20 (docs/method.md §8).
CONSTRAINED_LAMBDA_RANGE = 10.0


class CurvatureLog:
    """Per-epoch counts of what the curvature estimator had to approximate, for
    ``metrics.csv``: ``hyper_steps``; with ``cg`` the steps whose solve met non-positive
    curvature (``cg_fallbacks``) and the mean relative residual (``cg_residual``); with the
    ``diagonal`` estimator the free weights whose negative curvature was clipped
    (``curvature_clipped``, summed over the epoch's hyper steps)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self.fallbacks = 0
        self.residuals: list[float] = []
        self.clipped: int | None = None

    def add(self, diagnostics: dict[str, Any]) -> None:
        self.steps += 1
        if "fallback" in diagnostics:
            self.fallbacks += diagnostics["fallback"] != "none"
            self.residuals.append(diagnostics["relative_residual"])
        if "clipped" in diagnostics:
            self.clipped = (self.clipped or 0) + diagnostics["clipped"]

    def row(self) -> dict[str, float | int]:
        """The epoch's columns, then a fresh count for the next epoch."""
        row: dict[str, float | int] = {"hyper_steps": self.steps}
        if self.residuals:
            row["cg_fallbacks"] = self.fallbacks
            row["cg_residual"] = sum(self.residuals) / len(self.residuals)
        if self.clipped is not None:
            row["curvature_clipped"] = self.clipped
        self._reset()
        return row


class CVGradMethod(CompressionMethod):
    """Learned-λ elastic-net compression."""

    name = "cvgrad"
    takes_accuracy_constraint = True

    def __init__(self, model: nn.Module, data: RunData, settings: CVGradConfig,
                 optim: OptimConfig, epochs: int, *, accuracy: AccuracyConfig | None = None,
                 follow: FollowedRun | None = None) -> None:
        """``settings`` is the ``cvgrad`` section; ``optim`` the learning rate, momentum and
        schedule; ``epochs`` the run's epoch count (fine-tuning included); ``accuracy`` the
        ``accuracy`` section of a constrained run (None: unconstrained) and ``follow`` the
        reference run it is judged against (:func:`~cvsparse.methods.base.constraint_of`)."""
        super().__init__(model, data, optim, epochs)
        cv = self.settings = settings
        core_settings = CVGradSettings.from_section(cv)
        if accuracy is not None and core_settings.lambda_range is None:
            core_settings.lambda_range = CONSTRAINED_LAMBDA_RANGE
        self.core = CVGradOptimizer(model, lr=optim.lr, momentum=optim.momentum,
                                    settings=core_settings, names=self.regularized)
        self.names, self.weights = self.core.names, self.core.weights
        self.unregularized = self.core.unregularized
        self.lambdas, self.optimizer = self.core.lambdas, self.core.optimizer
        self.floor = None if cv.min_compression is None else CompressionFloor(
            cv.min_compression,
            cv.min_compression_epochs or cv.outer * optim.epochs,
            cv.floor_gain,
        )
        self.drive: AccuracyDrive | None = None
        if accuracy is not None:
            self.drive = AccuracyDrive(accuracy, optim, epochs, data.val, self._train_batch,
                                       self.loss_fn, data.reduce, follow)
        self.core.push_lambdas()
        self.initial_state = copy.deepcopy(model.state_dict()) if cv.reinit else None
        self.history: list[dict[str, Any]] = [self._lambda_record(outer=0)]
        self.steps = 0
        self.stopped_at: int | None = None   # first fine-tuning epoch, once the budget is met
        self._epoch = 0
        self.released = 0
        self._online_val: Iterator | None = None
        self._curvature = CurvatureLog()


    # ---- the run's phase: a function of the epoch, ``stopped_at`` and the drive ------------

    @property
    def finetune_start(self) -> int:
        """The first fine-tuning epoch: after the last outer iteration, or the epoch after the
        one that met the budget (``stopped_at``), or the drive's end."""
        if self.drive is not None:
            return self.drive.finetune_start
        cv = self.settings
        return cv.outer * self.optim.epochs if self.stopped_at is None else self.stopped_at

    @property
    def finetuning(self) -> bool:
        """Whether the current epoch fine-tunes a fixed support (no L1, no thresholding)."""
        return self._epoch >= self.finetune_start

    @property
    def hyper_active(self) -> bool:
        """Whether λ moves now: from ``hyper_warmup_epochs`` until the support is fixed (the
        outer iterations' end or a met budget, also within an epoch); in a constrained run,
        during the drive until it stops."""
        if self.drive is not None:
            return self.drive.phase(self._epoch) == DRIVE and not self.drive.selected
        return (self._epoch >= self.settings.hyper_warmup_epochs
                and self.stopped_at is None and not self.finetuning)

    # ---- the loop's hooks -----------------------------------------------------------------

    def set_epoch(self, epoch: int) -> float:
        if self.drive is not None:
            return self._set_constrained_epoch(epoch)
        cv, opt = self.settings, self.optim
        self._online_val = None
        self._epoch = epoch
        if self.finetuning:
            start = self.finetune_start
            return self._set_finetune_epoch(epoch - start)
        inner = epoch % opt.epochs
        if inner == 0 and epoch > 0 and cv.reinit:
            self.model.load_state_dict(self.initial_state)
            self.optimizer.state.clear()
        elif inner == 0 and epoch > 0 and cv.release_masks:
            self.released = self.release_masks(cv.release_batches)
        self.optimizer.param_groups[0]["threshold"] = (
            cv.threshold if epoch >= cv.threshold_start_epoch else None
        )
        return self.schedule.enter(self.optimizer, epoch, self.lr_phase(epoch))

    def lr_phase(self, epoch: int) -> LRPhase:
        """Each outer iteration restarts the stepped schedule at ``optim.lr``; fine-tuning
        restarts it at ``optim.finetune_lr`` (default ``lr·gamma``); a constrained run has the
        drive's phases (:meth:`AccuracyDrive.lr_phase`)."""
        if self.drive is not None:
            return self.drive.lr_phase(epoch)
        opt = self.optim
        if epoch >= self.finetune_start:
            start = self.finetune_start
            return LRPhase("finetune", start, self.epochs - start, finetune_base_lr(opt))
        return LRPhase("train", epoch - epoch % opt.epochs, opt.epochs, opt.lr)

    def _set_finetune_epoch(self, epoch: int) -> float:
        """Fine-tuning epoch ``epoch`` (0-based; after the last outer iteration, the budget or
        the drive): no L1 (the support is fixed by the masks, pruned weights stay at zero),
        λ2 ``optim.finetune_weight_l2`` (default: the learned λ2), the ``"finetune"``
        learning-rate phase."""
        group = self.optimizer.param_groups[0]
        if epoch == 0:
            if self.drive is not None:
                self._select_support()
            else:
                self._fix_support()
            cv = self.settings
            if self.stopped_at is None:   # the outer iterations ran out before any budget
                warn_if_budget_missed("cvgrad", self.model, self.input_shape(),
                                      cv.target_compression, cv.target_flops, self._epoch,
                                      self.regularized)
            if (cv.min_compression is not None
                    and (reached := self.core.compression()) < cv.min_compression):
                warnings.warn(f"cvgrad: the L1 phase ended after epoch {self._epoch} at "
                              f"{reached:.1f}x, below min_compression "
                              f"{cv.min_compression:g}; the remaining epochs fine-tune the "
                              "support as it is", stacklevel=2)
        group["lambda1"], group["threshold"] = 0.0, None   # every epoch: a resume reloads λ1
        group["lambda2"] = finetune_weight_l2(self.optim, self.core.lambda_args()[1])
        return self.schedule.enter(self.optimizer, self._epoch, self.lr_phase(self._epoch))

    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.observe(x)
        loss, logits = supervised_step(self.step_module, self.optimizer, x, y, self.guard,
                                       self.loss_fn, precision=self.precision)
        self.steps += 1
        if self.drive is not None:
            self._constrained_step()
        cv = self.settings
        k = cv.online_every
        if k and self.steps % k == 0 and self.hyper_active:
            self._hyper_step(self._next_online_val_batch())
            self.model.train()
        every = cv.target_check_every
        if (every and self.steps % every == 0 and not self.finetuning
                and self.stopped_at is None and self._budget_reached()):
            self.stopped_at = self._epoch + 1
            self._fix_support()
        return loss, logits

    def end_epoch(self, epoch: int) -> dict[str, float]:
        if self.drive is not None:
            return self._end_constrained_epoch(epoch)
        cv = self.settings
        if (epoch + 1) % self.optim.epochs == 0 and not self.finetuning:
            if self.hyper_active:
                for i, batch in enumerate(self.data.val):
                    if cv.hyper_batches is not None and i >= cv.hyper_batches:
                        break
                    self._hyper_step(batch)
                self.model.train()
            self.history.append(self._lambda_record(outer=(epoch + 1) // self.optim.epochs))
        if not self.finetuning and self.stopped_at is None and self._budget_reached():
            self.stopped_at = epoch + 1
        row = {
            "lambda1": float(self.lambdas.lambda1.mean()),
            "lambda2": float(self.lambdas.lambda2.mean()),
            "released": self.released,
            **self._curvature.row(),
        }
        if self.floor is not None:
            row["floor"] = self.floor.level(epoch)
            row["floor_nu"] = self.floor.nu
        self.released = 0
        return row

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "lambdas": self.lambdas.state_dict(),
            "history": self.history,
            "steps": self.steps,
            "initial_state": self.initial_state,
            "stopped_at": self.stopped_at,
            "floor": None if self.floor is None else self.floor.state_dict(),
            **({} if self.drive is None else {"drive": self.drive.state_dict()}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lambdas.load_state_dict(state["lambdas"])
        self.history = state["history"]
        self.steps = state["steps"]
        self.initial_state = state["initial_state"]
        self.stopped_at = state.get("stopped_at")   # absent in checkpoints before budgets
        if self.floor is not None:
            self.floor.load_state_dict(state["floor"])
        if self.drive is not None:
            self.drive.load_state_dict(state["drive"])
        self.core.push_lambdas()

    def report(self) -> dict[str, Any]:
        report = {"lambda_history": self.history, "regularized_tensors": self.names,
                  "budget_met_at_epoch": self.stopped_at}
        if self.drive is not None:
            report.update(self.drive.report())
            report["budget_met_at_epoch"] = None
        return report

    @torch.no_grad()
    def release_masks(self, batches: int) -> int:
        """Make pruning recoverable where the L1 optimality condition fails.

        A pruned weight ``w = 0`` is optimal for ``CE + λ1‖W‖₁`` only while the training
        gradient satisfies ``|g| ≤ λ1``.  ``g`` is averaged over ``batches`` training batches
        (model in eval mode, nothing else changes); masked weights with ``|g| > λ1_l`` get their
        mask back to True, so the next proximal steps may grow them again (and thresholding may
        prune them again).  An early λ overshoot therefore does not prune for good.

        Returns:
            The number of weights released.
        """
        masks = [self.optimizer.state[p].get("mask") for p in self.weights]
        if all(m is None for m in masks):
            return 0
        device = self.weights[0].device
        sums = [torch.zeros_like(p) for p in self.weights]
        used = 0
        self.model.eval()
        for batch in self.data.train_for_hvp:
            if used == batches:
                break
            x, y = (t.to(device) for t in batch)
            with torch.enable_grad():
                grads = torch.autograd.grad(self.loss_fn(self.model(x), y), self.weights)
            torch._foreach_add_(sums, grads)
            used += 1
        self.model.train()
        if self.data.reduce is not None:   # a data-parallel run: the mean over the ranks
            sums = self.data.reduce(sums)
        lam1 = self.lambdas.lambda1.expand(len(self.weights))
        released = 0
        for mask, total, level in zip(masks, sums, lam1.tolist(), strict=True):
            if mask is None:
                continue
            grow = ~mask & (total.abs() > level * used)
            released += int(grow.sum())
            mask |= grow
        return released

    # ---- the accuracy-constrained run (docs/method.md §8) --------------------------------------

    def _set_constrained_epoch(self, epoch: int) -> float:
        """Dense phase: ``optim.lr``, no L1, no thresholding, no hyper steps.  Drive:
        ``accuracy.drive_lr`` (default ``optim.lr``), thresholding, hyper steps at the checks.
        Then fine-tuning, as in the plain run.  Following a reference run's schedule, every
        phase takes that run's learning rate of the epoch instead."""
        drive = self.drive
        phase = drive.start_epoch(epoch)
        self._epoch, self._online_val = epoch, None
        if self.finetuning:
            start = self.finetune_start
            return self._set_finetune_epoch(epoch - start)
        group = self.optimizer.param_groups[0]
        self.core.push_lambdas()
        if phase == DENSE:
            group["lambda1"] = 0.0
        group["threshold"] = self.settings.threshold if phase == DRIVE else None
        return self.schedule.enter(self.optimizer, epoch, self.lr_phase(epoch))

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers whose states a kept network carries, by name."""
        return {"optimizer": self.optimizer}

    def _constrained_step(self) -> None:
        """After a training step: the drive's magnitude cut when one falls (the weights below
        the cut are pruned and masked, like τ's), then a check when one falls."""
        drive = self.drive
        drive.count_step()
        if self.hyper_active and drive.cut_due():
            drive.keep_start(self.model, self._optimizers())
            cut = drive.cut(self.weights)
            if cut is not None:
                group = self.optimizer.param_groups[0]
                group["threshold"] = max(cut, self.settings.threshold)
                self.optimizer.prune()   # the groups with a threshold: this one
                group["threshold"] = self.settings.threshold
        if drive.check_due():
            self._check_constraint()

    def _end_constrained_epoch(self, epoch: int) -> dict[str, float]:
        """The epoch-end check (the last dense epoch's sets the reference), the λ record."""
        drive = self.drive
        drive.end_epoch(self.finetuning)
        if epoch + 1 == drive.dense_end or (self.hyper_active and drive.last_drive_epoch()):
            self._check_constraint()
        if drive.dense_end <= epoch < drive.drive_end and not self.finetuning:
            self.history.append(self._lambda_record(outer=epoch + 1))
        return {"lambda1": float(self.lambdas.lambda1.mean()),
                "lambda2": float(self.lambdas.lambda2.mean()),
                **self._curvature.row(), **drive.row()}

    def _check_constraint(self) -> None:
        """Probe the support, let the constraint judge it (the sparsest feasible network is
        kept; a stop ends the drive on it), then, in the drive, one hyper step."""
        accuracy = self.drive.probe(copy.deepcopy(self.model), self.names,
                                    self.settings.threshold, self.precision)
        verdict = self.drive.judge(accuracy, self.core.compression(), self.model,
                                   self._optimizers())
        if verdict == STOP:
            self._select_support()   # the drive is over: hyper_active is False from here
        elif self.hyper_active:
            self._hyper_step(self._next_online_val_batch())
            self.model.train()

    def _select_support(self) -> None:
        """End the drive on the kept network (its weights, momentum and masks; when no check
        was feasible, the network from before the drive's first cut), masked below τ."""
        if self.drive.selected:
            return
        self.drive.restore(self.model, self._optimizers())
        self.core.push_lambdas()
        self._fix_support()

    # ---- internals --------------------------------------------------------------------------

    def _fix_support(self) -> None:
        """End the L1 phase: mask the weights below τ (zero from now on) and stop L1 and
        thresholding; λ2 and the learning rate stay as they are until the next epoch."""
        group = self.optimizer.param_groups[0]
        group["threshold"] = self.settings.threshold
        self.optimizer.prune()   # the groups with a threshold: the regularized weights only
        group["lambda1"], group["threshold"] = 0.0, None

    def _budget_reached(self) -> bool:
        """Whether the budget is met; never before ``threshold_start_epoch``, whose proximal
        zeros are not yet held by masks (early on they come and go by the thousand)."""
        cv = self.settings
        if self.optimizer.param_groups[0]["threshold"] is None:
            return False
        return budget_met(self.model, self.input_shape(), cv.target_compression,
                          cv.target_flops, self.regularized)

    def _hyper_step(self, val_batch: tuple[Tensor, Tensor]) -> None:
        """One λ update from a validation batch (model in eval mode: BN uses running stats).

        With ``lr_scaled_hyper`` the hypergradient is multiplied by the current weight learning
        rate relative to ``optim.lr``, as in the one-step unrolled derivative of T1–T2
        (Luketina et al. 2016, docs/method.md §5.2): λ acts on the weights only through
        ``lr·λ``, so while the learning rate is decayed λ barely moves (instead of running away
        on the greedy signal of nearly frozen weights).  The curvature system holds every
        trainable tensor (the unregularized ones too); what its estimator approximated is
        counted in :class:`CurvatureLog`."""
        diagnostics: dict[str, Any] = {}
        d1, d2 = self.core.hypergradient(val_batch, self._train_batch, self.data.loss_fn,
                                         reduce=self.data.reduce, diagnostics=diagnostics)
        self._curvature.add(diagnostics)
        lr_scale = self.core.lr_scale()
        before = self.lambdas.lambda1.clone()
        d1 = faults.poisoned("hyper", d1)
        try:
            if self.guard is not None:   # non-finite or exploding: skipped
                self.guard.check_hypergradient(d1, d2)
            self.lambdas.step(d1, d2)
        except (NonFiniteError, SkippedStep) as exc:   # λ, its moments and the floor stay
            if self.guard is None:
                raise
            self.guard.skipped("hyper", str(exc))
            return
        if self.guard is not None:
            self.guard.passed("hyper")
        if self.floor is not None:
            factor = self.floor.update(self.core.compression(), self._epoch, lr_scale)
            self.lambdas.rescale_lambda1_(factor, before if self.floor.binding else None)
        self.core.push_lambdas()

    def _train_batch(self) -> tuple[Tensor, Tensor]:
        """A training batch for curvature estimates, drawn with the hyper generator."""
        loader = self.data.train_for_hvp
        return next(iter(loader))

    def _next_online_val_batch(self) -> tuple[Tensor, Tensor]:
        if self._online_val is None:
            self._online_val = iter(self.data.val)
        try:
            return next(self._online_val)
        except StopIteration:
            self._online_val = iter(self.data.val)
            return next(self._online_val)

    def _lambda_record(self, outer: int) -> dict[str, Any]:
        return {
            "outer": outer,
            "lambda1": self.lambdas.lambda1.tolist(),
            "lambda2": self.lambdas.lambda2.tolist(),
        }
