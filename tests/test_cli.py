"""The command line's flags land on the configuration keys they name."""

from __future__ import annotations

import dataclasses

import pytest

from cvsparse import cli
from cvsparse.config import RunConfig


def _resolve(config: RunConfig, path: str):
    target = config
    for part in path.split("."):
        assert dataclasses.is_dataclass(target) and part in {
            f.name for f in dataclasses.fields(target)}, f"{path}: no key {part!r}"
        target = getattr(target, part)
    return target


def test_every_flag_names_an_existing_config_key():
    paths = list(cli._FLAGS.values()) + [
        p for flags in cli._METHOD_FLAGS.values() for p in flags.values()]
    for path in paths:
        _resolve(RunConfig(), path)


@pytest.mark.parametrize(
    "argv, path, value",
    [
        (["--augment-phase", "finetune"], "data.augment_phase", "finetune"),
        (["--mnist-shift", "2"], "data.mnist_shift", 2),
        (["--method", "autoprune", "--target-check-every", "20"],
         "autoprune.target_check_every", 20),
        (["--method", "autoprune", "--aux-l1-ramp-epochs", "15"],
         "autoprune.aux_l1_ramp_epochs", 15),
        (["--method", "magnitude", "--finetune-epochs", "3"], "magnitude.finetune_epochs", 3),
        (["--method", "cvgrad", "--finetune-epochs", "3"], "cvgrad.finetune_epochs", 3),
        (["--method", "cvgrad", "--target-compression", "120"], "cvgrad.target_compression", 120),
        (["--method", "cvgrad", "--target-flops", "0.2"], "cvgrad.target_flops", 0.2),
        (["--method", "cvgrad", "--target-check-every", "50"], "cvgrad.target_check_every", 50),
        (["--method", "autoprune", "--target-compression", "50"],
         "autoprune.target_compression", 50),
        (["--min-compression", "100"], "cvgrad.min_compression", 100),
        (["--min-compression-epochs", "24"], "cvgrad.min_compression_epochs", 24),
        (["--swa-epochs", "4"], "optim.swa_epochs", 4),
        (["--swa-lr", "0.005"], "optim.swa_lr", 0.005),
    ],
)
def test_flag_sets_its_key(argv, path, value):
    args = cli._parser().parse_args(["train", *argv, "--out", "unused"])
    config = cli.config_from_args(args)
    assert _resolve(config, path) == value
    assert _resolve(RunConfig(), path) != value   # the flag, not the default, set it


def test_unknown_augment_phase_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["train", "--augment-phase", "sometimes"])
    assert "augment-phase" in capsys.readouterr().err
