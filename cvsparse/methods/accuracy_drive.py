"""The schedule of an accuracy-constrained run (docs/method.md §8), shared by the methods that
take one (cvgrad, AutoPrune).

A method owns its optimizers and how its state is saved; this object owns the rest: the phases
(dense, drive, fine-tuning), the drive's rising compression level and the magnitude cut that
holds the network to it, when cuts and checks fall, the probe that measures a support, the
constraint's verdicts and the kept network.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cvsparse import metrics
from cvsparse.config import AccuracyConfig, OptimConfig
from cvsparse.hyper import AccuracyConstraint
from cvsparse.hyper.accuracy_constraint import BEST, STOP
from cvsparse.hyper.reference_run import FollowedRun, ReferenceCurve, read_followed_run
from cvsparse.precision import FP32, Precision

from .base import Batches, LossFn, finetune_base_lr
from .schedules import LRPhase

#: Phases of a constrained run.
DENSE, DRIVE, FINETUNE = "dense", "drive", "finetune"
#: Steps per epoch assumed before a whole epoch was seen (a run with a given reference has no
#: dense phase to count them in).
FIRST_EPOCH_STEPS = 100
#: Magnitude cuts per epoch of the drive.
CUTS_PER_EPOCH = 32


class AccuracyDrive:
    """Phases, drive, checks, probe and kept network of one constrained run.

    Args:
        accuracy: the ``accuracy`` section (bound, reference, phases, checks, probe).
        optim: ``lr`` / ``gamma`` / ``momentum`` (the probe's defaults).
        epochs: the run's epoch count.
        val: the validation batches the probe is evaluated on.
        train_batch: returns a fresh training batch for the probe (the hyper generator's).
        loss_fn: the training loss.
        reduce: averages tensors over the ranks of a data-parallel run (None: one process),
            so that every rank probes and judges alike.
        follow: with ``accuracy.reference``, the reference run as the run read it
            (:func:`~cvsparse.hyper.reference_run.read_followed_run`: its final accuracy and,
            when this run can follow it, its per-epoch curve); None reads only its final
            accuracy.
        weight_steps: the weight steps the method takes per training step (AutoPrune, whose
            steps draw a batch from each half of the training split: 2), so that a probe
            trains on as many batches as the run's weights see in its share of an epoch.
    """

    def __init__(self, accuracy: AccuracyConfig, optim: OptimConfig, epochs: int, val: Batches,
                 train_batch: Callable[[], tuple], loss_fn: LossFn,
                 reduce: Callable[[Sequence[Tensor]], list[Tensor]] | None = None,
                 follow: FollowedRun | None = None, weight_steps: int = 1) -> None:
        acc = accuracy
        self.weight_steps = weight_steps
        self.accuracy, self.optim = accuracy, optim
        self.val, self.train_batch, self.loss_fn = val, train_batch, loss_fn
        self.reduce = reduce
        self.constraint = AccuracyConstraint(acc.max_accuracy_drop, acc.max_relative_drop,
                                             acc.patience)
        self.epochs = epochs
        self.dense_end, self.drive_end = acc.phases(epochs)
        self.curve: ReferenceCurve | None = None
        self.curve_note: str | None = None
        if acc.reference_accuracy is not None:
            self.constraint.set_reference(acc.reference_accuracy / 100,
                                          "given (reference_accuracy)")
        elif acc.reference is not None:
            followed = follow if follow is not None else read_followed_run(acc.reference)
            reference, source = followed.accuracy, followed.source
            self.curve, self.curve_note = followed.curve, followed.note
            if self.curve is None:
                warnings.warn(f"accuracy.reference: the run is judged against {source}'s final "
                              f"validation accuracy only: {self.curve_note}", stacklevel=2)
                source = f"{source} (final accuracy: {self.curve_note})"
            else:
                self.dense_end, self.drive_end = self.curve.phases(acc.finetune_fraction)
                source = f"{source}, {self.curve_note}"
            self.constraint.set_reference(reference, source)
        self.snapshot: dict[str, Any] | None = None   # the kept network's state
        self.selected = False          # the kept network is in place (drive over)
        self.steps_per_epoch: int | None = None   # steps of the last whole epoch
        self.stopped_at: int | None = None        # first fine-tuning epoch, when stopped early
        self.epoch = 0
        self.epoch_steps = 0
        self.next_check = acc.check_ratio   # the level of the next check

    # ---- phases and clock ----------------------------------------------------------------

    def start_epoch(self, epoch: int) -> str:
        """Begin global epoch ``epoch``; returns its phase."""
        self.epoch, self.epoch_steps = epoch, 0
        return self.phase(epoch)

    def phase(self, epoch: int) -> str:
        if epoch >= (self.drive_end if self.stopped_at is None else self.stopped_at):
            return FINETUNE
        return DENSE if epoch < self.dense_end else DRIVE

    def lr_phase(self, epoch: int) -> LRPhase:
        """The learning-rate phase of epoch ``epoch``: the dense phase at ``optim.lr``, the
        drive at ``accuracy.drive_lr`` (default ``optim.lr``), both constant; fine-tuning
        restarted at ``optim.finetune_lr`` (default ``lr·gamma``).  Following a reference
        run, each phase takes that run's rates of its epochs."""
        opt, phase = self.optim, self.phase(epoch)
        if phase == DENSE:
            start, end, base = 0, self.dense_end, opt.lr
        elif phase == DRIVE:
            drive_lr = self.accuracy.drive_lr
            start, end = self.dense_end, self.finetune_start
            base = opt.lr if drive_lr is None else drive_lr
        else:
            start, end, base = self.finetune_start, self.epochs, finetune_base_lr(opt)
        followed = None if self.curve is None else tuple(self.curve.lrs[start:end])
        return LRPhase(phase, start, end - start, base, followed)

    def scheduled_lr(self, epoch: int) -> float | None:
        """The learning rate of epoch ``epoch`` when the run follows a reference run's schedule
        (its ``metrics.csv``); None when the method sets its own."""
        return None if self.curve is None else self.curve.lrs[epoch]

    def reference_now(self) -> float | None:
        """The reference of a check now: the followed dense run's validation accuracy after as
        much training as the probed network has had, the run's epochs so far (fractions
        included) and the probe's steps, which train at this epoch's learning rate and so
        count up to the epoch's end at most; None without a curve (the one reference)."""
        if self.curve is None:
            return None
        probe_share = self.probe_steps() / self.weight_steps_per_epoch()
        return self.curve.accuracy_after(self.epoch + min(1.0, self.epoch_share() + probe_share))

    def epoch_share(self) -> float:
        """The share of the current epoch done (whole before an epoch's steps are known)."""
        return (min(1.0, self.epoch_steps / self.steps_per_epoch)
                if self.steps_per_epoch else 1.0)

    @property
    def finetune_start(self) -> int:
        """The first fine-tuning epoch."""
        return self.drive_end if self.stopped_at is None else self.stopped_at

    def level(self) -> float:
        """The drive's compression level now: ``C_max ^ (t / R)``, ``t`` the drive's progress
        in epochs (fractions included), ``R`` its length, ``C_max`` =
        ``accuracy.max_compression``; 1 before the drive, ``C_max`` after."""
        t = self.epoch - self.dense_end + self.epoch_share()
        span = self.drive_end - self.dense_end
        return self.accuracy.max_compression ** min(1.0, max(0.0, t / span))

    def cut_due(self) -> bool:
        """Whether a magnitude cut falls after this drive step (:data:`CUTS_PER_EPOCH` per
        epoch, every 10 steps before a whole epoch was counted)."""
        n = self.steps_per_epoch
        every = max(1, n // CUTS_PER_EPOCH) if n else 10
        return self.epoch_steps % every == 0

    @torch.no_grad()
    def cut(self, weights: list[Tensor]) -> float | None:
        """The global magnitude threshold that brings ``weights`` to the drive's level now:
        pruning every weight with ``|w| <`` it leaves ``total / level`` of them (ties aside);
        None when the network is already that compressed."""
        total = sum(w.numel() for w in weights)
        nonzero = sum(int(torch.count_nonzero(w)) for w in weights)
        keep = max(1, int(total / self.level()))
        if nonzero <= keep:
            return None
        magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
        kth = torch.kthvalue(magnitudes.float().cpu(), total - keep).values
        return float(torch.nextafter(kth, torch.tensor(math.inf)))

    def count_step(self) -> None:
        self.epoch_steps += 1

    def end_epoch(self, finetuning: bool) -> None:
        """Remember a whole pruning epoch's step count (it spaces the next epoch's checks)."""
        if not finetuning:
            self.steps_per_epoch = self.epoch_steps

    def check_due(self) -> bool:
        """Whether a check falls after this drive step: each time the drive's level has grown
        by ``accuracy.check_ratio`` since the last check, so that the kept network is within
        that factor of the sparsest one the constraint allows (and the epoch-end check of the
        drive's last epoch, which the method takes in its ``end_epoch``)."""
        if self.phase(self.epoch) != DRIVE or self.selected:
            return False
        level = self.level()
        if level < self.next_check:
            return False
        self.next_check = level * self.accuracy.check_ratio
        return True

    def last_drive_epoch(self) -> bool:
        """Whether the current epoch is the drive's last."""
        return self.epoch + 1 == self.drive_end

    # ---- measuring -------------------------------------------------------------------------

    def weight_steps_per_epoch(self) -> int:
        """The weight steps of an epoch: its training steps times ``weight_steps``."""
        return (self.steps_per_epoch or FIRST_EPOCH_STEPS) * self.weight_steps

    def probe_steps(self) -> int:
        """The training steps of a probe: ``accuracy.probe_fraction`` of an epoch's weight
        steps."""
        return max(1, round(self.accuracy.probe_fraction * self.weight_steps_per_epoch()))

    def probe(self, network: nn.Module, names: list[str], threshold: float,
              precision: Precision | None = None) -> float:
        """What a support is worth: the validation accuracy of ``network`` (a copy the caller
        may discard; it is trained here) after :meth:`probe_steps` steps
        of SGD without L1 (the run's momentum, ``accuracy.probe_lr``, default
        ``lr · gamma``; the followed schedule's learning rate with a reference curve), its weights
        ``names`` that are zero or below ``threshold`` held at zero.  The probe's steps and its
        validation compute as the run's do: under ``precision``'s autocast and memory layout
        (default fp32, contiguous; fp16 with a loss scaler of its own, started at the run's
        scale)."""
        precision = FP32 if precision is None else precision
        acc, opt = self.accuracy, self.optim
        steps = self.probe_steps()
        named = dict(network.named_parameters())
        weights = [named[n] for n in names]
        with torch.no_grad():
            masks = [(w != 0) & (w.abs() >= threshold) for w in weights]
            torch._foreach_mul_(weights, masks)
        precision.prepare(network)
        trained = [p for p in network.parameters() if p.requires_grad]
        lr = acc.probe_lr or self.scheduled_lr(self.epoch) or opt.lr * opt.gamma
        sgd = torch.optim.SGD(trained, lr=lr, momentum=opt.momentum)
        scaler = None if precision.scaler is None else torch.amp.GradScaler(
            precision.device_type, init_scale=precision.scaler.get_scale())
        device = weights[0].device
        network.train()
        for _ in range(steps):
            x, y = (t.to(device) for t in self.train_batch())
            sgd.zero_grad(set_to_none=True)
            with precision.autocast():
                logits = network(precision.input(x))
            loss = self.loss_fn(logits.float(), y)
            (loss if scaler is None else scaler.scale(loss)).backward()
            if self.reduce is not None:   # the global batch's gradient on every rank
                with_grad = [p for p in trained if p.grad is not None]
                for p, g in zip(with_grad, self.reduce([p.grad for p in with_grad]),
                                strict=True):
                    p.grad = g
            if scaler is None:
                sgd.step()
            else:   # skips a step whose scaled gradients overflowed, and lowers the scale
                scaler.step(sgd)
                scaler.update()
            with torch.no_grad():
                torch._foreach_mul_(weights, masks)
        return self._accuracy(network, precision)

    def _accuracy(self, network: nn.Module, precision: Precision) -> float:
        """Validation accuracy of ``network`` over the whole split (every rank's shard),
        its forward passes under ``precision``."""
        part = metrics.evaluate(network, self.val, precision=precision)
        if self.reduce is None:
            return part["acc"]
        counts = torch.tensor([part["acc"] * part["n"], part["n"]], dtype=torch.float64)
        correct, n = self.reduce([counts])[0].tolist()
        return correct / n   # the ratio of the means is the ratio of the sums

    def judge(self, accuracy: float, compression: float, model: nn.Module,
              optimizers: dict[str, torch.optim.Optimizer]) -> str:
        """The constraint's verdict on a check measured at ``accuracy``; the dense phase's
        last check sets a rising reference first.  When the network is the new kept one, a
        copy of the states of ``model`` and ``optimizers`` (by name) is stored."""
        if self.constraint.reference is None:
            self.constraint.set_reference(
                accuracy, f"dense phase of {self.dense_end} epochs, raised by the checks of "
                "the drive", rising=True)
        verdict = self.constraint.observe(accuracy, compression, (self.epoch, self.epoch_steps),
                                          self.reference_now())
        if verdict == BEST:
            self.snapshot = _copy_states(model, optimizers)
        if verdict == STOP:
            self.stopped_at = self.epoch + 1
        return verdict

    def keep_start(self, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        """Called before each cut of the drive: before the first, keep a copy of the network
        as it is, the network a drive with no feasible check falls back to (never one that
        the drive's cuts made less accurate than the bound allows)."""
        if self.snapshot is None:
            self.snapshot = _copy_states(model, optimizers)

    def restore(self, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        """Put the kept network's states back into ``model`` and ``optimizers`` (without a
        feasible check, those from before the drive's first cut; nothing when the drive never
        cut); the drive is over from here on."""
        if self.snapshot is not None:
            model.load_state_dict(self.snapshot["model"])
            for name, opt in optimizers.items():
                opt.load_state_dict(self.snapshot[name])
        self.selected = True

    def row(self) -> dict[str, float]:
        """The epoch's ``metrics.csv`` columns of the drive."""
        row = {"drive_level": self.level()}
        if self.curve is not None:   # the bound after this epoch
            row["accuracy_bound"] = self.constraint.bound_for(
                self.curve.accuracy_after(self.epoch + 1))
        elif self.constraint.reference is not None:
            row["accuracy_bound"] = self.constraint.bound
        return row

    def report(self) -> dict[str, Any]:
        """The report's entries (the loop adds ``constraint_met_val`` from its final
        validation accuracy: :func:`~cvsparse.hyper.accuracy_constraint.with_verdict`)."""
        return {**self.constraint.report(), "reference_curve": self.curve is not None}

    def state_dict(self) -> dict[str, Any]:
        return {"constraint": self.constraint.state_dict(), "snapshot": self.snapshot,
                "selected": self.selected, "steps_per_epoch": self.steps_per_epoch,
                "stopped_at": self.stopped_at, "next_check": self.next_check}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.constraint.load_state_dict(state["constraint"])
        self.snapshot, self.selected = state["snapshot"], state["selected"]
        self.steps_per_epoch, self.stopped_at = state["steps_per_epoch"], state["stopped_at"]
        self.next_check = state["next_check"]


def _copy_states(model: nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """A deep copy of the states of ``model`` (key ``"model"``) and ``optimizers`` (by name)."""
    return copy.deepcopy({"model": model.state_dict(),
                          **{name: opt.state_dict() for name, opt in optimizers.items()}})
