"""Config types are strict: booleans only from YAML booleans, integers only from integers, and a
bad recipe or flag is one ``error:`` line with exit 2 before anything is read or written."""

from __future__ import annotations

import pytest

from cvsparse.config import RunConfig, from_dict, load_yaml, validate

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
