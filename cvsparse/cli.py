"""The ``cvsparse`` command.

    cvsparse train --model lenet300 --dataset mnist --method cvgrad --out runs/lenet300
    cvsparse train --resume runs/lenet300
    cvsparse summary runs/lenet300
    cvsparse export runs/lenet300 --out lenet300.cvsp
    cvsparse eval lenet300.cvsp --dataset mnist

Settings come from the built-in defaults, then ``--config FILE.yaml``, then the flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from cvsparse.config import RunConfig, load_yaml
from cvsparse.faults import Diverged
from cvsparse.precision import PRECISIONS


def _parser() -> argparse.ArgumentParser:
    """The ``cvsparse`` command's parser; the choices of the flags are the lists of the modules
    that own them."""
    from cvsparse.data import AUGMENT_PHASES
    from cvsparse.hyper.estimators import ESTIMATORS
    from cvsparse.methods import METHOD_CLASSES
    from cvsparse.nn.gated import GRANULARITIES, UPDATES
    from cvsparse.ops import STE_CODES

    parser = argparse.ArgumentParser(prog="cvsparse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="compress a model (writes report, metrics, plots)")
    train.add_argument("--config", type=Path, help="YAML recipe (see configs/)")
    train.add_argument("--model", help="lenet300, lenet5, vgg16, resnet20/32/56/110, "
                       "densenet40, torchvision:NAME (e.g. torchvision:resnet18) or "
                       "package.module:factory")
    train.add_argument("--dataset", help="mnist, cifar10, cifar100 or imagefolder:PATH "
                       "(PATH/train/CLASS/*, PATH/val/CLASS/*)")
    train.add_argument("--num-classes", type=int, metavar="N",
                       help="model outputs (default: the dataset's classes)")
    train.add_argument("--image-size", type=int, metavar="PIXELS",
                       help="imagefolder: resize and center-crop images to PIXELS square "
                       "(default 224)")
    train.add_argument("--method", choices=METHOD_CLASSES)
    train.add_argument("--data-root", help="folder with <dataset>.npz or torchvision layouts "
                       "(default: $CVSPARSE_DATA, ../shared/data, ~/.cache/torchvision)")
    train.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                       help="download a dataset found nowhere with torchvision (default: on; "
                       "--no-download fails instead)")
    train.add_argument("--epochs", type=int, help="inner epochs per outer iteration")
    train.add_argument("--outer", type=int, help="outer iterations (cvgrad)")
    train.add_argument("--estimator", choices=ESTIMATORS)
    train.add_argument("--per-layer-lambda", action="store_true", default=None,
                       help="learn one (λ1, λ2) per regularized tensor")
    train.add_argument("--lambda1", type=float, help="initial λ1")
    train.add_argument("--lambda2", type=float, help="initial λ2")
    train.add_argument("--hyper-lr", type=float, help="λ optimizer step size")
    train.add_argument("--online-every", type=int, help="hyper step every k training steps")
    train.add_argument("--granularity", choices=GRANULARITIES,
                       help="autoprune: one gate per weight or per output channel/neuron")
    train.add_argument("--ste", choices=STE_CODES,
                       help="autoprune: straight-through estimator of the gate")
    train.add_argument("--slope", type=float,
                       help="autoprune: LeakyReLU STE slope for closed gates (default 0.01)")
    train.add_argument("--update", choices=UPDATES, help="autoprune: gate update rule")
    train.add_argument("--aux-lr", type=float,
                       help="autoprune: learning rate of the gates (default 0.1; 0 under an "
                       "accuracy constraint, whose cuts alone close gates)")
    train.add_argument("--aux-l1", type=float, help="autoprune: L1 strength on the gates")
    train.add_argument("--aux-l1-ramp-epochs", type=int, metavar="R",
                       help="autoprune: the gate L1 grows linearly to --aux-l1 over R epochs")
    train.add_argument("--weight-l2", type=float,
                       help="autoprune / magnitude: L2 (weight decay) on the weights "
                       "(default 5e-4; a constrained AutoPrune run that follows a dense run "
                       "takes that run's)")
    train.add_argument("--target-compression", type=float,
                       help="autoprune / cvgrad: end the pruning phase (freeze the gates or the "
                       "support) and fine-tune once this rate is reached; magnitude: the rate "
                       "of the one cut")
    train.add_argument("--target-flops", type=float,
                       help="autoprune / cvgrad: ... once effective/dense FLOPs falls to this "
                       "fraction")
    train.add_argument("--target-check-every", type=int, metavar="K",
                       help="autoprune / cvgrad: also check the target every K gate (training) "
                       "steps, not only at epoch ends (0, the default: epoch ends only)")
    train.add_argument("--min-compression", type=float, metavar="C",
                       help="cvgrad: a floor on the compression rate; λ1 is held up (and "
                       "raised) while the network is below it")
    train.add_argument("--min-compression-epochs", type=int, metavar="R",
                       help="cvgrad: the floor grows geometrically from 1 to --min-compression "
                       "over R epochs (default: the whole L1 phase)")
    train.add_argument("--max-accuracy-drop", type=float, metavar="D",
                       help="cvgrad, autoprune: compress as far as the validation accuracy "
                       "stays within D points of a reference (the run's own dense phase, or "
                       "--reference / --reference-accuracy)")
    train.add_argument("--max-relative-drop", type=float, metavar="R",
                       help="cvgrad, autoprune: ... within R percent of the reference "
                       "accuracy (with --max-accuracy-drop too, the stricter bound holds)")
    train.add_argument("--reference", metavar="RUN_DIR",
                       help="the reference accuracy: the validation accuracy of this finished "
                       "dense run (same dataset and split); no dense phase")
    train.add_argument("--reference-accuracy", type=float, metavar="A",
                       help="the reference validation accuracy in percent (e.g. 98.3); no "
                       "dense phase")
    train.add_argument("--curve-points", type=int, metavar="K",
                       help="also measure the validation accuracy K times inside each epoch "
                       "(curve.csv): a constrained run that follows this one with --reference "
                       "judges its checks against these points (default 0)")
    train.add_argument("--finetune-epochs", type=int,
                       help="fine-tune epochs on the pruned support (every method)")
    train.add_argument("--finetune-lr", type=float,
                       help="cvgrad, autoprune: first learning rate of fine-tuning "
                       "(default lr·gamma)")
    train.add_argument("--finetune-weight-l2", type=float,
                       help="weight L2 of fine-tuning (default: the training phase's; "
                       "cvgrad: the learned λ2)")
    train.add_argument("--swa-epochs", type=int, metavar="K",
                       help="average the weights over the last K fine-tuning epochs, run at "
                       "the constant --swa-lr (SWA; default 0: no averaging)")
    train.add_argument("--swa-lr", type=float,
                       help="learning rate of the averaging epochs (default: the fine-tuning "
                       "phase's first lr)")
    train.add_argument("--skip-layers", nargs="+", metavar="NAME",
                       help="autoprune: Conv2d/Linear layers to leave ungated (e.g. body.0)")
    train.add_argument("--pretrained", help="autoprune: start from this run folder or weights")
    train.add_argument("--lr", type=float, help="weight learning rate")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--mnist-shift", type=int, metavar="PIXELS",
                       help="MNIST: shift training images randomly by up to this many pixels "
                       "(default 0: no augmentation)")
    train.add_argument("--augment-phase", choices=AUGMENT_PHASES,
                       help="augment (CIFAR crop + flip, --mnist-shift) every training batch "
                       "(all, the default) or only those of the fine-tuning phase (finetune)")
    train.add_argument("--max-steps-per-epoch", type=int, help="cap steps (smoke runs)")
    train.add_argument("--max-skipped-steps", type=int, metavar="K",
                       help="stop the run (exit 3) after K training or hyper steps in a row "
                       "were skipped for a non-finite or exploding loss, gradient or "
                       "hypergradient (default 10)")
    train.add_argument("--seed", type=int)
    train.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.add_argument("--precision", choices=PRECISIONS,
                       help="autocast of the training steps and evaluation: fp32 (default), "
                       "bf16, or fp16 with loss scaling; weights and hyper steps stay fp32")
    train.add_argument("--channels-last", action="store_true", default=None,
                       help="model and image batches in torch.channels_last memory format")
    train.add_argument("--out", type=Path,
                       help="output folder (refused if it holds another run, see --overwrite)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run in --out (its checkpoints, report, metrics, plots)")
    train.add_argument("--resume", type=Path, metavar="DIR",
                       help="continue the run in DIR as it was configured; accepts only "
                       "--threads, --device, --data-root, --download, --quiet and a larger "
                       "--finetune-epochs besides")
    train.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    summary = sub.add_parser("summary", help="print the summary table of a finished run")
    summary.add_argument("run_dir", type=Path)
    compare = sub.add_parser("compare", help="markdown table of error vs compression of runs")
    compare.add_argument("run_dirs", type=Path, nargs="+")
    from cvsparse.export.commands import add_parsers

    add_parsers(sub)   # export, eval
    return parser


_FLAGS = {  # flag attribute → config path
    "model": "model", "method": "method", "seed": "seed", "device": "device",
    "threads": "threads", "precision": "precision", "channels_last": "channels_last",
    "dataset": "data.dataset", "data_root": "data.root", "num_classes": "num_classes",
    "image_size": "data.image_size",
    "download": "data.download", "batch_size": "data.batch_size",
    "mnist_shift": "data.mnist_shift", "augment_phase": "data.augment_phase",
    "epochs": "optim.epochs",
    "lr": "optim.lr", "finetune_lr": "optim.finetune_lr",
    "finetune_weight_l2": "optim.finetune_weight_l2",
    "swa_epochs": "optim.swa_epochs", "swa_lr": "optim.swa_lr",
    "max_steps_per_epoch": "optim.max_steps_per_epoch",
    "max_skipped_steps": "optim.max_skipped_steps",
    "outer": "cvgrad.outer", "estimator": "cvgrad.estimator",
    "per_layer_lambda": "cvgrad.per_layer", "lambda1": "cvgrad.lambda1",
    "lambda2": "cvgrad.lambda2", "hyper_lr": "cvgrad.hyper_lr",
    "online_every": "cvgrad.online_every", "min_compression": "cvgrad.min_compression",
    "min_compression_epochs": "cvgrad.min_compression_epochs",
    "max_accuracy_drop": "accuracy.max_accuracy_drop",
    "max_relative_drop": "accuracy.max_relative_drop", "reference": "accuracy.reference",
    "reference_accuracy": "accuracy.reference_accuracy", "curve_points": "accuracy.curve_points",
    "granularity": "autoprune.granularity",
    "ste": "autoprune.ste", "slope": "autoprune.slope", "update": "autoprune.update",
    "aux_lr": "autoprune.aux_lr",
    "aux_l1": "autoprune.aux_l1", "aux_l1_ramp_epochs": "autoprune.aux_l1_ramp_epochs",
    "target_compression": "autoprune.target_compression",
    "target_flops": "autoprune.target_flops",
    "target_check_every": "autoprune.target_check_every", "weight_l2": "autoprune.weight_l2",
    "finetune_epochs": "autoprune.finetune_epochs",
    "pretrained": "autoprune.pretrained", "skip_layers": "autoprune.skip_layers",
}
_METHOD_FLAGS = {  # flags whose meaning depends on the method
    "magnitude": {"target_compression": "magnitude.target_compression",
                  "weight_l2": "magnitude.weight_l2",
                  "finetune_epochs": "magnitude.finetune_epochs"},
    "cvgrad": {"finetune_epochs": "cvgrad.finetune_epochs",
               "target_compression": "cvgrad.target_compression",
               "target_flops": "cvgrad.target_flops",
               "target_check_every": "cvgrad.target_check_every"},
}


#: Flags ``--resume`` accepts with any value: they change where and how the run computes, not
#: what it trains (``--quiet`` too).  Another thread count changes the order in which the CPU
#: kernels sum, so the run goes on bit for bit only at the thread count it had (warned).
#: ``--finetune-epochs`` is accepted when it adds epochs (runs without weight averaging).  Every
#: other flag that would change the stored configuration is refused.
RESUME_SAFE_FLAGS = ("threads", "device", "data_root", "download")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults, then ``--config``, then explicit flags; ValueError naming the first flag
    that sets a key of another method's section (a recipe may carry several sections, the
    flags must fit the run's method)."""
    config = load_yaml(args.config) if args.config else RunConfig()
    method = args.method or config.method
    given = _given_flags(args, method)
    refused = [flag for flag, _ in given if method in _methods()   # else validate names it
               and not flag_applies(flag, method)]
    if refused:
        users = [m for m in _methods() if flag_applies(refused[0], m)]
        raise ValueError(f"--{refused[0].replace('_', '-')} applies to {', '.join(users)}, "
                         f"not to method {method}")
    for flag, path in given:
        _set(config, path, getattr(args, flag))
    return config


def resume_config(args: argparse.Namespace, stored: RunConfig) -> RunConfig:
    """``stored`` (a checkpoint's configuration) with the flags a resume may change applied;
    ValueError naming every flag that would change anything else."""
    refused = [f"--{name}" for name in ("config", "out") if getattr(args, name) is not None]
    refused += ["--overwrite"] if args.overwrite else []
    threads_were = stored.threads
    for flag, path in _given_flags(args, stored.method):
        value, current = getattr(args, flag), _get(stored, path)
        if value == current:
            continue
        if flag in RESUME_SAFE_FLAGS or (flag == "finetune_epochs" and value > current
                                         and stored.optim.swa_epochs == 0):
            _set(stored, path, value)
        else:
            refused.append(f"--{flag.replace('_', '-')}")
    if refused:
        raise ValueError(f"--resume continues the run as it was configured; {', '.join(refused)} "
                         "would change it (resume accepts --threads, --device, --data-root, "
                         "--download, --quiet and a larger --finetune-epochs; start a new run "
                         "with --out for anything else)")
    if stored.threads != threads_were:
        _warn_thread_change(stored.threads, threads_were)
    return stored


def _warn_thread_change(threads: int, stored: int | None) -> None:
    """Warn that a resume at ``threads`` CPU threads leaves the path of the run, which used
    ``stored`` (None: torch's default)."""
    was = f"the {stored} it was trained with" if stored is not None else "torch's default it used"
    warnings.warn(f"--threads {threads} instead of {was}: CPU kernels sum in another order with "
                  "another thread count, so the resumed run is not bit for bit the uninterrupted "
                  "one", stacklevel=2)


def _given_flags(args: argparse.Namespace, method: str) -> list[tuple[str, str]]:
    """``(flag attribute, config path)`` of every configuration flag given on the command
    line, method-dependent flags resolved for ``method``."""
    return [(flag, path) for flag, path in _flag_paths(args.method or method).items()
            if getattr(args, flag) is not None]


def flag_applies(flag: str, method: str) -> bool:
    """Whether the flag ``flag`` (its attribute name) sets anything ``method`` reads: a key of
    a shared section or of ``method``'s own section, not of another method's."""
    section = _flag_paths(method)[flag].partition(".")[0]
    return section == method or section not in _methods()


def _flag_paths(method: str) -> dict[str, str]:
    """Flag attribute → config path, method-dependent flags resolved for ``method``."""
    return {**_FLAGS, **_METHOD_FLAGS.get(method, {})}


def _methods() -> tuple[str, ...]:
    """The method names (their sections of the configuration carry the same names)."""
    from cvsparse.methods import METHOD_CLASSES

    return tuple(METHOD_CLASSES)


def _get(config: RunConfig, path: str) -> object:
    target: object = config
    for part in path.split("."):
        target = getattr(target, part)
    return target


def _set(config: RunConfig, path: str, value: object) -> None:
    *parents, leaf = path.split(".")
    target: object = config
    for part in parents:
        target = getattr(target, part)
    setattr(target, leaf, value)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as ``warning: MESSAGE`` lines (no source file, no code excerpt)."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Run the ``cvsparse`` command; returns its exit code (0 done, 1 failed, 2 refused,
    3 diverged)."""
    warnings.formatwarning = _one_line_warning
    args = _parser().parse_args(argv)
    if args.command in ("export", "eval"):
        from cvsparse.export.commands import run

        return run(args)
    if args.command in ("summary", "compare"):
        from cvsparse.train.outputs import comparison_table, summary_table

        dirs = [args.run_dir] if args.command == "summary" else args.run_dirs
        missing = [d for d in dirs if not (d / "report.json").is_file()]
        if missing:
            print(f"error: no report.json in {', '.join(map(str, missing))}", file=sys.stderr)
            return 2
        try:
            reports = {str(d): _read_report(d / "report.json") for d in dirs}
            if args.command == "summary":
                table = summary_table(reports[str(args.run_dir)])
            else:
                table = comparison_table(reports)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (KeyError, TypeError) as exc:   # a report.json of the right keys, wrong insides
            print(f"error: a report.json has no or a malformed entry {exc}", file=sys.stderr)
            return 2
        print(table)
        return 0

    from cvsparse.train import Trainer
    from cvsparse.train.rundir import RunDirError

    try:
        if args.resume is not None:
            trainer = Trainer(RunConfig(), args.resume, resume=True, progress=not args.quiet,
                              on_resume=lambda stored: resume_config(args, stored))
        else:
            if args.out is None:
                print("error: --out DIR is required (or --resume DIR)", file=sys.stderr)
                return 2
            trainer = Trainer(config_from_args(args), args.out, overwrite=args.overwrite,
                              progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        trainer.run()
    except RunDirError as exc:   # the folder is locked by another process, or was taken
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Diverged as exc:
        print(f"error: {exc}; {_last_good(trainer)}", file=sys.stderr)
        return 3
    except ValueError as exc:  # another failure during training
        print(f"error: {exc}; {_last_good(trainer)}", file=sys.stderr)
        return 1
    if trainer.ranks.is_main:   # under torchrun only rank 0 wrote
        print(f"wrote {trainer.out_dir}/report.json, metrics.csv, plots/, checkpoint.pt")
    return 0


def _read_report(path: Path) -> dict:
    """``report.json`` at ``path`` as a dict; ValueError (one line) if it is not valid JSON
    holding an object."""
    try:
        report = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    missing = [k for k in _REPORT_KEYS if not isinstance(report, dict) or k not in report]
    if missing:
        raise ValueError(f"{path} is not a cvsparse report (no {', '.join(missing)})")
    return report


#: Keys ``summary`` and ``compare`` read from every report.
_REPORT_KEYS = ("test_acc", "val_acc", "params_total", "params_nonzero", "compression_rate",
                "pruned_pct", "flops_dense", "flops_effective", "layers", "epochs",
                "wall_time_s", "config")


def _last_good(trainer: object) -> str:
    """Where a stopped run's last good epoch is (the checkpoint of its last finished epoch)."""
    done = getattr(trainer, "epoch", 0)
    if not done:
        return "no epoch finished, nothing was checkpointed"
    return f"the last good epoch ({done}) is in {trainer.out_dir}/checkpoint.pt"


if __name__ == "__main__":
    sys.exit(main())
