"""AutoPrune (docs/method.md §6): gates ``h(m) = 1[m > 0]`` on weights or whole units, learned
by straight-through gradients on auxiliary parameters ``m``.

The training split is halved: weights take a step on a batch of the first half, then the
auxiliary parameters on a batch of the second half (1:1); where no gate moves (fine-tuning,
the dense phase of an accuracy-constrained run) both batches train the weights; in the drive of
a constrained run the second batch trains the weights too, after the gates' step, so that they
keep the pace of the dense run the checks compare them with.  Weights carry
L2 (``weight_l2``), ``m`` carries L1 (``aux_l1``, applied by the proximal step, so ``m``
reaches exactly 0 and the unit switches off; it comes back if the data gradient pushes ``m``
above 0 again).  With
``aux_l1_ramp_epochs = R`` the L1 grows linearly over the first R epochs, so that the pruning
follows the ramp rather than the gates' learning rate.  Once the
compression (or FLOPs) target is met the gates freeze and the weights are fine-tuned on all
training data from the next epoch on (the target is checked at every epoch end and, with
``target_check_every = k``, every k gate steps; once met, the rest of the epoch takes no gate
step); fine-tuning also runs for ``finetune_epochs`` after ``optim.epochs``.  Fine-tuning
restarts the learning-rate schedule at ``optim.finetune_lr`` (default ``lr·gamma``) over the
epochs that remain, with weight L2 ``optim.finetune_weight_l2`` (default: ``weight_l2``).
If ``optim.epochs`` end before the target is met, the gates freeze there with a warning, and
the report's ``budget_met_at_epoch`` is None.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cvsparse import metrics
from cvsparse.config import AccuracyConfig, AutoPruneConfig, OptimConfig, resolve_autoprune
from cvsparse.hyper.accuracy_constraint import STOP
from cvsparse.hyper.reference_run import FollowedRun
from cvsparse.nn import aux_parameters, gated_layers, strip
from cvsparse.params import regularized_parameters

from .accuracy_drive import DENSE, DRIVE, FINETUNE, AccuracyDrive
from .autoprune_optimizer import AutoPruneOptimizer, AutoPruneSettings
from .base import (
    CompressionMethod,
    RunData,
    budget_met,
    finetune_base_lr,
    finetune_weight_l2,
    forward_loss,
    supervised_step,
    warn_if_budget_missed,
)
from .schedules import LRPhase


class AutoPruneMethod(CompressionMethod):
    """Auxiliary-parameter pruning of every Conv2d / Linear layer."""

    name = "autoprune"
    takes_accuracy_constraint = True

    def __init__(self, model: nn.Module, data: RunData, settings: AutoPruneConfig,
                 optim: OptimConfig, epochs: int, *, accuracy: AccuracyConfig | None = None,
                 follow: FollowedRun | None = None) -> None:
        """``settings`` is the ``autoprune`` section (its unset ``aux_lr`` and ``weight_l2``
        take :func:`~cvsparse.config.resolve_autoprune`'s defaults); ``optim``, ``epochs``,
        ``accuracy`` and ``follow`` as for :class:`~cvsparse.methods.cvgrad.CVGradMethod`."""
        super().__init__(model, data, optim, epochs)
        curve = follow.curve if follow is not None else None
        ap = self.settings = resolve_autoprune(
            settings, accuracy is not None, curve.weight_l2 if curve is not None else None)
        if data.second_half is None:
            raise ValueError("autoprune needs the second half of the training split")
        if ap.pretrained:
            model.load_state_dict(load_weights(ap.pretrained))
        self.core = AutoPruneOptimizer(model, lr=optim.lr, momentum=optim.momentum,
                                       settings=AutoPruneSettings.from_section(ap),
                                       names=self.regularized)
        self.weight_opt, self.aux_opt = self.core.weight_opt, self.core.aux_opt
        # At aux_lr 0 (a constrained run's default) the gates take no steps: they need no
        # gradient, and a gate step is its forward pass alone, which still moves what it moves
        # (BatchNorm statistics).
        self._fixed_gates = ap.aux_lr == 0
        if self._fixed_gates:
            self._hold_gates()
        self.frozen_at: int | None = None   # epoch at which the gates froze
        self.history: list[dict[str, float]] = []
        self._second: Iterator | None = None
        self._epoch = 0
        self._gate_steps = 0        # gate steps taken in this epoch
        self._target_met = False    # met within this epoch: the gates stop until it ends
        self._dense = False         # a constrained run's dense phase: no gate, whole split
        self.drive: AccuracyDrive | None = None
        if accuracy is not None:
            self.drive = AccuracyDrive(accuracy, optim, epochs, data.val,
                                       lambda: next(iter(self.data.train_for_hvp)),
                                       self.loss_fn, data.reduce, follow, weight_steps=2)

    @staticmethod
    def split_training(train_idx: Tensor) -> tuple[Tensor, Tensor | None]:
        half = len(train_idx) // 2
        return train_idx[:half], train_idx[half:]

    def set_epoch(self, epoch: int) -> float:
        if self.drive is not None:
            return self._set_constrained_epoch(epoch)
        opt = self.optim
        self._epoch = epoch
        if epoch >= opt.epochs and self.frozen_at is None:   # the gating budget has ended
            self.frozen_at = epoch
            ap = self.settings
            warn_if_budget_missed("autoprune", self.measured_model(), self.input_shape(),
                                  ap.target_compression, ap.target_flops, epoch,
                                  self.regularized)
        weight_l2 = self.settings.weight_l2
        if self.frozen_at is not None:
            weight_l2 = finetune_weight_l2(self.optim, weight_l2)
            self._hold_gates()
        lr = self.schedule.enter(self.weight_opt, epoch, self.lr_phase(epoch))
        self.weight_opt.param_groups[0]["lambda2"] = weight_l2
        self.finetuning = self.frozen_at is not None
        self.aux_opt.param_groups[0]["lambda1"] = aux_l1_at(self.settings, epoch)
        self._second = None
        self._gate_steps, self._target_met = 0, False
        return lr

    def lr_phase(self, epoch: int) -> LRPhase:
        """The weights' learning-rate phase: the stepped schedule at ``optim.lr`` until the
        gates freeze; then fine-tuning restarts it at ``optim.finetune_lr`` (default
        ``lr·gamma``) over the epochs that remain; a constrained run has the drive's phases
        (:meth:`AccuracyDrive.lr_phase`).  The gates' learning rate is constant."""
        if self.drive is not None:
            return self.drive.lr_phase(epoch)
        opt = self.optim
        if self.frozen_at is None:
            return LRPhase("train", 0, opt.epochs, opt.lr)
        start = self.frozen_at
        return LRPhase("finetune", start, self.epochs - start, finetune_base_lr(opt))

    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.observe(x)
        loss, logits = supervised_step(self.step_module, self.weight_opt, x, y, self.guard,
                                       self.loss_fn, precision=self.precision)
        if self.frozen_at is not None or self._dense:   # both halves train the weights
            xb, yb = (t.to(x.device) for t in self._second_batch())
            supervised_step(self.step_module, self.weight_opt, xb, yb, self.guard, self.loss_fn,
                            precision=self.precision)
        elif not self._target_met:
            xb, yb = (t.to(x.device) for t in self._second_batch())
            if self._fixed_gates:
                with torch.no_grad():
                    forward_loss(self.step_module, xb, yb, self.guard, self.loss_fn,
                                 precision=self.precision)
            else:
                supervised_step(self.step_module, self.aux_opt, xb, yb, self.guard,
                                self.loss_fn, precision=self.precision)
            if self.drive is not None:   # the weights keep the dense run's pace (two steps)
                supervised_step(self.step_module, self.weight_opt, xb, yb, self.guard,
                                self.loss_fn, precision=self.precision)
            self._gate_steps += 1
            every = self.settings.target_check_every
            if every and self._gate_steps % every == 0:
                self._target_met = self._target_reached()
        if self.drive is not None:
            self._constrained_step()
        return loss, logits

    def end_epoch(self, epoch: int) -> dict[str, float]:
        extra: dict[str, float] = {}
        if self.drive is not None:
            extra = self._end_constrained_epoch(epoch)
        elif self.frozen_at is None and (self._target_met or self._target_reached()):
            self.frozen_at = epoch + 1
        gates = torch.cat([(p.detach() > 0).flatten() for _, p in aux_parameters(self.model)])
        record = {"epoch": epoch, "gates_open": float(gates.float().mean()),
                  "frozen": float(self.frozen_at is not None)}
        self.history.append(record)
        return {"gates_open": record["gates_open"], "frozen": record["frozen"], **extra}

    def measured_model(self) -> nn.Module:
        return strip(copy.deepcopy(self.model))

    def state_dict(self) -> dict[str, Any]:
        return {"weight_opt": self.weight_opt.state_dict(), "aux_opt": self.aux_opt.state_dict(),
                "frozen_at": self.frozen_at, "history": self.history,
                **({} if self.drive is None else {"drive": self.drive.state_dict()})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weight_opt.load_state_dict(state["weight_opt"])
        self.aux_opt.load_state_dict(state["aux_opt"])
        self.frozen_at = state["frozen_at"]
        self.history = state["history"]
        if self.drive is not None:
            self.drive.load_state_dict(state["drive"])

    def report(self) -> dict[str, Any]:
        # the frozen gates keep the support, so it meets the target now iff it did at the freeze
        met = self.frozen_at is not None and self._target_reached()
        report = {"gate_history": self.history, "gates_frozen_at_epoch": self.frozen_at,
                  "budget_met_at_epoch": self.frozen_at if met else None}
        if self.drive is not None:
            report.update(self.drive.report())
        return report

    # ---- the accuracy-constrained run (docs/method.md §8) --------------------------------------

    def _set_constrained_epoch(self, epoch: int) -> float:
        """Dense phase: weight steps only, on both halves of the training split, as a dense
        run takes them (the gates stay as initialized, open or not).  Drive: a weight step on
        the first half's batch, a gate step then a weight step on the second half's,
        ``accuracy.drive_lr`` (default ``optim.lr``), the magnitude cuts.  Fine-tuning:
        the kept gates frozen, as after a met budget.  Following a reference run's schedule,
        every phase takes that run's learning rate of the epoch."""
        drive = self.drive
        phase = drive.start_epoch(epoch)
        self._epoch, self._second, self._gate_steps = epoch, None, 0
        self._target_met = phase != DRIVE   # gate steps only in the drive
        self._dense = phase == DENSE
        weight_l2 = self.settings.weight_l2
        if phase == FINETUNE:
            self._select_gates()
            weight_l2 = finetune_weight_l2(self.optim, weight_l2)
        lr = self.schedule.enter(self.weight_opt, epoch, self.lr_phase(epoch))
        self.weight_opt.param_groups[0]["lambda2"] = weight_l2
        self.finetuning = phase == FINETUNE
        self.aux_opt.param_groups[0]["lambda1"] = aux_l1_at(self.settings, epoch)
        return lr

    def _constrained_step(self) -> None:
        """After a training step: in the drive, the magnitude cut when one falls (closing the
        gates of the smallest open weights), then a check when one falls."""
        drive = self.drive
        drive.count_step()
        in_drive = drive.phase(self._epoch) == DRIVE and not drive.selected
        if in_drive and drive.cut_due():
            drive.keep_start(self.model, self._optimizers())
            self._cut()
        if drive.check_due():
            self._check_constraint()

    def _end_constrained_epoch(self, epoch: int) -> dict[str, float]:
        drive = self.drive
        drive.end_epoch(self.finetuning)
        in_drive = drive.phase(epoch) == DRIVE and not drive.selected
        if epoch + 1 == drive.dense_end or (in_drive and drive.last_drive_epoch()):
            self._check_constraint()
        return drive.row()

    @torch.no_grad()
    def _cut(self) -> None:
        """Close, for good, the gates of the open weights below the drive's cut: ``aux`` set to
        0 (a closed gate) and masked in the gate optimizer."""
        layers = gated_layers(self.model)
        effective = [m.effective_weight() for _, m in layers]
        cut = self.drive.cut(effective)
        if cut is None:
            return
        for (_, layer), weight in zip(layers, effective, strict=True):
            close = (weight.abs() < cut) & layer.gate()
            state = self.aux_opt.state[layer.aux]
            mask = state.setdefault("mask", torch.ones_like(layer.aux, dtype=torch.bool))
            mask &= ~close
            layer.aux.masked_fill_(~mask, 0.0)

    def _check_constraint(self) -> None:
        """Probe the gated network's support; the constraint keeps the sparsest feasible one
        (weights, gates, both optimizers) and a stop freezes the gates on it."""
        network = self.measured_model()
        names = [n for n, _ in regularized_parameters(network, self.regularized)]
        accuracy = self.drive.probe(network, names, 0.0, self.precision)
        totals = metrics.summarize(metrics.layer_table(self.measured_model(), self.input_shape(),
                                                       self.regularized))
        verdict = self.drive.judge(accuracy, totals["compression_rate"], self.model,
                                   self._optimizers())
        if verdict == STOP:
            self._select_gates()
            self._target_met = True   # no gate step for the rest of this epoch

    def _select_gates(self) -> None:
        """Freeze the gates of the kept network (restored with its weights and optimizer
        states; when no check was feasible, the network from before the drive's first
        cut)."""
        if not self.drive.selected:
            self.drive.restore(self.model, self._optimizers())
            self.frozen_at = self.drive.finetune_start
        self._hold_gates()

    # ---- internals --------------------------------------------------------------------------

    def _hold_gates(self) -> None:
        """Gates that take no more steps (frozen, or ``aux_lr`` 0) take no gradient either:
        their layers then gate by the plain mask product, which gives the weights the bits of
        the gated op (docs/method.md §6.2), and no backward pass computes the gates' gradient.
        The step module is built again over the parameters that still learn."""
        learning = [aux for _, aux in aux_parameters(self.model) if aux.requires_grad]
        if not learning:
            return
        for aux in learning:
            aux.requires_grad_(False)
        self.step_module = self.wrap(self.model)

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers whose states a kept network carries, by name."""
        return {"weight_opt": self.weight_opt, "aux_opt": self.aux_opt}

    def _target_reached(self) -> bool:
        """Whether the gated model, as :meth:`measured_model` reports it, meets
        ``target_compression`` or ``target_flops``."""
        ap = self.settings
        if ap.target_compression is None and ap.target_flops is None:
            return False
        return budget_met(self.measured_model(), self.input_shape(), ap.target_compression,
                          ap.target_flops, self.regularized)

    def _second_batch(self) -> tuple[Tensor, Tensor]:
        loader = self.data.second_half
        if self._second is None:
            self._second = iter(loader)
        try:
            return next(self._second)
        except StopIteration:
            self._second = iter(loader)
            return next(self._second)


def aux_l1_at(ap: AutoPruneConfig, epoch: int) -> float:
    """The aux L1 strength of global epoch ``epoch``: ``aux_l1 · min(1, (epoch + 1) / R)`` with
    ``R = aux_l1_ramp_epochs`` (``aux_l1`` throughout when R = 0)."""
    ramp = ap.aux_l1_ramp_epochs
    return ap.aux_l1 if ramp == 0 else ap.aux_l1 * min(1.0, (epoch + 1) / ramp)


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """A plain model state_dict from a run folder, its ``checkpoint.pt``, or a state_dict file.

    Files are read with ``weights_only=True`` (a pickle asking for code is refused, never run)
    and a cvsparse checkpoint must pass its checksum; ValueError (one line) otherwise.  Gated
    keys (``*.aux``) of a checkpoint of an AutoPrune run are dropped: gates restart from their
    initial distribution."""
    from cvsparse.train import checkpoint  # here: cvsparse.train imports the methods

    path = Path(path)
    if path.is_dir():
        path = path / checkpoint.CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"autoprune.pretrained: no file at {path}")
    state = checkpoint.read_weights_only(path)
    if isinstance(state, dict) and state.get("format") == checkpoint.FORMAT:
        state = checkpoint.load(path).get("model")
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"autoprune.pretrained: {path} holds neither a cvsparse checkpoint "
                         "nor a state_dict of tensors")
    return {k: v for k, v in state.items() if not k.endswith(".aux")}
