"""The command line's flags land on the configuration keys they name."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from cvsparse import cli
from cvsparse.config import RunConfig
from cvsparse.methods import METHOD_CLASSES


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


# ---- flags of another method ---------------------------------------------------------------

def _train_actions() -> dict[str, argparse.Action]:
    """The ``train`` subcommand's actions by destination."""
    (sub,) = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {a.dest: a for a in sub.choices["train"]._actions}


def _flag_argv(action: argparse.Action) -> tuple[list[str], object]:
    """Command-line words giving ``action`` a value, and the value they set."""
    option = action.option_strings[0]
    if action.choices is not None:
        choice = list(action.choices)[-1]
        return [option, choice], choice
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        return [option], True
    if action.nargs == "+":
        return [option, "body.0"], ["body.0"]
    if action.type is int:
        return [option, "3"], 3
    if action.type is float:
        return [option, "0.5"], 0.5
    return [option, "x"], "x"


def _key_path(dest: str, method: str) -> str:
    return {**cli._FLAGS, **cli._METHOD_FLAGS.get(method, {})}[dest]


def _pairs() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(applicable, inapplicable) ``(flag dest, method)`` pairs: a flag is inapplicable to a
    method when the key it sets for that method is in another method's section."""
    dests = sorted((set(cli._FLAGS) | {d for f in cli._METHOD_FLAGS.values() for d in f})
                   - {"method"})
    applicable, inapplicable = [], []
    for dest in dests:
        for method in METHOD_CLASSES:
            section = _key_path(dest, method).partition(".")[0]
            other = section in METHOD_CLASSES and section != method
            (inapplicable if other else applicable).append((dest, method))
    return applicable, inapplicable


APPLICABLE, INAPPLICABLE = _pairs()
ACTIONS = _train_actions()


def test_every_configuration_flag_of_the_parser_is_mapped_and_the_issue_examples_are_refused():
    not_config = {"help", "config", "out", "overwrite", "resume", "quiet"}
    assert set(ACTIONS) - not_config == set(cli._FLAGS)
    for flag, method in [("weight_l2", "cvgrad"), ("target_flops", "magnitude"),
                         ("outer", "autoprune"), ("estimator", "magnitude"),
                         ("lambda1", "autoprune"), ("online_every", "magnitude"),
                         ("min_compression", "autoprune"), ("granularity", "cvgrad"),
                         ("ste", "magnitude"), ("aux_lr", "cvgrad")]:
        assert (flag, method) in INAPPLICABLE


@pytest.mark.parametrize("dest, method", INAPPLICABLE, ids=lambda v: str(v))
def test_a_flag_of_another_method_exits_2_naming_it(tmp_path, capsys, dest, method):
    argv, _ = _flag_argv(ACTIONS[dest])
    out = tmp_path / "out"
    code = cli.main(["train", "--method", method, *argv, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    users = [m for m in METHOD_CLASSES if (dest, m) in APPLICABLE]
    assert err == (f"error: {argv[0]} applies to {', '.join(users)}, not to method {method}")
    assert not out.exists()


@pytest.mark.parametrize("dest, method", APPLICABLE, ids=lambda v: str(v))
def test_a_flag_of_the_method_or_a_shared_section_sets_its_key(dest, method):
    argv, value = _flag_argv(ACTIONS[dest])
    args = cli._parser().parse_args(["train", "--method", method, *argv, "--out", "unused"])
    path = _key_path(dest, method)
    assert _resolve(cli.config_from_args(args), path) == value
    assert path.partition(".")[0] not in set(METHOD_CLASSES) - {method}


def test_the_recipe_method_decides_and_recipe_sections_of_other_methods_are_kept(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "magnitude", "cvgrad": {"outer": 7},
                                      "autoprune": {"aux_lr": 0.3}}))
    args = cli._parser().parse_args(["train", "--config", str(recipe), "--out", "unused"])
    config = cli.config_from_args(args)   # other sections at non-default values: accepted
    assert (config.method, config.cvgrad.outer, config.autoprune.aux_lr) == ("magnitude", 7, 0.3)
    args = cli._parser().parse_args(["train", "--config", str(recipe), "--outer", "2",
                                     "--out", "unused"])
    with pytest.raises(ValueError, match="^--outer applies to cvgrad, not to method magnitude$"):
        cli.config_from_args(args)


def test_resume_still_names_a_foreign_flag_as_a_change_and_takes_the_safe_ones():
    stored = RunConfig()
    args = cli._parser().parse_args(["train", "--resume", "unused", "--weight-l2", "0.1"])
    with pytest.raises(ValueError, match="--weight-l2 would change it"):
        cli.resume_config(args, stored)
    args = cli._parser().parse_args(["train", "--resume", "unused", "--threads", "3"])
    with pytest.warns(UserWarning, match="^--threads 3 instead of"):
        assert cli.resume_config(args, stored).threads == 3
