"""Config types are strict: booleans only from YAML booleans, integers only from integers, and a
bad recipe or flag is one ``error:`` line with exit 2 before anything is read or written."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

import cvsparse.data
import cvsparse.hyper.lambda_optimizer
import cvsparse.nn.gated
from cvsparse import cli
from cvsparse.config import (
    AccuracyConfig,
    AutoPruneConfig,
    CVGradConfig,
    DataConfig,
    MagnitudeConfig,
    OptimConfig,
    RunConfig,
    from_dict,
    load_yaml,
    resolve_defaults,
)
from cvsparse.data import AUGMENT_PHASES
from cvsparse.hyper.estimators import ESTIMATORS
from cvsparse.hyper.objectives import OBJECTIVES
from cvsparse.methods import METHOD_CLASSES
from cvsparse.nn.gated import GRANULARITIES, UPDATES
from cvsparse.ops import STE_CODES
from cvsparse.precision import PRECISIONS
from cvsparse.validation import validate

from .cli_helpers import one_line_error, run_cli


@pytest.mark.parametrize("values, message", [
    ({"cvgrad": {"per_layer": "false"}}, "cvgrad.per_layer must be true or false, got 'false'"),
    ({"cvgrad": {"per_layer": 0}}, "cvgrad.per_layer must be true or false, got 0"),
    ({"optim": {"epochs": 1.5}}, "optim.epochs must be an integer, got 1.5"),
    ({"optim": {"epochs": True}}, "optim.epochs must be an integer, got True"),
    ({"optim": {"lr": [0.1, 0.2]}}, r"optim.lr must be a number, got \[0.1, 0.2\]"),
    ({"optim": {"milestones": [0.5, "late"]}}, r"optim.milestones\[1\] must be a number"),
    ({"model": 5}, "model must be a string, got 5"),
    ({"seed": None}, "seed must be set"),
])
def test_wrong_types_name_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        from_dict(values)


def test_right_types_are_kept_as_written():
    config = from_dict({"cvgrad": {"per_layer": True, "lambda1": "1e-3", "outer": "4"},
                        "optim": {"epochs": 3, "milestones": [0.5, 1]}, "threads": None})
    assert config.cvgrad.per_layer is True and config.cvgrad.lambda1 == 1e-3
    assert config.cvgrad.outer == 4 and config.optim.epochs == 3
    assert config.optim.milestones == [0.5, 1] and config.threads is None


@pytest.mark.parametrize("key, value, message", [
    ("threads", 0, "threads must be an integer >= 1"),
    ("optim.max_steps_per_epoch", 0, "optim.max_steps_per_epoch must be an integer >= 1"),
    ("seed", -1, "seed must be an integer in"),
    ("optim.lr", float("nan"), "optim.lr must be a finite number"),
    ("cvgrad.lambda1", float("inf"), "cvgrad.lambda1 must be a finite number"),
    ("optim.gamma", 0.0, "optim.gamma must be in"),
    ("cvgrad.hyper_batches", 0, "cvgrad.hyper_batches must be an integer >= 1"),
])
def test_ranges_are_checked(key, value, message):
    config = RunConfig()
    section, _, leaf = key.rpartition(".")
    setattr(getattr(config, section) if section else config, leaf, value)
    with pytest.raises(ValueError, match=message):
        validate(config)


def test_yaml_syntax_error_is_one_line_with_its_place(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  epochs: 2\n  lr: [0.1\n")
    with pytest.raises(ValueError, match=r"YAML syntax error at line \d+, column \d+") as caught:
        load_yaml(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("yaml_text, flags, message", [
    ("cvgrad:\n  per_layer: \"false\"\n", [], "cvgrad.per_layer must be true or false"),
    ("optim:\n  epochs: 1.5\n", [], "optim.epochs must be an integer, got 1.5"),
    ("optim:\n  epochs: 2\n  lr: [0.1\n", [], "YAML syntax error at line"),
    ("optim:\n  lr: [0.1, 0.2]\n", [], "optim.lr must be a number"),
    ("{}\n", ["--threads", "-1"], "threads must be an integer >= 1, got -1"),
    ("{}\n", ["--max-steps-per-epoch", "0"], "optim.max_steps_per_epoch must be an integer >= 1"),
    ("{}\n", ["--lr", "nan"], "optim.lr must be a finite number"),
])
def test_cli_refuses_bad_recipes_and_flags_with_exit_2(tmp_path, yaml_text, flags, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml_text)
    result = run_cli("train", "--config", recipe, *flags, "--out", tmp_path / "out", "--quiet")
    assert result.returncode == 2
    assert message in one_line_error(result)
    assert not (tmp_path / "out").exists()


# ---- each section validates itself -----------------------------------------------------------

def _raise(message: str) -> None:
    raise ValueError(message)


#: (RunConfig attribute, section class, bad settings, the message validate has always given)
SECTION_CASES = [
    ("data", DataConfig, {"batch_size": 0}, "batch sizes must be >= 1"),
    ("data", DataConfig, {"augment_phase": "never"},
     "data.augment_phase must be one of all, finetune, got 'never'"),
    ("data", DataConfig, {"mnist_shift": 2, "dataset": "cifar10"},
     "data.mnist_shift applies to MNIST only"),
    ("data", DataConfig, {"split_seed": -1}, "data.split_seed must be an integer in"),
    ("data", DataConfig, {"val_size": 0}, "data.val_size must be >= 1, got 0"),
    ("optim", OptimConfig, {"epochs": 0}, "optim.epochs must be >= 1, got 0"),
    ("optim", OptimConfig, {"gamma": 1.5}, "optim.gamma must be in (0, 1], got 1.5"),
    ("optim", OptimConfig, {"swa_lr": -1.0}, "optim.swa_lr must be a finite number > 0"),
    ("optim", OptimConfig, {"max_skipped_steps": 0},
     "optim.max_skipped_steps must be an integer >= 1, got 0"),
    ("optim", OptimConfig, {"lr": float("nan")}, "optim.lr must be a finite number, got nan"),
    ("cvgrad", CVGradConfig, {"estimator": "exact"},
     "unknown estimator 'exact'; choose one of identity, diagonal, neumann, cg"),
    ("cvgrad", CVGradConfig, {"hyper_method": "rmsprop"},
     "cvgrad.hyper_method must be 'adam' or 'sgd', got 'rmsprop'"),
    ("cvgrad", CVGradConfig, {"val_objective": "mse"}, "unknown cvgrad.val_objective 'mse'"),
    ("cvgrad", CVGradConfig, {"hyper_batches": 0}, "cvgrad.hyper_batches must be an integer >= 1"),
    ("cvgrad", CVGradConfig, {"min_compression_epochs": 3},
     "cvgrad.min_compression_epochs needs cvgrad.min_compression"),
    ("cvgrad", CVGradConfig, {"hyper_betas": [0.9]}, "cvgrad.hyper_betas must be two numbers"),
    ("autoprune", AutoPruneConfig, {"ste": "relu"},
     "autoprune.ste must be linear, leaky_relu or softplus, got 'relu'"),
    ("autoprune", AutoPruneConfig, {"granularity": "block"},
     "autoprune.granularity must be 'weight' or 'neuron', got 'block'"),
    ("autoprune", AutoPruneConfig, {"update": "sign"},
     "autoprune.update must be 'proposed' or 'bnn', got 'sign'"),
    ("autoprune", AutoPruneConfig, {"target_flops": 1.5},
     "autoprune.target_flops is a fraction of dense FLOPs in (0, 1], got 1.5"),
    ("magnitude", MagnitudeConfig, {"target_compression": 0.5},
     "magnitude needs target_compression >= 1, finetune_epochs >= 0, weight_l2 >= 0"),
    ("accuracy", AccuracyConfig, {"reference_accuracy": 98.0},
     "accuracy.reference_accuracy needs accuracy.max_accuracy_drop"),
    ("accuracy", AccuracyConfig, {"max_accuracy_drop": 150.0},
     "accuracy.max_accuracy_drop is in accuracy points, in [0, 100), got 150.0"),
    ("accuracy", AccuracyConfig, {"max_relative_drop": 1.0, "patience": 0},
     "accuracy.check_ratio must be a finite number > 1 and accuracy.patience >= 1"),
]


@pytest.mark.parametrize("attr, section, bad, message", SECTION_CASES,
                         ids=lambda v: v if isinstance(v, str) else None)
def test_each_section_refuses_its_own_bad_values_as_the_whole_check_does(attr, section, bad,
                                                                          message):
    defaults = {OptimConfig: {"lr": 0.1},   # what resolve_defaults gives them
                AutoPruneConfig: {"aux_lr": 0.1, "weight_l2": 5e-4}}.get(section, {})
    section(**defaults).validate(_raise)   # its defaults pass
    with pytest.raises(ValueError) as alone:
        section(**{**defaults, **bad}).validate(_raise)
    assert str(alone.value).startswith(message)
    config = resolve_defaults(RunConfig())
    setattr(config, attr, dataclasses.replace(getattr(config, attr), **bad))
    with pytest.raises(ValueError) as whole:
        validate(config)
    assert str(whole.value) == f"bad config: {alone.value}"


# ---- the choice lists are the owning modules' ----------------------------------------------

def cli_choices_for(option: str) -> object:
    """The ``choices`` object of the ``train`` flag ``option``."""
    (sub,) = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    (action,) = [a for a in sub.choices["train"]._actions if option in a.option_strings]
    return action.choices


@pytest.mark.parametrize("option, owned", [
    ("--method", METHOD_CLASSES), ("--estimator", ESTIMATORS), ("--granularity", GRANULARITIES),
    ("--ste", STE_CODES), ("--update", UPDATES), ("--augment-phase", AUGMENT_PHASES),
    ("--precision", PRECISIONS),
], ids=lambda v: v if isinstance(v, str) else None)
def test_cli_choices_are_the_owning_modules_lists(option, owned):
    assert cli_choices_for(option) is owned
    assert list(cli_choices_for(option)) == list(owned)


@pytest.mark.parametrize("key, owned", [
    ("method", METHOD_CLASSES), ("cvgrad.estimator", ESTIMATORS),
    ("cvgrad.val_objective", OBJECTIVES), ("autoprune.granularity", GRANULARITIES),
    ("autoprune.ste", STE_CODES), ("autoprune.update", UPDATES),
    ("data.augment_phase", AUGMENT_PHASES),
    ("cvgrad.hyper_method", cvsparse.hyper.lambda_optimizer.METHODS),
], ids=lambda v: v if isinstance(v, str) else None)
def test_validate_accepts_exactly_the_owning_modules_values(key, owned):
    section, _, leaf = key.rpartition(".")
    for value in [*owned, "no-such-choice"]:
        config = resolve_defaults(RunConfig())
        setattr(getattr(config, section) if section else config, leaf, value)
        if value in owned:
            validate(config)
        else:
            with pytest.raises(ValueError, match=f"{leaf}.*'no-such-choice'"):
                validate(config)


def test_a_choice_added_to_its_owner_is_accepted_by_config_and_cli(monkeypatch):
    monkeypatch.setattr(cvsparse.nn.gated, "GRANULARITIES", (*GRANULARITIES, "block"))
    monkeypatch.setattr(cvsparse.data, "AUGMENT_PHASES", (*AUGMENT_PHASES, "pretrain"))
    monkeypatch.setitem(ESTIMATORS, "exact", ESTIMATORS["cg"])
    config = resolve_defaults(RunConfig())
    config.autoprune.granularity, config.data.augment_phase = "block", "pretrain"
    config.cvgrad.estimator = "exact"
    validate(config)
    args = cli._parser().parse_args(["train", "--granularity", "block", "--method", "autoprune",
                                     "--augment-phase", "pretrain", "--out", "unused"])
    assert (args.granularity, args.augment_phase) == ("block", "pretrain")
    assert "exact" in cli_choices_for("--estimator")
