"""Every shipped recipe loads and passes validation (a renamed key or bad value fails here)."""

from pathlib import Path

import pytest

from cvsparse.config import load_yaml, validate

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
    validate(config)
    assert config.data.dataset in path.stem
    assert config.model in path.stem
