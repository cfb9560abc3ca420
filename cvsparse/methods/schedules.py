"""Learning-rate schedules of a method's run, delegated to ``torch.optim.lr_scheduler``.

A method decides its *phases* — stretches of epochs that share a schedule: each outer
iteration of cvgrad, the pruning phase of AutoPrune and magnitude pruning, the dense phase and
the drive of a constrained run, the fine-tuning of a fixed support.  It describes the phase an
epoch belongs to as an :class:`LRPhase`; what the learning rate does within the phase is a
``torch.optim.lr_scheduler.LRScheduler``, built by a :data:`SchedulerFactory` when the phase
begins and stepped once per epoch after that.  :func:`recipe_scheduler` is the default factory
(the recipe's stepped schedule, ``optim.milestones`` / ``gamma``; the weight-averaging window;
a followed reference run's rates); ``cvsparse.compress(lr_scheduler=...)`` takes any other.

No scheduler state is saved: a resumed run rebuilds the scheduler of its phase and steps it to
the epoch, so a deterministic factory gives the uninterrupted run's rates bit for bit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from cvsparse.config import OptimConfig


@dataclass(frozen=True)
class LRPhase:
    """A stretch of epochs with one learning-rate schedule.

    ``name``: ``"train"`` (the stepped schedule), ``"dense"`` / ``"drive"`` (constant, a
    constrained run), ``"finetune"`` (the stepped schedule restarted, then the averaging
    window); ``start``: its first global epoch (0-based); ``epochs``: its length;
    ``base_lr``: the learning rate of its first epoch; ``followed``: when the run follows a
    reference run's schedule, that run's rate of each epoch of the phase (else None).
    """

    name: str
    start: int
    epochs: int
    base_lr: float
    followed: tuple[float, ...] | None = None


#: ``factory(optimizer, phase)``: a scheduler over ``phase`` whose epoch 0 is the phase's first
#: epoch; the optimizer's groups hold ``lr = phase.base_lr`` when it is called.
SchedulerFactory = Callable[[Optimizer, LRPhase], LRScheduler]


def stepped_factor(epoch: int, epochs: int, milestones: list[float], gamma: float) -> float:
    """``gamma`` to the number of milestones (fractions of ``epochs``) passed at ``epoch``."""
    drops = sum(0 < int(f * epochs) <= epoch for f in milestones)
    return gamma**drops


def recipe_scheduler(optim: OptimConfig) -> SchedulerFactory:
    """The recipe's schedules as ``LambdaLR`` factors of the phase's base rate: stepped by
    ``optim.gamma`` at ``optim.milestones`` in ``"train"``; constant in ``"dense"`` /
    ``"drive"``; in ``"finetune"`` stepped over all but the last ``optim.swa_epochs`` epochs,
    then ``optim.swa_lr`` (default: the base rate); a followed reference run's rates as
    they are."""

    def factory(optimizer: Optimizer, phase: LRPhase) -> LRScheduler:
        if phase.followed is not None:
            return FollowedLR(optimizer, phase.followed)
        if phase.name == "train":
            return LambdaLR(optimizer, lambda e: stepped_factor(e, phase.epochs, optim.milestones,
                                                                optim.gamma))
        if phase.name == "finetune":
            stepped = phase.epochs - optim.swa_epochs
            swa = 1.0 if optim.swa_lr is None else optim.swa_lr / phase.base_lr

            def finetune(e: int) -> float:
                if e >= stepped:
                    return swa
                return stepped_factor(e, stepped, optim.milestones, optim.gamma)

            return LambdaLR(optimizer, finetune)
        return LambdaLR(optimizer, lambda e: 1.0)

    return factory


class FollowedLR(LRScheduler):
    """The rates of another run, epoch by epoch (``lrs[e]`` at the scheduler's epoch ``e``, the
    last one after the end), taken as they are rather than as factors of a base rate, so that
    they match bit for bit."""

    def __init__(self, optimizer: Optimizer, lrs: tuple[float, ...]) -> None:
        self.lrs = lrs
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        rate = self.lrs[min(self.last_epoch, len(self.lrs) - 1)]
        return [rate] * len(self.optimizer.param_groups)


class PhaseScheduler:
    """Runs one optimizer's learning rate through a method's phases.

    :meth:`enter` is called at the start of every epoch with the epoch's phase: a new phase
    (or the first epoch this object sees, e.g. after a resume) builds its scheduler with the
    factory, stepped to the epoch; an epoch within the same phase steps the scheduler once.
    """

    def __init__(self, factory: SchedulerFactory) -> None:
        self.factory = factory
        self.phase: LRPhase | None = None
        self.scheduler: LRScheduler | None = None
        self.epoch: int | None = None

    def enter(self, optimizer: Optimizer, epoch: int, phase: LRPhase) -> float:
        """Set the learning rate of global epoch ``epoch`` (in ``phase``); returns it (the
        first group's)."""
        if phase != self.phase:   # also the first call: no phase yet
            for group in optimizer.param_groups:
                group["lr"] = phase.base_lr
                group.pop("initial_lr", None)   # a scheduler takes its base from ``lr``
            self.scheduler, self.phase = self.factory(optimizer, phase), phase
            self._advance(epoch - phase.start)
        else:
            self._advance(epoch - self.epoch)
        self.epoch = epoch
        return optimizer.param_groups[0]["lr"]

    def _advance(self, epochs: int) -> None:
        with warnings.catch_warnings():   # stepping ahead of ``optimizer.step()`` is intended
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            for _ in range(epochs):
                self.scheduler.step()
