"""Whole-run checks of a configuration tree (:class:`~cvsparse.config.RunConfig`): each
section's own ``validate(fail)``, then what needs the lists of the layers that own the names (the
methods, precisions, model and dataset sources) or spans sections (the accuracy constraint and
its reference run, the averaging epochs, the split).  A bad tree is refused here, before any
data is loaded or any training starts.
"""

from __future__ import annotations

from cvsparse.config import Fail, RunConfig, check_at_least_one
from cvsparse.hyper.reference_run import FollowedRun, followed_run_of
from cvsparse.imagefolder import is_image_folder
from cvsparse.methods import METHOD_CLASSES
from cvsparse.precision import PRECISIONS
from cvsparse.sources import check_dataset, check_model


def validate(config: RunConfig, *, n_train: int | None = None, named_sources: bool = True,
             followed: FollowedRun | None = None) -> None:
    """Raise ``ValueError`` naming the first bad setting (``n_train``: training-set size).

    Each section's ``validate`` checks its own keys; this adds the top-level keys and what
    spans sections (the accuracy constraint's method, reference run and phases, the SWA
    epochs, the split).  ``named_sources=False`` leaves ``model`` and ``data.dataset``
    unchecked: the Python API (``cvsparse.compress``) takes a module and loaders rather than
    names of the registries.  ``followed``: the reference run as the caller read it or
    stored it (:class:`~cvsparse.hyper.reference_run.FollowedRun`); None reads its folder."""

    def fail(message: str) -> None:
        raise ValueError(f"bad config: {message}")

    if named_sources:
        _check_sources(config, fail)
    if config.method not in METHOD_CLASSES:
        fail(f"unknown method {config.method!r}; choose one of {', '.join(METHOD_CLASSES)}")
    if config.precision not in PRECISIONS:
        fail(f"unknown precision {config.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if not isinstance(config.channels_last, bool):
        fail(f"channels_last must be true or false, got {config.channels_last!r}")
    check_at_least_one({"threads": config.threads}, fail)
    if not 0 <= config.seed < 2**32:
        fail(f"seed must be an integer in [0, 2**32), got {config.seed}")
    for section in (config.data, config.cvgrad, config.magnitude, config.optim,
                    config.autoprune):   # optim.lr and autoprune.aux_lr / weight_l2 unset are
                                         # a config's usual state before resolve_defaults
        section.validate(fail)
    _check_accuracy(config, fail, followed)
    swa, finetune_epochs = config.optim.swa_epochs, config.finetune_epochs
    if isinstance(swa, bool) or not isinstance(swa, int) or not 0 <= swa <= finetune_epochs:
        fail(f"optim.swa_epochs must be an int in [0, {finetune_epochs}] (the {config.method} "
             f"fine-tuning epochs), got {swa!r}")
    val = config.data.val_size
    if n_train is not None and val is not None and val >= n_train:
        fail(f"validation split of {val} images is not smaller than the training set "
             f"({n_train} images)")


def _check_sources(config: RunConfig, fail: Fail) -> None:
    """The model and dataset names (zoo, ``torchvision:``, ``module:factory``; built-in or
    ``imagefolder:``, cvsparse.sources), ``num_classes`` and ``data.image_size``."""
    try:
        check_model(config.model)
        check_dataset(config.data.dataset)
    except ValueError as exc:
        fail(str(exc))
    for name, value in {"num_classes": config.num_classes,
                        "data.image_size": config.data.image_size}.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            fail(f"{name} must be an integer >= 1, got {value!r}")
    if config.data.image_size is not None and not is_image_folder(config.data.dataset):
        fail(f"data.image_size applies to imagefolder datasets only, not "
             f"{config.data.dataset!r} (whose images keep their size)")


def _check_accuracy(config: RunConfig, fail: Fail,
                    followed: FollowedRun | None) -> None:
    """The accuracy constraint: its section's own checks, a method that takes it, a reference
    run that can be read (``followed``, or its folder) and judges this run, no size set by
    hand beside it, and room for its phases."""
    acc = config.accuracy
    constrained = [name for name, cls in METHOD_CLASSES.items() if cls.takes_accuracy_constraint]
    if acc.active and config.method not in constrained:
        fail(f"an accuracy constraint (max_accuracy_drop / max_relative_drop) applies to "
             f"{', '.join(constrained)}, not {config.method!r}")
    acc.validate(fail)
    if not acc.active:
        return
    if followed is None:
        followed = followed_run_of(config)   # ValueError naming the problem
    if followed is not None:
        followed.check(config)   # ValueError naming the problem
    curve = followed.curve if followed is not None else None
    for key, value in (("accuracy.drive_lr", acc.drive_lr),
                       ("optim.finetune_lr", config.optim.finetune_lr)):
        if curve is not None and value is not None:
            fail(f"{key} does not apply when the run follows its reference run's learning "
                 "rates (accuracy.reference with a matching metrics.csv): drop it")
    section = getattr(config, config.method)
    hand_set = [k for k in ("target_compression", "target_flops", "min_compression")
                if getattr(section, k, None) is not None]
    if hand_set:
        fail(f"{config.method}.{hand_set[0]} sets the size by hand; an accuracy constraint "
             "chooses it (drop one of the two)")
    if config.method == "autoprune" and config.autoprune.granularity != "weight":
        fail("an accuracy constraint on autoprune needs autoprune.granularity 'weight' (its "
             "magnitude cut closes single gates)")
    total = config.total_epochs
    dense_end, drive_end = acc.phases(total)
    if curve is None and drive_end - dense_end < 1:
        fail(f"{total} epochs leave no room for an accuracy-constrained run: it needs a dense "
             f"phase of {dense_end}, at least one compression epoch and "
             f"{total - drive_end} fine-tuning epochs (give more epochs)")
