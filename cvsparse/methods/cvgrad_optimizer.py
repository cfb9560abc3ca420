"""Cross-validation-gradient compression for a training loop of your own, torch.optim style.

    opt = CVGradOptimizer(model, lr=0.1, settings=CVGradSettings(lambda1=1e-4))
    for x, y in train_loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()                       # fused proximal step: exact zeros
    for batch in val_batches:
        opt.hyper_step(batch)            # λ along the hypergradient of the validation loss

:class:`CVGradOptimizer` owns the fused proximal optimizer (:class:`~cvsparse.optim.ProxSGD`,
``.optimizer``: hand it to any ``torch.optim.lr_scheduler``) and λ
(:class:`~cvsparse.hyper.LambdaOptimizer`, ``.lambdas``).  ``cvsparse.compress(method="cvgrad")``
and the command line drive the same object, so a loop that calls it at the same points
reproduces their run bit for bit (docs/api.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvsparse.hyper import LambdaOptimizer, hypergradient
from cvsparse.hyper.objectives import validation_loss
from cvsparse.optim import ProxSGD
from cvsparse.params import (
    Selector,
    chosen_weights,
    other_parameters,
    regularized_parameters,
)

from .optimizer_facade import OptimizerFacade

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]
Reduce = Callable[[Sequence[Tensor]], list[Tensor]]


@dataclass
class CVGradSettings:
    """The λ of cross-validation-gradient compression and how they are learned (the
    ``cvgrad.*`` keys of the same names, docs/cli.md).

    ``lambda1``, ``lambda2``: initial strengths of ``λ1‖W‖₁ + λ2/2‖W‖²`` (one global pair, or one
    per regularized tensor with ``per_layer``).  ``estimator``/``estimator_opts``: the inverse
    curvature of the implicit-function hypergradient (docs/method.md §3).  ``hyper_*`` and
    ``log_space``: the λ optimizer.  ``lr_scaled_hyper``: scale the hypergradient by the weights'
    current learning rate over ``base_lr``.  ``val_objective``: ``"ce"`` or
    ``"calibrated_ce"``.  ``lambda_range``: λ1 and λ2 stay within this factor of their initial
    values (``[λ/f, λ·f]``; None: ``[0, ∞)``)."""

    lambda1: float = 1e-4
    lambda2: float = 1e-4
    per_layer: bool = False
    learn_lambda2: bool = True
    estimator: str = "identity"
    estimator_opts: dict[str, Any] = field(default_factory=dict)
    val_objective: str = "ce"
    hyper_lr: float = 0.5
    hyper_method: str = "adam"
    hyper_betas: tuple[float, float] = (0.9, 0.999)
    log_space: bool = True
    hyper_clip: float | None = 1.0
    lr_scaled_hyper: bool = False
    lambda_range: float | None = None

    @classmethod
    def from_section(cls, section: Any) -> CVGradSettings:
        """The settings of a ``cvgrad.*`` configuration section (a
        :class:`~cvsparse.config.CVGradConfig`), which holds these keys among its others."""
        values = {f.name: getattr(section, f.name) for f in dataclasses.fields(cls)}
        values["hyper_betas"] = tuple(float(b) for b in values["hyper_betas"])
        return cls(**values)


class CVGradOptimizer(OptimizerFacade):
    """Fused proximal SGD on ``loss + λ1‖W‖₁ + λ2/2‖W‖²`` with λ learned from validation
    batches.

    Args:
        model: the network; its Conv/Linear weights chosen by ``include``/``exclude``
            (:func:`cvsparse.params.select_weights`; default all) are regularized, every other
            trainable parameter is trained by plain SGD with momentum.
        lr: the weights' learning rate (``base_lr`` of ``lr_scaled_hyper``).
        momentum: the weights' momentum.
        settings: λ and their optimizer (default :class:`CVGradSettings`).
        names: the regularized weights by name, instead of ``include``/``exclude``.

    Attributes:
        optimizer: the :class:`~cvsparse.optim.ProxSGD` (group 0 regularized, group 1 the rest).
        lambdas: the :class:`~cvsparse.hyper.LambdaOptimizer` holding λ1, λ2 (float64, CPU).
        names, weights: the regularized tensors' names and parameters, in module order.
    """

    def __init__(self, model: nn.Module, *, lr: float, momentum: float = 0.9,
                 settings: CVGradSettings | None = None, include: Selector | None = None,
                 exclude: Selector | None = None, names: Sequence[str] | None = None) -> None:
        names = chosen_weights(model, include, exclude, names)
        self.model = model
        self.settings = s = settings if settings is not None else CVGradSettings()
        named = regularized_parameters(model, names)
        self.names = [n for n, _ in named]
        self.weights = [p for _, p in named]
        self.unregularized = [p for _, p in other_parameters(model, names) if p.requires_grad]
        self.base_lr = lr
        size = len(self.weights) if s.per_layer else 1
        self.lambdas = LambdaOptimizer(
            torch.full((size,), s.lambda1, dtype=torch.float64),
            torch.full((size,), s.lambda2, dtype=torch.float64),
            s.hyper_lr, method=s.hyper_method, betas=s.hyper_betas, log_space=s.log_space,
            clip=s.hyper_clip, **_bounds(s))
        self.optimizer = ProxSGD(
            [{"params": self.weights},
             {"params": self.unregularized, "lambda1": 0.0, "lambda2": 0.0}],
            lr=lr, momentum=momentum)
        self.push_lambdas()

    # ---- λ (zero_grad, step and param_groups come from OptimizerFacade) ---------------------

    def lambda_args(self) -> tuple[float | Tensor, float | Tensor]:
        """``(λ1, λ2)`` as the optimizer takes them: floats, or per-layer tensors."""
        if self.settings.per_layer:
            return self.lambdas.lambda1.clone(), self.lambdas.lambda2.clone()
        return float(self.lambdas.lambda1), float(self.lambdas.lambda2)

    def push_lambdas(self) -> None:
        """Hand the current λ to the regularized group (after changing ``lambdas``)."""
        group = self.optimizer.param_groups[0]
        group["lambda1"], group["lambda2"] = self.lambda_args()

    def hypergradient(self, val_batch: Batch, train_batch: Callable[[], Batch] | None = None,
                      loss_fn: LossFn | None = None, *, reduce: Reduce | None = None,
                      diagnostics: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
        """``(dcv/dλ1, dcv/dλ2)`` on ``val_batch`` (float64 CPU vectors, one entry per λ),
        the model in eval mode (BatchNorm on running statistics) and left in that mode.

        ``train_batch`` returns a training batch for curvature estimators that need one (not
        ``identity``); ``loss_fn`` is the training loss (cross-entropy by default, and the
        validation loss too under ``val_objective="ce"``); ``reduce`` averages over the ranks
        of a data-parallel run.  ``learn_lambda2=False`` zeroes dcv/dλ2; ``lr_scaled_hyper``
        multiplies both by ``lr / base_lr``."""
        s = self.settings
        device = self.weights[0].device
        xv, yv = (t.to(device) for t in val_batch)
        train_loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        self.model.eval()

        def val_loss() -> Tensor:
            if s.val_objective == "ce" and loss_fn is not None:
                return loss_fn(self.model(xv), yv)
            return validation_loss(self.model(xv), yv, s.val_objective)

        def train_loss() -> Tensor:
            if train_batch is None:
                raise ValueError(f"the {s.estimator!r} estimator needs training batches: pass "
                                 "train_batch")
            xt, yt = (t.to(device) for t in train_batch())
            return train_loss_fn(self.model(xt), yt)

        lam1, lam2 = self.lambda_args()
        d1, d2 = hypergradient(self.weights, lam1, lam2, train_loss, val_loss,
                               estimator=s.estimator, unregularized=self.unregularized,
                               diagnostics=diagnostics, reduce=reduce, **s.estimator_opts)
        d1 = torch.as_tensor(d1, dtype=torch.float64).reshape(-1).cpu()
        d2 = torch.as_tensor(d2, dtype=torch.float64).reshape(-1).cpu()
        if not s.learn_lambda2:
            d2 = torch.zeros_like(d2)
        if s.lr_scaled_hyper:   # one unrolled step: dw/dλ1 = −η·sign(w), dw/dλ2 = −η·w
            scale = self.lr_scale()
            d1, d2 = d1 * scale, d2 * scale
        return d1, d2

    def lr_scale(self) -> float:
        """The regularized group's learning rate over ``base_lr``."""
        return self.optimizer.param_groups[0]["lr"] / self.base_lr

    def update_lambdas(self, d1: Tensor, d2: Tensor) -> None:
        """One step of the λ optimizer on a hypergradient, handed to the weights' optimizer."""
        self.lambdas.step(d1, d2)
        self.push_lambdas()

    def hyper_step(self, val_batch: Batch, train_batch: Callable[[], Batch] | None = None,
                   loss_fn: LossFn | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`hypergradient` on ``val_batch``, then :meth:`update_lambdas`; the model's
        train/eval mode is restored.  Returns the hypergradient."""
        training = self.model.training
        try:
            d1, d2 = self.hypergradient(val_batch, train_batch, loss_fn)
        finally:
            self.model.train(training)
        self.update_lambdas(d1, d2)
        return d1, d2

    # ---- state --------------------------------------------------------------------------------

    @torch.no_grad()
    def compression(self) -> float:
        """Elements over nonzeros of the regularized tensors (docs/method.md §7; inf when all
        are zero), from the nonzeros the latest fused step or prune counted
        (``ProxSGD.last_nonzero``); counted here only before the first of them."""
        counts = self.optimizer.last_nonzero[0]
        nonzero = (int(counts.sum()) if counts is not None
                   else sum(int(torch.count_nonzero(p)) for p in self.weights))
        total = sum(p.numel() for p in self.weights)
        return total / nonzero if nonzero else float("inf")

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "lambdas": self.lambdas.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lambdas.load_state_dict(state["lambdas"])
        self.push_lambdas()


def _bounds(settings: CVGradSettings) -> dict[str, tuple[float, float | None]]:
    """The λ optimizer's bounds for ``settings.lambda_range`` (none without it)."""
    f = settings.lambda_range
    if f is None:
        return {}
    return {"lambda1_bounds": (settings.lambda1 / f, settings.lambda1 * f),
            "lambda2_bounds": (settings.lambda2 / f, settings.lambda2 * f)}
