"""cvgrad with a compression floor (``min_compression``): λ1 is held up and raised by the
floor's multiplier until the network is at least that compressed."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch

from cvsparse.train import Trainer
from cvsparse.train.outputs import summary_table

from .test_trainer import full_and_resumed, tiny_config

# the validation gradient lowers λ1 here: the free run ends barely compressed
BASE = {"cvgrad.outer": 3, "cvgrad.online_every": 3, "cvgrad.learn_lambda2": False}
FLOOR = {"cvgrad.min_compression": 6.0, "cvgrad.floor_gain": 0.5}


def rows(path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(path / "metrics.csv")))


def floor_config(**overrides):
    return tiny_config(**{**BASE, **overrides})


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
def test_floor_lifts_the_compression_the_validation_gradient_settles_below(tmp_path, per_layer):
    """Oracle: the same run without a floor ends under it; with the floor it ends above it,
    and at every hyper step where the floor binds and its multiplier rises, no λ1 falls (the
    validation gradient alone lowers them: see the free run)."""
    layered = {"cvgrad.per_layer": per_layer}
    free = Trainer(floor_config(**layered), tmp_path / "free", progress=False)
    free.run()
    free_rates = [float(r["compression_rate"]) for r in rows(tmp_path / "free")]
    assert free_rates[-1] < FLOOR["cvgrad.min_compression"]

    trainer = Trainer(floor_config(**FLOOR, **layered), tmp_path / "floor", progress=False)
    method = trainer.method
    steps: list[tuple[torch.Tensor, torch.Tensor, float, bool]] = []
    hyper_step = method._hyper_step

    def recording(batch):
        before, nu = method.lambdas.lambda1.clone(), method.floor.nu
        hyper_step(batch)
        steps.append((before, method.lambdas.lambda1.clone(), method.floor.nu - nu,
                      method.floor.binding))

    method._hyper_step = recording
    report = trainer.run()
    metrics = rows(tmp_path / "floor")

    assert report["compression_rate"] >= FLOOR["cvgrad.min_compression"]
    assert float(metrics[-1]["compression_rate"]) == report["compression_rate"]
    rising = [(b, a) for b, a, d_nu, binding in steps if binding and d_nu > 0]
    assert len(rising) > 10
    assert all(bool((after > before).all()) for before, after in rising)
    assert [float(r["floor"]) for r in metrics] == pytest.approx(
        [6.0 ** ((e + 1) / 6) for e in range(6)])           # ramp: the whole L1 phase
    assert max(float(r["floor_nu"]) for r in metrics) > 0
    assert "floor compression >= 6x: met" in summary_table(report)


def test_a_floor_already_met_leaves_the_run_bit_for_bit(tmp_path):
    """Oracle: the run without a floor.  A floor of 1x is met by every network, so its
    multiplier stays 0 and λ1 follows the validation gradient alone."""
    free = Trainer(floor_config(), tmp_path / "free", progress=False)
    free.run()
    floored = Trainer(floor_config(**{"cvgrad.min_compression": 1.0}), tmp_path / "one",
                      progress=False)
    floored.run()
    for a, b in zip(rows(tmp_path / "free"), rows(tmp_path / "one"), strict=True):
        assert float(b.pop("floor_nu")) == 0.0 and float(b.pop("floor")) == 1.0
        assert a == {**b, "wall_time_s": a["wall_time_s"]}
    for (_, p), (_, q) in zip(free.model.state_dict().items(),
                              floored.model.state_dict().items(), strict=True):
        assert torch.equal(p, q)


def test_kill_and_resume_with_a_binding_floor_is_bitwise(tmp_path):
    config = floor_config(**FLOOR, **{"cvgrad.min_compression_epochs": 2})
    full, resumed = full_and_resumed(config, tmp_path, stop_after=3)
    assert full.method.floor.nu == resumed.method.floor.nu
    assert torch.equal(full.method.lambdas.lambda1, resumed.method.lambdas.lambda1)
    assert max(float(r["floor_nu"]) for r in rows(tmp_path / "full")) > 0


def test_a_floor_out_of_reach_warns_and_the_summary_says_so(tmp_path):
    """A floor no dual step this small can reach: the L1 phase ends under it, the run warns
    once with the rate reached (the report's), and goes on to fine-tune."""
    config = floor_config(**{"cvgrad.min_compression": 1000.0, "cvgrad.floor_gain": 1e-3,
                             "cvgrad.finetune_epochs": 1})
    trainer = Trainer(config, tmp_path / "run", progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = trainer.run()
    messages = [str(w.message) for w in caught if "min_compression" in str(w.message)]
    last_l1 = rows(tmp_path / "run")[-2]
    assert len(messages) == 1
    assert f"at {float(last_l1['compression_rate']):.1f}x" in messages[0]
    assert "floor compression >= 1000x: NOT met" in summary_table(report)


@pytest.mark.parametrize("overrides, message", [
    ({"cvgrad.min_compression": 0.5}, "min_compression must be"),
    ({"cvgrad.min_compression_epochs": 3}, "needs cvgrad.min_compression"),
    ({"cvgrad.min_compression": 10.0, "cvgrad.min_compression_epochs": 0},
     "min_compression_epochs"),
    ({"cvgrad.min_compression": 10.0, "cvgrad.target_compression": 5.0}, "below"),
    ({"cvgrad.min_compression": 10.0, "cvgrad.floor_gain": 0.0}, "floor_gain"),
])
def test_bad_floor_config_fails_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        Trainer(floor_config(**overrides), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
