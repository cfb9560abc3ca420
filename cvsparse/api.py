"""The Python API: compress your own model on your own data.

    result = cvsparse.compress(model, train_loader, val_loader, method="cvgrad", epochs=2)
    result.model     # the same module, its pruned weights exact zeros
    result.report    # what report.json holds: compression_rate, val_acc, λ history, layers ...
    result.history   # the metrics.csv rows, one per epoch

Loaders are any iterables of ``(inputs, targets)`` batches (``torch.utils.data.DataLoader``
over any ``Dataset``); the loss is cross-entropy or any ``loss_fn(outputs, targets)``.  The
settings are those of the command line (docs/cli.md): the built-in defaults, then ``config``
(a :class:`~cvsparse.config.RunConfig`, a nested dict as in a YAML recipe, or a YAML file),
then ``epochs`` and the keyword ``overrides``.  docs/api.md describes the whole contract.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, Subset

from cvsparse.config import RunConfig, from_dict, load_yaml, resolve_defaults
from cvsparse.hyper.reference_run import FollowedRun, followed_run_in, followed_run_of
from cvsparse.methods import METHOD_CLASSES, CompressionMethod, RunData
from cvsparse.methods.base import Batches, LossFn
from cvsparse.methods.schedules import SchedulerFactory
from cvsparse.nn import strip
from cvsparse.params import Selector, select_weights
from cvsparse.precision import Precision
from cvsparse.train import checkpoint, rundir
from cvsparse.train.distributed import Ranks
from cvsparse.train.epochs import EpochLoop, loader_length, run_report, seed_everything
from cvsparse.validation import validate

#: Keys every checkpoint :func:`compress` writes holds.
_STATE_KEYS = ("epoch", "model", "method", "rng", "average", "rows", "wall_time_s", "config",
               "guard", "input_shape", "regularized", "loader_generators")
#: The configuration sections a flat override key is looked up in, after the method's own
#: (``data`` does not apply: the loaders are the caller's).
_SECTIONS = ("optim", "accuracy")
#: Top-level settings that apply to :func:`compress` (the device is the model's).
_TOP = ("seed", "threads", "precision", "channels_last")


@dataclass
class CompressionResult:
    """What :func:`compress` returns.

    ``model``: the module passed in (same object, same class), compressed in place — pruned
    weights are exact zeros, AutoPrune's gates stripped back to plain layers.  ``report``: the
    dict ``report.json`` holds (``compression_rate``, ``val_acc``, ``test_acc``, the λ history,
    the per-layer table ``layers``, the resolved ``config`` ...).  ``history``: one dict per
    epoch, the rows of ``metrics.csv``.  ``out``: the folder written, or None."""

    model: nn.Module
    report: dict[str, Any]
    history: list[dict[str, Any]]
    out: Path | None = None


def compress(
    model: nn.Module,
    train_loader: Batches,
    val_loader: Batches,
    *,
    method: str = "cvgrad",
    epochs: int | None = None,
    test_loader: Batches | None = None,
    out: str | Path | None = None,
    config: RunConfig | dict[str, Any] | str | Path | None = None,
    include: Selector | None = None,
    exclude: Selector | None = None,
    loss_fn: LossFn | None = None,
    gate_loader: Batches | None = None,
    lr_scheduler: SchedulerFactory | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    **overrides: Any,
) -> CompressionResult:
    """Compress ``model`` with ``method`` ("cvgrad", "autoprune" or "magnitude").

    Args:
        model: any ``nn.Module`` (on the device it should train on); trained and compressed in
            place.
        train_loader, val_loader, test_loader: iterables of ``(inputs, targets)`` batches,
            iterated once per epoch (``val_loader`` also feeds cvgrad's hyper steps).
        method: the compression method.
        epochs: ``optim.epochs`` — inner epochs per outer iteration for cvgrad (the run has
            ``outer · epochs + finetune_epochs``), the pruning phase for the others.
        out: a folder for ``report.json``, ``metrics.csv``, ``plots/`` and ``checkpoint.pt``
            (refused if it holds another run, unless ``overwrite``); None writes nothing.
        config: settings under the overrides (a ``RunConfig``, a nested dict, a YAML path).
        include, exclude: the regularized tensors — module names (a name covers every layer
            under it) or a predicate ``(module_name, module) -> bool``; default every
            Conv/Linear weight.
        loss_fn: ``loss_fn(outputs, targets)`` for training and validation; default
            cross-entropy.
        gate_loader: AutoPrune's gate batches; default: the second half of ``train_loader``'s
            dataset (the first half trains the weights), which needs a ``DataLoader`` over a
            sized dataset.
        lr_scheduler: ``factory(optimizer, phase) -> torch.optim.lr_scheduler.LRScheduler``,
            the weights' schedule within each phase of the method (an
            :class:`~cvsparse.methods.schedules.LRPhase`: each cvgrad outer iteration, the
            fine-tuning, ...); built when a phase begins, stepped once per epoch.  Default:
            the recipe's stepped schedule (``milestones``, ``gamma``).  A resumed run needs
            the same factory.
        resume: continue the run in ``out`` from its checkpoint (pass the same model
            architecture, freshly built, and the same loaders); the stored settings are used.
        progress: print one line per epoch to stderr.
        **overrides: any setting by its key in the method's section, ``optim``, ``accuracy``,
            or ``seed`` / ``threads`` / ``precision`` / ``channels_last`` (``lambda1=1e-5``,
            ``lr=0.05``, ``max_steps_per_epoch=10``, ``max_accuracy_drop=0.5``,
            ``precision="bf16"`` ...); a key that does not apply to ``method`` is a
            TypeError.

    Returns:
        A :class:`CompressionResult`.  Raises ValueError (or TypeError for an unknown setting)
        before any training for bad arguments.
    """
    if resume and out is None:
        raise ValueError("resume=True needs out= (the folder of the run to continue)")
    ranks = Ranks.from_env()   # several with a process group (docs/distributed.md)
    out_dir = None if out is None else Path(out)
    store = None
    state = None
    if out_dir is not None:
        if ranks.is_main:   # only rank 0 writes into the folder
            rundir.check_writable(out_dir)
            rundir.check_unlocked(out_dir)
        store = checkpoint.CheckpointStore(out_dir, required=_STATE_KEYS)
        if resume:
            state = store.load()
        elif ranks.is_main:
            rundir.check_free(out_dir, overwrite)
    if state is not None:
        run_config = from_dict(state["config"])
        followed = followed_run_in(state, run_config)
        validate(run_config, named_sources=False, followed=followed)
    else:
        run_config, followed = build_config(model, method, epochs, config, overrides)
    run = _Run(run_config, model, train_loader, val_loader, test_loader, include, exclude,
               loss_fn, gate_loader, state, progress, ranks, lr_scheduler, followed)
    if out_dir is None or not ranks.is_main:
        run.train()
        return run.finish(None)
    with rundir.RunLock(out_dir):
        if state is None:
            rundir.check_free(out_dir, overwrite)
            rundir.clear(out_dir)
        run.train(out_dir, store)
        return run.finish(out_dir)


def build_config(model: nn.Module, method: str, epochs: int | None,
                 config: RunConfig | dict[str, Any] | str | Path | None,
                 overrides: dict[str, Any]) -> tuple[RunConfig, FollowedRun | None]:
    """The resolved, validated :class:`RunConfig` of a :func:`compress` call: defaults ←
    ``config`` ← ``method``, ``epochs`` and ``overrides`` (flat keys looked up in the method's
    section, then ``optim``, then ``seed``, ``threads``, ``precision`` and ``channels_last``),
    and the reference run it is judged against, read once (None without
    ``accuracy.reference``).  ``model`` names the model in the report
    (``"custom:<class name>"``)."""
    if config is None:
        base = RunConfig()
    elif isinstance(config, RunConfig):
        base = copy.deepcopy(config)
    elif isinstance(config, dict):
        base = from_dict(copy.deepcopy(config))
    elif isinstance(config, (str, Path)):
        base = load_yaml(config)
    else:
        raise TypeError(f"config must be a RunConfig, a dict or a YAML path, got "
                        f"{type(config).__name__}")
    if method not in METHOD_CLASSES:
        raise ValueError(f"unknown method {method!r}; choose one of "
                         f"{', '.join(METHOD_CLASSES)}")
    base.method = method
    base.model = f"custom:{type(model).__name__}"
    base.data.dataset = "custom"
    values: dict[str, Any] = {}
    if epochs is not None:
        values["optim"] = {"epochs": epochs}
    for key, value in overrides.items():
        section = _section_of(base, key)
        if section:
            values.setdefault(section, {})[key] = value
        else:
            values[key] = value
    config = from_dict(values, base)
    followed = followed_run_of(config)
    resolve_defaults(config, followed)
    validate(config, named_sources=False, followed=followed)
    return config, followed


def _section_of(config: RunConfig, key: str) -> str:
    """The section a flat override ``key`` belongs to ("" for the top level); TypeError
    naming the valid keys when it is none of them."""
    for section in (config.method, *_SECTIONS):
        if key in {f.name for f in fields(getattr(config, section))}:
            return section
    if key in _TOP:
        return ""
    valid = sorted({f.name for s in (config.method, *_SECTIONS)
                    for f in fields(getattr(config, s))} | set(_TOP))
    raise TypeError(f"compress() got an unknown setting {key!r} for method "
                    f"{config.method!r}; valid: {', '.join(valid)}")


class _Run(EpochLoop):
    """One :func:`compress` run: the method over the caller's model and loaders, trained by
    the epoch loop the command line's :class:`~cvsparse.train.Trainer` runs too."""

    def __init__(self, config: RunConfig, model: nn.Module, train_loader: Batches,
                 val_loader: Batches, test_loader: Batches | None,
                 include: Selector | None, exclude: Selector | None, loss_fn: LossFn | None,
                 gate_loader: Batches | None, state: dict[str, Any] | None,
                 progress: bool, ranks: Ranks | None = None,
                 lr_scheduler: SchedulerFactory | None = None,
                 followed: FollowedRun | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.config = config
        self.model = model
        self.ranks = Ranks() if ranks is None else ranks
        self.progress = progress and self.ranks.is_main
        if config.threads:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        first = next(model.parameters(), None)
        self.device = self.ranks.join(first.device if first is not None
                                      else torch.device("cpu"))
        self.precision = Precision(config.precision, config.channels_last, self.device)
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        if state is not None:
            self.regularized = list(state["regularized"])
        else:
            self.regularized = select_weights(model, include, exclude)
        method_class = METHOD_CLASSES[config.method]
        self.train_loader = train_loader
        second = None
        if method_class.split_training is not CompressionMethod.split_training:
            if gate_loader is not None:
                second = gate_loader
            else:
                self.train_loader, second = _halves(train_loader, config.seed)
        self.loaders = [self.train_loader, val_loader, test_loader, second]
        whole_train = self.train_loader   # every rank its share of each batch of the others:
        self.train_loader, self.val_loader, self.test_loader, second = (
            None if loader is None else self.ranks.shard(loader) for loader in self.loaders)
        self.input_shape: tuple[int, ...] | None = (
            None if state is None else tuple(state["input_shape"]))
        data = RunData(val=self.val_loader, train_for_hvp=self.train_loader,
                       second_half=second, input_shape=self.input_shape,
                       loss_fn=self.ranks.loss(self.loss_fn) or loss_fn,
                       regularized=self.regularized, reduce=self.ranks.reducer())
        self.followed = followed
        method = method_class.from_config(config, model, data, followed)
        if lr_scheduler is not None:
            method.use_lr_scheduler(lr_scheduler)
        self._attach(method, whole_train)
        self.measured = self.regularized   # each row's compression: the regularized weights
        if self.curve.points and loader_length(self.train_loader) is None:
            raise ValueError("accuracy.curve_points places its validation points by step: "
                             "the train_loader must have a length (len(train_loader))")
        if state is not None:
            self._restore(state)

    # ---- the run ------------------------------------------------------------------------------

    def train(self, out_dir: Path | None = None,
              store: checkpoint.CheckpointStore | None = None) -> None:
        """Every epoch left; with ``out_dir``, metrics.csv and the checkpoint after each."""
        self._train_epochs(self.config.total_epochs, out_dir, store)

    def finish(self, out_dir: Path | None) -> CompressionResult:
        """The report (written with the plots into ``out_dir``), then the model stripped of
        AutoPrune's gates."""
        report = self.report()
        if out_dir is not None:
            self._write_results(report, out_dir)
        model = strip(self.model)
        if model is not self.model:   # the model was itself one gated layer
            raise ValueError("compress: the model is a single layer; wrap it in a module")
        self.precision.prepare(model)   # the plain layers that replaced gated ones too
        return CompressionResult(model=model, report=report, history=list(self.rows),
                                 out=out_dir)

    def report(self) -> dict[str, Any]:
        """The report of the model as it is now (docs/method.md §7)."""
        with self._evaluated():
            model_class = f"{type(self.model).__module__}.{type(self.model).__qualname__}"
            return run_report(self.method, self.rows, self._shape(), self.config,
                              self.wall_time, self.ranks.world_size, self.regularized,
                              extra={"model_class": model_class})

    # ---- checkpoints --------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            **super()._state(),
            "input_shape": list(self._shape()),
            "regularized": self.regularized,
            "loader_generators": [None if g is None else g.get_state()
                                  for g in _generators(self.loaders)],
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self._restore_loop(state)
        for generator, saved in zip(_generators(self.loaders), state["loader_generators"],
                                    strict=True):
            if generator is not None and saved is not None:
                generator.set_state(saved)


def _halves(loader: Batches, seed: int) -> tuple[DataLoader, DataLoader]:
    """Two DataLoaders like ``loader`` over the two halves of a seeded permutation of its
    dataset (weights on the first, AutoPrune's gates on the second)."""
    dataset = getattr(loader, "dataset", None)
    if not isinstance(loader, DataLoader) or not hasattr(dataset, "__len__") \
            or loader.batch_size is None:
        raise ValueError("autoprune trains its gates on separate batches: pass "
                         "gate_loader=..., or a DataLoader with a batch_size over a sized "
                         "dataset as train_loader (it is split in two halves)")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    half = len(order) // 2
    if half == 0:
        raise ValueError("train_loader's dataset is too small to split in two halves")
    shuffle = isinstance(loader.sampler, RandomSampler)

    def like(indices: Tensor) -> DataLoader:
        return DataLoader(Subset(dataset, indices.tolist()), batch_size=loader.batch_size,
                          shuffle=shuffle, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                          drop_last=loader.drop_last, generator=loader.generator)

    return like(order[:half]), like(order[half:])


def _generators(loaders: list[Any]) -> list[torch.Generator | None]:
    """The ``generator`` of each loader that has one (a DataLoader's shuffling), else None."""
    return [g if isinstance(g := getattr(loader, "generator", None), torch.Generator) else None
            for loader in loaders]
