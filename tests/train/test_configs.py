"""Every shipped recipe loads and passes validation (a renamed key or bad value fails here)."""

from pathlib import Path

import pytest

from cvsparse.config import load_yaml, resolve_defaults
from cvsparse.validation import validate

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_recipes_exist_for_every_paper_model_and_dataset():
    names = {p.stem for p in RECIPES}
    for dataset in ("cifar10", "cifar100"):
        for model in ("vgg16", "resnet56", "resnet110", "densenet40"):
            assert f"{dataset}_{model}" in names
    assert {"mnist_lenet300", "mnist_lenet5"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_valid(path):
    config = load_yaml(path)
    validate(resolve_defaults(config))   # as a run takes it
    assert config.data.dataset in path.stem
    assert config.model in path.stem


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    """PyYAML reads ``1e-3`` as a string (YAML 1.1); the config must still get the float."""
    path = tmp_path / "r.yaml"
    path.write_text("cvgrad:\n  lambda1: 1e-3\n  outer: '4'\noptim:\n  lr: 5E-2\n")
    config = load_yaml(path)
    assert config.cvgrad.lambda1 == float("1e-3") and isinstance(config.cvgrad.lambda1, float)
    assert config.cvgrad.outer == 4 and config.optim.lr == float("5e-2")


@pytest.mark.parametrize("text, key", [("cvgrad:\n  lambda1: tiny\n", "cvgrad.lambda1"),
                                       ("cvgrad:\n  outer: 1e3\n", "cvgrad.outer")])
def test_non_numeric_value_for_a_number_names_the_key(tmp_path, text, key):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_yaml(path)
