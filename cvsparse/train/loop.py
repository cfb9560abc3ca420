"""The command line's run: a zoo model on a built-in dataset, its loaders, run folder,
provenance and checkpoints, trained by the epoch loop every method shares
(:class:`~cvsparse.train.epochs.EpochLoop`; "Algorithm 1", docs/method.md §5.1).

Per epoch: train on the training split (a tqdm bar on a terminal, one line per epoch on a pipe
or file), let the method finish the epoch (e.g. a hyper pass), evaluate on validation and test,
append a ``metrics.csv`` row and write ``checkpoint.pt`` atomically.  At the end:
``report.json``, ``plots/*.png`` and a summary table.
``Trainer(..., resume=True)`` continues a run from its checkpoint bit for bit on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cvsparse import provenance, sources
from cvsparse.batches import CROP_PADDING, BatchLoader
from cvsparse.config import RunConfig, from_dict, resolve_defaults
from cvsparse.data import default_val_size, load_dataset, split_indices
from cvsparse.hyper.reference_run import FollowedRun, followed_run_in, followed_run_of
from cvsparse.imagefolder import crop_padding, is_image_folder
from cvsparse.methods import METHOD_CLASSES
from cvsparse.methods.base import RunData
from cvsparse.precision import Precision
from cvsparse.validation import validate

from . import checkpoint, distributed, outputs, rundir
from .epochs import EpochLoop, run_report, seed_everything

#: Keys every checkpoint state holds (a state without one of them is incomplete).
_STATE_KEYS = ("epoch", "model", "method", "generator", "hyper_generator", "rng", "split",
               "average", "rows", "wall_time_s", "config")


class Trainer(EpochLoop):
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
        seed_everything(config.seed)

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
        self._attach(method_class.from_config(config, self.model, run_data, self.followed),
                     self.bn_loader)
        self.loss_fn = None       # validation and test: the cross-entropy
        self.measured = None      # each row's compression: every Conv/Linear weight
        if state is not None:
            self._restore(state, hyper_generator)
        self._start_epoch()

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
        writes = self.ranks.is_main
        self._train_epochs(total, self.out_dir if writes else None,
                           self.checkpoints if writes else None)
        report = self.report()
        if writes:
            self._write_results(report, self.out_dir)
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

        self._augment = augment   # what the data config asks for; _start_epoch applies it
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

    def _start_epoch(self) -> None:
        """Switch the training batches' augmentation for the epoch about to run: always on with
        ``data.augment_phase = "all"``, only while the method fine-tunes with ``"finetune"``."""
        phase = self.config.data.augment_phase
        on = self._augment and (phase == "all" or self.method.finetuning)
        for loader in (self.train_loader, self.method.data.second_half):
            if loader is not None:
                loader.augment = on

    def _state(self) -> dict[str, Any]:
        return {
            **super()._state(),
            "generator": self.generator.get_state(),
            "hyper_generator": self.method.data.hyper_generator.get_state(),
            "split": (self.train_idx, self.val_idx),
            "data_sha256": [f["sha256"] for f in self.provenance["data"]["files"]],
        }

    def _restore(self, state: dict[str, Any], hyper_generator: torch.Generator) -> None:
        self._restore_loop(state)
        self.generator.set_state(state["generator"])
        hyper_generator.set_state(state["hyper_generator"])


class CVTrainer(Trainer):
    """:class:`Trainer` for the cross-validation-gradient method (``method="cvgrad"``)."""

    def __init__(self, config: RunConfig, out_dir: str | Path, **kwargs: Any) -> None:
        if config.method != "cvgrad":
            raise ValueError(f"CVTrainer runs method 'cvgrad', got {config.method!r}")
        super().__init__(config, out_dir, **kwargs)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device
