"""The interface between the training loop and a compression method.

The loop (``cvsparse.train.epochs``, under the command line's ``Trainer`` and ``compress``, which
build the loaders) owns epochs, evaluation, checkpoints and reports; a method owns everything
that makes the model sparse: its optimizers, regularization strengths and any extra passes.  A
new method is one new module implementing :class:`CompressionMethod`.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvsparse import faults, metrics
from cvsparse.config import AccuracyConfig, OptimConfig, RunConfig
from cvsparse.faults import SkippedStep, StepFault, StepGuard
from cvsparse.hyper.reference_run import FollowedRun, followed_run_of
from cvsparse.precision import FP32, Precision

from .schedules import LRPhase, PhaseScheduler, SchedulerFactory, recipe_scheduler

#: A loader: any iterable of ``(inputs, targets)`` batches that can be iterated again (a
#: ``torch.utils.data.DataLoader``, cvsparse's ``BatchLoader``, a list of tensor pairs ...).
Batches = Iterable[tuple[Tensor, Tensor]]
#: ``loss_fn(outputs, targets) -> scalar tensor``.
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class RunData:
    """The batches a method may draw on besides the training batch it is handed, and what it
    must know of the task.

    ``val`` iterates the held-out validation split (no augmentation); ``train_for_hvp`` yields
    training batches for curvature estimates; ``hyper_generator`` drives their order (it is
    saved in checkpoints; None when the loaders draw from elsewhere); ``second_half`` iterates
    the training data a method reserved with :meth:`CompressionMethod.split_training` (None
    when it reserved none).  Every loader is any iterable of ``(inputs, targets)``.
    ``input_shape`` is one input's shape without the batch dimension (None: taken from the
    first batch the method sees); ``loss_fn`` the training loss (None: cross-entropy);
    ``regularized`` the names of the regularized weights (None: every Conv/Linear weight,
    ``cvsparse.params.select_weights``); ``reduce`` averages gradient-like tensors over the
    ranks of a data-parallel run (:mod:`cvsparse.train.distributed`; None: one process).
    """

    val: Batches
    train_for_hvp: Batches
    hyper_generator: torch.Generator | None = None
    second_half: Batches | None = None
    input_shape: tuple[int, ...] | None = None
    loss_fn: LossFn | None = None
    regularized: Sequence[str] | None = None
    reduce: Callable[[Sequence[Tensor]], list[Tensor]] | None = None


class CompressionMethod(ABC):
    """One compression method driven by :class:`cvsparse.train.Trainer`.

    ``finetuning`` is True from the epoch on which the method trains the weights of a fixed
    support (after cvgrad's last outer iteration, AutoPrune's freeze, the magnitude cut); each
    method sets it in :meth:`set_epoch`, and the loop reads it after that call.  ``guard`` is
    passed to every :func:`supervised_step`: a step it skips raises
    :class:`~cvsparse.faults.SkippedStep` out of :meth:`train_step`.  ``precision`` (autocast,
    loss scaling, input layout) is passed to every :func:`supervised_step` as well; the
    method's other passes (hyper steps, gradient tests) run in float32.
    """

    name: str = ""   # also the name of the method's config section
    #: Whether the constructor takes ``accuracy`` / ``follow`` (``--max-accuracy-drop``).
    takes_accuracy_constraint: bool = False
    finetuning: bool = False
    guard: StepGuard | None = None   # set by the loop: judges losses, counts skipped steps
    precision: Precision | None = None   # set by the loop; None: fp32, contiguous

    def __init__(self, model: nn.Module, data: RunData, optim: OptimConfig, epochs: int) -> None:
        self.optim = optim      # lr, momentum, the stepped schedule, fine-tuning settings
        self.epochs = epochs    # the whole run's epoch count, fine-tuning included
        self.model = model
        self.data = data
        self.loss_fn: LossFn = data.loss_fn if data.loss_fn is not None else F.cross_entropy
        self.regularized: list[str] | None = (
            None if data.regularized is None else list(data.regularized))
        self._input_shape = None if data.input_shape is None else tuple(data.input_shape)
        #: The module training steps run forward and backward through: the model, or (set by
        #: the loop with :meth:`use_wrapper` in a data-parallel run) its DistributedDataParallel
        #: wrapper.
        self.step_module: nn.Module = model
        #: Builds :attr:`step_module` from the model (:meth:`use_wrapper`).
        self.wrap: Callable[[nn.Module], nn.Module] = _as_is
        #: Runs the weights' learning rate through the method's phases (:meth:`lr_phase`).
        self.schedule = PhaseScheduler(recipe_scheduler(optim))

    def use_wrapper(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Run training steps through ``wrap(model)`` (the loop's data-parallel wrapper).  A
        method whose parameters stop taking gradients builds it again with ``wrap``: the
        wrapper fixes the parameters it averages gradients of when it is built."""
        self.wrap = wrap
        self.step_module = wrap(self.model)

    def use_lr_scheduler(self, factory: SchedulerFactory) -> None:
        """Schedule the weights' learning rate within each phase with ``factory(optimizer,
        phase)`` (any ``torch.optim.lr_scheduler``) instead of the recipe's stepped schedule;
        call before the first epoch."""
        self.schedule = PhaseScheduler(factory)

    @classmethod
    def from_config(cls, config: RunConfig, model: nn.Module, data: RunData,
                    followed: FollowedRun | None = None) -> CompressionMethod:
        """The method as a run's configuration tree sets it up (the command line and
        :func:`cvsparse.compress` build methods this way): its own section (named like the
        method), ``optim``, the epoch count and, for a method that takes an accuracy
        constraint, ``accuracy`` with the reference run it is judged against
        (:func:`constraint_of`; ``followed``: as the caller read or stored it)."""
        extra: dict[str, Any] = {}
        if cls.takes_accuracy_constraint:
            extra["accuracy"], extra["follow"] = constraint_of(config, followed)
        return cls(model, data, getattr(config, cls.name), config.optim, config.total_epochs,
                   **extra)

    @abstractmethod
    def set_epoch(self, epoch: int) -> float:
        """Prepare global epoch ``epoch`` (0-based); returns the weight learning rate used."""

    @abstractmethod
    def lr_phase(self, epoch: int) -> LRPhase:
        """The learning-rate phase global epoch ``epoch`` belongs to (its first epoch, length
        and base rate); :meth:`set_epoch` hands it to ``self.schedule``."""

    @abstractmethod
    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One optimization step on a training batch; returns ``(loss, logits)`` (detached)."""

    @abstractmethod
    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Work after global epoch ``epoch`` (e.g. a hyper pass); returns values to log."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the method exactly."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def report(self) -> dict[str, Any]:
        """Method-specific entries of ``report.json``."""
        return {}

    @staticmethod
    def split_training(train_idx: Tensor) -> tuple[Tensor, Tensor | None]:
        """Indices the loop trains weights on, and indices reserved for the method's own use
        (served as ``RunData.second_half``).  Default: all for the weights, none reserved."""
        return train_idx, None

    def measured_model(self) -> nn.Module:
        """The model as it would be exported, on which sparsity and FLOPs are reported."""
        return self.model

    def input_shape(self) -> tuple[int, ...]:
        """One input's shape without the batch dimension (e.g. ``(C, H, W)``): as
        ``RunData.input_shape`` gives it, else as the first training batch the method saw had
        it (:meth:`observe`), else as the first validation batch has it."""
        if self._input_shape is None:
            x, _ = next(iter(self.data.val))
            self._input_shape = tuple(x.shape[1:])
        return self._input_shape

    def observe(self, x: Tensor) -> None:
        """Remember the input shape of the training batch ``x`` (the first one counts)."""
        if self._input_shape is None:
            self._input_shape = tuple(x.shape[1:])


def supervised_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor,
                    y: Tensor, guard: StepGuard | None = None,
                    loss_fn: LossFn = F.cross_entropy, *,
                    precision: Precision | None = None) -> tuple[Tensor, Tensor]:
    """One step of ``optimizer`` on ``loss_fn(model(x), y)`` (cross-entropy by default);
    returns detached loss and logits.

    With a ``guard``, a loss or gradient it rejects (not finite, or exploding: see
    :mod:`cvsparse.faults`) raises :class:`~cvsparse.faults.SkippedStep` before the optimizer
    changes anything.

    ``precision`` (default: fp32, contiguous): the forward pass runs under its autocast on its
    layout of ``x``; logits of the reduced dtype are cast to float32 before ``loss_fn``, so
    the loss, the backward pass into the float32 parameters and the optimizer step are float32.
    With its fp16 loss scaler the loss is scaled for the backward pass and the gradients
    unscaled before the guard and the optimizer see them; a step whose scaled gradients
    overflowed is not taken (the scaler lowers its scale) and, with a ``guard``, raises
    SkippedStep."""
    precision = FP32 if precision is None else precision
    model.zero_grad(set_to_none=True)
    loss, logits = forward_loss(model, x, y, guard, loss_fn, precision=precision)
    scaler = precision.scaler
    (loss if scaler is None else scaler.scale(loss)).backward()
    faults.poison_grads(p for group in optimizer.param_groups for p in group["params"])
    if scaler is not None:
        scaler.unscale_(optimizer)
    if guard is not None:
        guard.limit_gradients(optimizer)
    try:
        stepped = _optimizer_step(optimizer, scaler)
    except StepFault as exc:
        if guard is None:
            raise
        raise SkippedStep(str(exc)) from None
    if guard is not None:
        if not stepped:
            raise SkippedStep(f"fp16 gradients overflowed; the loss scale is lowered to "
                              f"{scaler.get_scale():g}")
        guard.record_gradients(optimizer)
    return loss.detach(), logits.detach()


def forward_loss(model: nn.Module, x: Tensor, y: Tensor, guard: StepGuard | None = None,
                 loss_fn: LossFn = F.cross_entropy, *,
                 precision: Precision | None = None) -> tuple[Tensor, Tensor]:
    """The forward pass of :func:`supervised_step`: ``(loss, logits)`` of ``model`` on ``x``
    under ``precision`` (logits of the reduced dtype cast to float32).  With a ``guard``, a
    loss it rejects raises :class:`~cvsparse.faults.SkippedStep`; one it takes joins its
    history.  Under ``torch.no_grad()`` this is a training step that moves nothing but what a
    forward pass moves (BatchNorm running statistics in training mode)."""
    precision = FP32 if precision is None else precision
    with precision.autocast():
        logits = model(precision.input(x))
    if isinstance(logits, Tensor) and precision.dtype is not None \
            and logits.dtype == precision.dtype:
        logits = logits.float()
    loss = faults.poisoned("loss", loss_fn(logits, y))
    if guard is not None:
        guard.check_loss(loss)
    return loss, logits


def _optimizer_step(optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None) -> bool:
    """``optimizer.step()``, through ``scaler`` (then its update) when there is one; whether
    the step was taken: a scaler skips a step whose unscaled gradients hold inf or NaN, and
    then lowers its scale."""
    if scaler is None:
        optimizer.step()
        return True
    scale = scaler.get_scale()
    try:
        scaler.step(optimizer)
    finally:
        scaler.update()
    return scaler.get_scale() >= scale


def finetune_weight_l2(opt: OptimConfig, training: float | Tensor) -> float | Tensor:
    """Weight L2 of a fine-tuning phase: ``optim.finetune_weight_l2``, else ``training`` (the
    training phase's value).  The shrinkage that served the pruning can cost accuracy once the
    support is fixed (~0.1 points on a few thousand weights, RESULTS.md)."""
    value = opt.finetune_weight_l2
    return training if value is None else value


def finetune_base_lr(opt: OptimConfig) -> float:
    """First learning rate of a fine-tuning phase: ``optim.finetune_lr``, else ``lr·gamma``."""
    return opt.finetune_lr if opt.finetune_lr is not None else opt.lr * opt.gamma


def constraint_of(config: RunConfig, followed: FollowedRun | None = None
                  ) -> tuple[AccuracyConfig | None, FollowedRun | None]:
    """``(accuracy, follow)`` for a method's constructor: the ``accuracy`` section when the run
    is constrained (else None) and, when it names a reference run, that run: ``followed`` when
    given, else read from its folder (:func:`cvsparse.hyper.reference_run.followed_run_of`);
    None otherwise."""
    acc = config.accuracy
    if not acc.active:
        return None, None
    if followed is not None:
        return acc, followed
    return acc, followed_run_of(config)


def budget_met(model: nn.Module, input_shape: tuple[int, ...], compression: float | None,
               flops: float | None, names: Sequence[str] | None = None) -> bool:
    """Whether ``model``, as the report measures it, meets a compression budget: compression
    rate ``>= compression`` or effective FLOPs ``<= flops`` (a fraction of the dense FLOPs).
    False when both are None.  ``input_shape`` is one input's shape (e.g. ``(C, H, W)``);
    ``names`` the regularized weights (None: every Conv/Linear weight)."""
    if compression is None and flops is None:
        return False
    return _meets(metrics.summarize(metrics.layer_table(model, input_shape, names)),
                  compression, flops)


def warn_if_budget_missed(method: str, model: nn.Module, input_shape: tuple[int, ...],
                          compression: float | None, flops: float | None, epochs: int,
                          names: Sequence[str] | None = None) -> None:
    """At the end of ``method``'s pruning phase, after ``epochs`` epochs: warn, saying how far
    ``model`` got, if it does not meet the budget as :func:`budget_met` reads it; nothing when
    there is no budget.  The run goes on: the epochs left fine-tune the support as it is."""
    if compression is None and flops is None:
        return
    totals = metrics.summarize(metrics.layer_table(model, input_shape, names))
    if _meets(totals, compression, flops):
        return
    missed = []
    if compression is not None:
        missed.append(f"target_compression {compression:g} (reached "
                      f"{totals['compression_rate']:.1f}x)")
    if flops is not None:
        kept = totals["flops_effective"] / totals["flops_dense"]
        missed.append(f"target_flops {flops:g} (reached {kept:.4f} of the dense FLOPs)")
    warnings.warn(f"{method}: the pruning phase ended after epoch {epochs} without meeting "
                  f"{' or '.join(missed)}; the remaining epochs fine-tune the support as it is",
                  stacklevel=3)


def _meets(totals: dict[str, Any], compression: float | None, flops: float | None) -> bool:
    """Whether the totals of :func:`cvsparse.metrics.summarize` meet a budget (see
    :func:`budget_met`)."""
    return (
        (compression is not None and totals["compression_rate"] >= compression)
        or (flops is not None and totals["flops_effective"] <= flops * totals["flops_dense"])
    )


def _as_is(model: nn.Module) -> nn.Module:
    """The step module of one process: the model itself."""
    return model
