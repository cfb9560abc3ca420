"""The one configuration tree of a run: dataclasses, loaded from YAML, overridden by CLI flags.

The resolved tree is stored in every report and checkpoint (``to_dict``).  Each section checks
its own keys (``validate(fail)``); :func:`cvsparse.validation.validate` checks a whole tree
before any data is loaded or any training starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from cvsparse.hyper.reference_run import FollowedRun

#: A section's own checks: ``fail(message)`` raises the ``ValueError`` naming the bad setting.
Fail = Callable[[str], None]


@dataclass
class DataConfig:
    """Where the data comes from and how it is split and batched."""

    dataset: str = "mnist"          # a built-in name or imagefolder:<path> (cvsparse.sources)
    image_size: int | None = None   # imagefolder: side of the square images (pixels);
                                    # None = 224 (resolve_defaults)
    root: str | None = None          # None: $CVSPARSE_DATA, ../shared/data, ~/.cache/torchvision
    download: bool = True            # torchvision downloads a set found nowhere (docs/data.md)
    val_size: int | None = None      # images held out of training; None = per-dataset default
    split_seed: int = 0
    batch_size: int = 64
    val_batch_size: int = 1000
    augment: bool = True             # pad-4 crop + flip on CIFAR training batches; false also
                                     # turns mnist_shift off
    mnist_shift: int = 0             # MNIST training batches: random shift by up to this many
                                     # pixels each way (zero fill, no flip); 0 = none
    augment_phase: str = "all"       # "all": augment every training batch; "finetune": only
                                     # those of the fine-tuning phase (after the cut / freeze)

    def validate(self, fail: Fail) -> None:
        """Call ``fail`` on the first bad ``data.*`` setting (``image_size`` and the dataset
        name are checked with the model's name, :mod:`cvsparse.validation`)."""
        from cvsparse.data import AUGMENT_PHASES, IMAGE_SHAPES

        _check_finite(self, "data.", fail)
        if not 0 <= self.split_seed < 2**32:
            fail(f"data.split_seed must be an integer in [0, 2**32), got {self.split_seed}")
        if self.batch_size < 1 or self.val_batch_size < 1:
            fail("batch sizes must be >= 1")
        shift, max_shift = self.mnist_shift, IMAGE_SHAPES["mnist"][1] // 2 - 1
        if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift <= max_shift:
            fail(f"data.mnist_shift must be an int in [0, {max_shift}] (pixels), got {shift!r}")
        if shift and self.dataset != "mnist":
            fail(f"data.mnist_shift applies to MNIST only, not {self.dataset!r} "
                 "(CIFAR's augmentation is data.augment)")
        if self.augment_phase not in AUGMENT_PHASES:
            fail(f"data.augment_phase must be one of {', '.join(AUGMENT_PHASES)}, "
                 f"got {self.augment_phase!r}")
        if self.val_size is not None and self.val_size < 1:
            fail(f"data.val_size must be >= 1, got {self.val_size}")


@dataclass
class OptimConfig:
    """Weight optimizer (ProxSGD) and its schedule within one outer iteration."""

    lr: float | None = None          # None = the model's default (DEFAULT_LR: 0.01 for
                                     # lenet5, which diverges at 0.1; 0.1 for the others)
    momentum: float = 0.9
    epochs: int = 4                  # inner epochs per outer iteration
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of epochs
    gamma: float = 0.1
    finetune_lr: float | None = None  # first lr of a fine-tuning phase (cvgrad, autoprune);
                                      # None = lr·gamma
    finetune_weight_l2: float | None = None  # weight L2 of a fine-tuning phase (every method);
                                      # None = the training phase's (cvgrad: the learned λ2)
    swa_epochs: int = 0              # last epochs of the fine-tuning phase at the constant
                                     # swa_lr, with the weights averaged (SWA); 0 = none
    swa_lr: float | None = None      # None = the fine-tuning phase's first lr
    max_steps_per_epoch: int | None = None   # cap for smoke runs; None = full epochs
    max_skipped_steps: int = 10      # this many training (or hyper) steps skipped in a row
                                     # (non-finite or exploding loss, gradient,
                                     # hypergradient) stop the run (cvsparse.faults)

    def validate(self, fail: Fail) -> None:
        """Call ``fail`` on the first bad ``optim.*`` setting (``swa_epochs`` depends on the
        method's fine-tuning epochs: checked by :func:`validate`)."""
        _check_finite(self, "optim.", fail)
        check_at_least_one({"optim.max_steps_per_epoch": self.max_steps_per_epoch,
                             "optim.max_skipped_steps": self.max_skipped_steps}, fail)
        if not 0 < self.gamma <= 1:
            fail(f"optim.gamma must be in (0, 1], got {self.gamma}")
        if not all(0 <= m <= 1 for m in self.milestones):
            fail(f"optim.milestones are fractions of the epochs in [0, 1], got {self.milestones}")
        if self.epochs < 1:
            fail(f"optim.epochs must be >= 1, got {self.epochs}")
        if self.lr is None:
            fail("optim.lr is unset; resolve_defaults gives it the model's default")
        if not self.lr > 0 or self.momentum < 0:
            fail("optim.lr must be > 0 and optim.momentum >= 0")
        if self.finetune_lr is not None and not self.finetune_lr > 0:
            fail(f"optim.finetune_lr must be > 0, got {self.finetune_lr}")
        ft_l2 = self.finetune_weight_l2
        if ft_l2 is not None and not 0 <= ft_l2 < float("inf"):
            fail(f"optim.finetune_weight_l2 must be a finite number >= 0, got {ft_l2}")
        if self.swa_lr is not None and not 0 < self.swa_lr < float("inf"):
            fail(f"optim.swa_lr must be a finite number > 0, got {self.swa_lr}")


@dataclass
class CVGradConfig:
    """Cross-validation-gradient compression (docs/method.md §1–5)."""

    outer: int = 3                   # outer iterations T
    lambda1: float = 1e-4            # initial guesses; learned from here on
    lambda2: float = 1e-4
    per_layer: bool = False          # one (λ1, λ2) per regularized tensor, not one global pair
    learn_lambda2: bool = True
    estimator: str = "identity"
    estimator_opts: dict[str, Any] = field(default_factory=dict)
    val_objective: str = "ce"        # "ce" | "calibrated_ce" (best temperature), docs/method.md §1
    hyper_lr: float = 0.5            # step size of the λ optimizer
    hyper_method: str = "adam"       # "adam" | "sgd"
    hyper_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam's (β1, β2)
    log_space: bool = True           # optimize log λ (keeps λ > 0)
    hyper_clip: float | None = 1.0
    hyper_batches: int | None = None  # validation batches per hyper pass; None = the whole split
    online_every: int = 0            # > 0: also a hyper step every k steps (T1–T2, method.md §5.2)
    lr_scaled_hyper: bool = False    # hypergradient × (weight lr / optim.lr): see CVGradMethod
    lambda_range: float | None = None  # λ1, λ2 stay within this factor of their initial values;
                                     # None = unbounded (in a constrained run: 10)
    hyper_warmup_epochs: int = 0     # no λ step before this global epoch (λ at its initial guess)
    threshold: float = 1e-4          # τ of kernel 3
    threshold_start_epoch: int = 1   # global epoch from which thresholding runs
    release_masks: bool = False      # recoverable pruning: see CVGradMethod.release_masks
    release_batches: int = 100       # training batches averaged for that gradient test
    reinit: bool = False             # strict form: restart W from its init every outer iteration
    finetune_epochs: int = 0         # then epochs without L1 on the pruned support (λ fixed)
    target_compression: float | None = None  # budget: fine-tune from the epoch after it is met
    target_flops: float | None = None        # … or once FLOPs ≤ this fraction of dense
    target_check_every: int = 0      # also check the budget every k training steps (0: epoch ends)
    min_compression: float | None = None  # floor: λ1 is held up until compression reaches this
    min_compression_epochs: int | None = None  # … ramped over these epochs (None: L1 phase)
    floor_gain: float = 0.1          # dual step of the floor's multiplier (hyper/compression_floor)

    def validate(self, fail: Fail) -> None:
        """Call ``fail`` on the first bad ``cvgrad.*`` setting (estimators, objectives and λ
        optimizers are those of cvsparse.hyper)."""
        from cvsparse.hyper.estimators import ESTIMATORS
        from cvsparse.hyper.lambda_optimizer import METHODS as HYPER_METHODS
        from cvsparse.hyper.objectives import OBJECTIVES

        _check_finite(self, "cvgrad.", fail)
        check_at_least_one({"cvgrad.hyper_batches": self.hyper_batches}, fail)
        if self.threshold_start_epoch < 0:
            fail(f"cvgrad.threshold_start_epoch must be >= 0, got {self.threshold_start_epoch}")
        if self.outer < 1:
            fail(f"cvgrad.outer must be >= 1, got {self.outer}")
        for name in ("lambda1", "lambda2", "threshold", "hyper_lr"):
            value = getattr(self, name)
            if not value >= 0:
                fail(f"cvgrad.{name} must be >= 0, got {value}")
        if self.log_space and (self.lambda1 <= 0 or (self.learn_lambda2 and self.lambda2 <= 0)):
            fail("cvgrad.log_space needs initial lambda1/lambda2 > 0")
        if self.estimator not in ESTIMATORS:
            fail(f"unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.val_objective not in OBJECTIVES:
            fail(f"unknown cvgrad.val_objective {self.val_objective!r}; choose one of "
                 f"{', '.join(OBJECTIVES)}")
        if self.hyper_method not in HYPER_METHODS:
            fail(f"cvgrad.hyper_method must be {_either(HYPER_METHODS)}, "
                 f"got {self.hyper_method!r}")
        if self.online_every < 0 or self.finetune_epochs < 0 or self.hyper_warmup_epochs < 0:
            fail("cvgrad.online_every, finetune_epochs and hyper_warmup_epochs must be >= 0")
        if self.release_batches < 1:
            fail(f"cvgrad.release_batches must be >= 1, got {self.release_batches}")
        if self.lambda_range is not None and not self.lambda_range > 1:
            fail(f"cvgrad.lambda_range must be a factor > 1, got {self.lambda_range}")
        _check_budget("cvgrad", self.target_compression, self.target_flops,
                      self.target_check_every, fail)
        _check_floor(self, fail)
        betas = self.hyper_betas
        if not (len(betas) == 2
                and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            fail(f"cvgrad.hyper_betas must be two numbers in [0, 1), got {betas!r}")


@dataclass
class AutoPruneConfig:
    """AutoPrune (docs/method.md §6)."""

    granularity: str = "weight"
    ste: str = "leaky_relu"
    slope: float = 0.01              # LeakyReLU STE slope for closed gates (m ≤ 0)
    update: str = "proposed"
    aux_lr: float | None = None      # None = 0.1, or 0 under an accuracy constraint, whose
                                     # cuts alone close gates (resolve_defaults)
    aux_l1: float = 2e-3
    aux_l1_ramp_epochs: int = 0      # aux L1 grows linearly to aux_l1 over these epochs (0: none)
    weight_l2: float | None = None   # None = 5e-4, or the weight L2 of the dense run a
                                     # constrained run follows (resolve_defaults)
    target_compression: float | None = None
    target_flops: float | None = None
    target_check_every: int = 0      # also check the target every k gate steps (0: epoch ends)
    finetune_epochs: int = 2
    pretrained: str | None = None    # a run folder, its checkpoint.pt, or a state_dict file
    skip_layers: list[str] = field(default_factory=list)  # Conv2d/Linear names left ungated

    def validate(self, fail: Fail) -> None:
        """Call ``fail`` on the first bad ``autoprune.*`` setting (granularities, update rules
        and STEs are those of cvsparse.nn.gated and cvsparse.ops)."""
        from cvsparse.nn.gated import GRANULARITIES, UPDATES
        from cvsparse.ops import STE_CODES

        _check_finite(self, "autoprune.", fail)
        if self.granularity not in GRANULARITIES:
            fail(f"autoprune.granularity must be {_either(GRANULARITIES)}, "
                 f"got {self.granularity!r}")
        if self.ste not in STE_CODES:
            fail(f"autoprune.ste must be {_either(STE_CODES, quoted=False)}, got {self.ste!r}")
        if self.update not in UPDATES:
            fail(f"autoprune.update must be {_either(UPDATES)}, got {self.update!r}")
        _check_budget("autoprune", self.target_compression, self.target_flops,
                      self.target_check_every, fail)
        if self.finetune_epochs < 0:
            fail(f"autoprune.finetune_epochs must be >= 0, got {self.finetune_epochs}")
        if self.aux_l1_ramp_epochs < 0:
            fail(f"autoprune.aux_l1_ramp_epochs must be >= 0, got {self.aux_l1_ramp_epochs}")
        for name in ("aux_lr", "aux_l1", "weight_l2", "slope"):
            value = getattr(self, name)
            if value is None:
                fail(f"autoprune.{name} is unset; resolve_defaults gives it its default")
            if not value >= 0:
                fail(f"autoprune.{name} must be >= 0, got {value}")


@dataclass
class MagnitudeConfig:
    """Baseline: global magnitude pruning (``torch.nn.utils.prune``) after dense training."""

    target_compression: float = 10.0
    weight_l2: float = 5e-4
    finetune_epochs: int = 2

    def validate(self, fail: Fail) -> None:
        """Call ``fail`` on the first bad ``magnitude.*`` setting."""
        _check_finite(self, "magnitude.", fail)
        if (not self.target_compression >= 1 or self.finetune_epochs < 0
                or not self.weight_l2 >= 0):
            fail("magnitude needs target_compression >= 1, finetune_epochs >= 0, weight_l2 >= 0")


MAX_CURVE_POINTS = 100   # validation points per epoch a run may measure


@dataclass
class AccuracyConfig:
    """Compression bounded by the accuracy a user can give up (docs/method.md §8): cvgrad
    compresses as far as it can while the validation accuracy stays within the allowed drop
    of a reference."""

    max_accuracy_drop: float | None = None   # D: allowed drop, accuracy points (0.3 = 0.3 pt)
    max_relative_drop: float | None = None   # R: allowed drop, percent of the reference
    reference: str | None = None     # a finished dense run's folder: its report's val_acc
    reference_accuracy: float | None = None  # or the reference validation accuracy, percent
    dense_fraction: float = 0.2      # without either: a dense phase of this fraction of the
                                     # epochs measures it
    finetune_fraction: float = 0.25  # the last fraction of the epochs fine-tunes the support
    check_ratio: float = 1.25        # a check each time the drive's level has grown by this
                                     # factor since the last one
    probe_fraction: float = 0.05     # a check fine-tunes a copy of the network on its support
                                     # for this fraction of an epoch's weight steps, then
                                     # evaluates it
    probe_lr: float | None = None    # the probe's learning rate; None = optim.lr · optim.gamma
    patience: int = 6                # failed checks in a row that end the compression drive
    max_compression: float = 1000.0  # the drive's level rises geometrically to this rate
    drive_lr: float | None = None    # learning rate of the drive; None = optim.lr
    curve_points: int = 0            # validation measurements inside each epoch (curve.csv),
                                     # for constrained runs that follow this run

    def validate(self, fail: Fail) -> None:
        """Call ``fail`` on the first bad ``accuracy.*`` setting; the reference run, the
        method and the room for the phases are checked by :func:`validate`."""
        _check_finite(self, "accuracy.", fail)
        if isinstance(self.curve_points, bool) or not isinstance(self.curve_points, int) \
                or not 0 <= self.curve_points <= MAX_CURVE_POINTS:
            fail(f"accuracy.curve_points is a count of validation points per epoch, in "
                 f"[0, {MAX_CURVE_POINTS}], got {self.curve_points!r}")
        if not self.active:
            given = [k for k in ("reference", "reference_accuracy")
                     if getattr(self, k) is not None]
            if given:
                fail(f"accuracy.{given[0]} needs accuracy.max_accuracy_drop or "
                     "accuracy.max_relative_drop")
            return
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop < 100:
            fail("accuracy.max_accuracy_drop is in accuracy points, in [0, 100), got "
                 f"{self.max_accuracy_drop}")
        if self.max_relative_drop is not None and not 0 <= self.max_relative_drop < 100:
            fail("accuracy.max_relative_drop is a percentage of the reference, in [0, 100), "
                 f"got {self.max_relative_drop}")
        if self.reference is not None and self.reference_accuracy is not None:
            fail("give accuracy.reference (a run folder) or accuracy.reference_accuracy, "
                 "not both")
        if self.reference_accuracy is not None and not 1 < self.reference_accuracy <= 100:
            fail("accuracy.reference_accuracy is a validation accuracy in percent, in (1, 100], "
                 f"got {self.reference_accuracy}")
        for name in ("dense_fraction", "finetune_fraction"):
            if not 0 <= getattr(self, name) < 1:
                fail(f"accuracy.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 1 < self.check_ratio < float("inf") or self.patience < 1:
            fail("accuracy.check_ratio must be a finite number > 1 and accuracy.patience >= 1")
        for name in ("drive_lr", "probe_lr"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                fail(f"accuracy.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.probe_fraction <= 1:
            fail(f"accuracy.probe_fraction must be in (0, 1], got {self.probe_fraction}")
        if not 1 < self.max_compression < float("inf"):
            fail(f"accuracy.max_compression must be a finite rate > 1, got "
                 f"{self.max_compression}")

    @property
    def active(self) -> bool:
        """Whether the run is constrained (an allowed drop is given)."""
        return self.max_accuracy_drop is not None or self.max_relative_drop is not None

    def phases(self, total_epochs: int) -> tuple[int, int]:
        """``(dense_end, drive_end)``: the dense phase is epochs ``[0, dense_end)`` (empty with
        a given reference), the compression drive ``[dense_end, drive_end)``, fine-tuning the
        rest (at least one epoch)."""
        given = self.reference is not None or self.reference_accuracy is not None
        dense = 0 if given else max(1, round(self.dense_fraction * total_epochs))
        finetune = max(1, round(self.finetune_fraction * total_epochs))
        return dense, total_epochs - finetune


@dataclass
class RunConfig:
    """A whole run."""

    model: str = "lenet300"          # a zoo name, torchvision:<name> or package.module:factory
    num_classes: int | None = None   # model outputs; None = the dataset's classes (the
                                     # Trainer stores the resolved count)
    method: str = "cvgrad"
    seed: int = 0
    device: str = "auto"             # "auto" picks cuda when available
    threads: int | None = None       # torch.set_num_threads; None leaves torch's default
    precision: str = "fp32"          # "fp32" | "bf16" | "fp16": autocast of the training
                                     # steps and evaluation (cvsparse.precision)
    channels_last: bool = False      # model and 4-D inputs in torch.channels_last
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cvgrad: CVGradConfig = field(default_factory=CVGradConfig)
    autoprune: AutoPruneConfig = field(default_factory=AutoPruneConfig)
    magnitude: MagnitudeConfig = field(default_factory=MagnitudeConfig)
    accuracy: AccuracyConfig = field(default_factory=AccuracyConfig)

    @property
    def finetune_epochs(self) -> int:
        """Fine-tuning epochs the method's schedule guarantees at the end of the run (AutoPrune
        and cvgrad fine-tune longer when a budget ends their pruning phase early)."""
        return getattr(self, self.method).finetune_epochs

    @property
    def total_epochs(self) -> int:
        """Epochs of the whole run."""
        if self.method == "cvgrad":
            return self.cvgrad.outer * self.optim.epochs + self.finetune_epochs
        return self.optim.epochs + self.finetune_epochs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_dict(values: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """``base`` (defaults if None) updated by a nested dict; unknown keys raise ``ValueError``."""
    config = base if base is not None else RunConfig()
    _update(config, values, "")
    return config


def load_yaml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """A config read from a YAML file of the same nesting as :class:`RunConfig`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path}: {_yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {path} cannot be read: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return from_dict(values, base)


def _update(obj: Any, values: dict[str, Any], prefix: str) -> None:
    known = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown config key {prefix}{key!r}; known: {', '.join(known)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key {prefix}{key} must be a mapping")
            _update(current, value, f"{prefix}{key}.")
        else:
            setattr(obj, key, _coerced(f"{prefix}{key}", str(known[key].type), value))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: what the YAML parser found wrong, and where (line and column, from 1)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"YAML syntax error{where}: {problem}"


def _coerced(name: str, annotation: str, value: Any) -> Any:
    """``value`` for the key ``name`` annotated ``annotation`` (``"int"``, ``"float | None"``,
    ``"list[float]"``...), or ValueError naming the key.  Booleans come only from YAML booleans
    (``"false"`` is a string, not false), integers only from integers (or a quoted integer
    such as ``'4'``; never ``1.5``, ``1e3`` or ``true``), numbers from numbers or numeric
    strings (YAML 1.1 reads ``1e-3``, without a dot, as a string), strings from strings, lists
    from lists of their element type."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ValueError(f"config key {name} must be set (got null)")
    return _as_kind(name, kinds[0], value)


def _as_kind(name: str, kind: str, value: Any) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise _type_error(name, "true or false", value)
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]+", value.strip()):
            return int(value)   # a quoted integer ('4'), never 1.5, 1e3 or true
        raise _type_error(name, "an integer", value)
    if kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(name, "a number", value)
    if kind == "str":
        if isinstance(value, str):
            return value
        raise _type_error(name, "a string", value)
    if kind.startswith("list["):
        if not isinstance(value, list):
            raise _type_error(name, "a list", value)
        item = kind[len("list["):-1]
        return [_as_kind(f"{name}[{i}]", item, v) for i, v in enumerate(value)]
    if kind.startswith("dict"):
        if not isinstance(value, dict):
            raise _type_error(name, "a mapping", value)
    return value


def _type_error(name: str, expected: str, value: Any) -> ValueError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ValueError(f"config key {name} must be {expected}, got {shown} "
                      f"({type(value).__name__})")


#: ``optim.lr`` of a model when the configuration leaves it unset (None); 0.1 otherwise.
DEFAULT_LR = {"lenet5": 0.01}


#: ``autoprune.aux_lr`` and ``autoprune.weight_l2`` of a run without an accuracy constraint.
AUTOPRUNE_AUX_LR, AUTOPRUNE_WEIGHT_L2 = 0.1, 5e-4


def resolve_defaults(config: RunConfig, followed: FollowedRun | None = None) -> RunConfig:
    """Fill the settings whose default depends on others, in place; returns ``config``:
    ``optim.lr`` on the model, ``data.image_size`` on the dataset, and AutoPrune's
    ``aux_lr`` and ``weight_l2`` on the accuracy constraint (docs/method.md §8): under one
    the gates take no steps (0), and a run that follows a dense run's schedule takes that
    run's weight L2 as well as its learning rates.  ``followed``: the reference run as the
    caller read it (:func:`~cvsparse.hyper.reference_run.followed_run_of`); None reads it
    when it is needed."""
    if config.optim.lr is None:
        config.optim.lr = DEFAULT_LR.get(config.model, 0.1)
    _resolve_autoprune(config, followed)
    if config.data.image_size is None and config.data.dataset.startswith("imagefolder:"):
        from cvsparse.imagefolder import DEFAULT_IMAGE_SIZE

        config.data.image_size = DEFAULT_IMAGE_SIZE
    return config


def _resolve_autoprune(config: RunConfig, followed: FollowedRun | None) -> None:
    """AutoPrune's unset ``aux_lr`` and ``weight_l2`` (see :func:`resolve_defaults`).  A
    reference that cannot be read leaves the plain defaults: :func:`validate` names it."""
    constrained = config.method == "autoprune" and config.accuracy.active
    if constrained and followed is None and config.autoprune.weight_l2 is None:
        from cvsparse.hyper.reference_run import followed_run_of

        try:
            followed = followed_run_of(config)
        except ValueError:
            followed = None
    curve = followed.curve if followed is not None else None
    config.autoprune = resolve_autoprune(config.autoprune, constrained,
                                         curve.weight_l2 if curve is not None else None)


def resolve_autoprune(section: AutoPruneConfig, constrained: bool,
                      followed_weight_l2: float | None = None) -> AutoPruneConfig:
    """``section`` with its unset ``aux_lr`` and ``weight_l2`` given their defaults (a copy;
    ``section`` itself when both are set): ``aux_lr`` 0.1, or 0 when the run is
    ``constrained`` (an accuracy constraint's cuts alone close gates); ``weight_l2`` 5e-4, or
    ``followed_weight_l2``, the constant weight L2 of the dense run a constrained run follows."""
    if section.aux_lr is not None and section.weight_l2 is not None:
        return section
    aux_lr = section.aux_lr
    if aux_lr is None:
        aux_lr = 0.0 if constrained else AUTOPRUNE_AUX_LR
    weight_l2 = section.weight_l2
    if weight_l2 is None:
        weight_l2 = followed_weight_l2 if constrained and followed_weight_l2 is not None \
            else AUTOPRUNE_WEIGHT_L2
    return dataclasses.replace(section, aux_lr=aux_lr, weight_l2=weight_l2)


def _check_finite(obj: Any, prefix: str, fail: Callable[[str], None]) -> None:
    """Every float (and every number of a list) in the tree is finite: NaN and inf are
    accepted by YAML and by argparse's ``float`` but mean nothing as a setting."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.", fail)
            continue
        numbers = value if isinstance(value, list) else [value]
        for v in numbers:
            if isinstance(v, float) and not math.isfinite(v):
                fail(f"{prefix}{f.name} must be a finite number, got {value}")


def check_at_least_one(values: dict[str, int | None], fail: Fail) -> None:
    """Each optional count of ``values`` (key → value, None = unset) is at least 1."""
    for name, value in values.items():
        if value is not None and value < 1:
            fail(f"{name} must be an integer >= 1, got {value}")


def _either(names: Iterable[str], quoted: bool = True) -> str:
    """The allowed values of a setting in a message: ``'a', 'b' or 'c'`` (unquoted with
    ``quoted=False``)."""
    shown = [repr(n) if quoted else n for n in names]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def _check_budget(section: str, compression: float | None, flops: float | None,
                  check_every: int, fail: Callable[[str], None]) -> None:
    """The compression budget keys shared by cvgrad and AutoPrune."""
    if compression is not None and not compression >= 1:
        fail(f"{section}.target_compression must be >= 1, got {compression}")
    if flops is not None and not 0 < flops <= 1:
        fail(f"{section}.target_flops is a fraction of dense FLOPs in (0, 1], got {flops}")
    if check_every < 0:
        fail(f"{section}.target_check_every must be >= 0, got {check_every}")


def _check_floor(cv: CVGradConfig, fail: Callable[[str], None]) -> None:
    """cvgrad's compression floor: a rate >= 1, not above a compression budget, an integer
    ramp >= 1 and a positive gain."""
    floor, ramp = cv.min_compression, cv.min_compression_epochs
    if floor is None:
        if ramp is not None:
            fail("cvgrad.min_compression_epochs needs cvgrad.min_compression")
        return
    if not 1 <= floor < float("inf"):
        fail(f"cvgrad.min_compression must be a finite rate >= 1, got {floor}")
    if cv.target_compression is not None and cv.target_compression < floor:
        fail(f"cvgrad.target_compression ({cv.target_compression}) is below "
             f"cvgrad.min_compression ({floor}): the budget would end pruning under the floor")
    if ramp is not None and (isinstance(ramp, bool) or not isinstance(ramp, int) or ramp < 1):
        fail(f"cvgrad.min_compression_epochs must be an int >= 1, got {ramp!r}")
    if not 0 < cv.floor_gain < float("inf"):
        fail(f"cvgrad.floor_gain must be a finite number > 0, got {cv.floor_gain}")
