"""cvgrad's curvature system holds every trainable tensor, and its diagnostics reach
``metrics.csv``."""

from __future__ import annotations

import csv
import math

import pytest

from cvsparse.train import Trainer

from .test_trainer import tiny_config


def test_the_unregularized_tensors_are_every_other_trainable_parameter(tmp_path):
    trainer = Trainer(tiny_config(), tmp_path, progress=False)
    method, model = trainer.method, trainer.method.model
    names = {id(p): n for n, p in model.named_parameters()}
    biases = {n for n in names.values() if n.endswith(".bias")}  # LeNet-300: weights, biases
    assert {names[id(p)] for p in method.unregularized} == biases
    assert {names[id(p)] for p in method.weights} == set(names.values()) - biases


@pytest.mark.parametrize(("estimator", "options", "columns"), [
    ("cg", {"iters": 3}, ("cg_fallbacks", "cg_residual")),
    ("diagonal", {"curvature": "hutchinson"}, ("curvature_clipped",)),
])
def test_curvature_diagnostics_are_counted_per_epoch(tmp_path, estimator, options, columns):
    """Outer iterations end after epochs 1 and 3 (2 epochs each), with 2 hyper batches."""
    config = tiny_config(**{"cvgrad.estimator": estimator, "cvgrad.estimator_opts": options,
                            "cvgrad.outer": 2})
    Trainer(config, tmp_path, progress=False).run()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["hyper_steps"]) for r in rows] == [0, 2, 0, 2]
    for row in rows[1::2]:
        values = {c: float(row[c]) for c in columns}
        assert all(math.isfinite(v) and v >= 0 for v in values.values())
        if "cg_fallbacks" in values:  # a count of the epoch's 2 solves
            assert values["cg_fallbacks"] in (0, 1, 2)
