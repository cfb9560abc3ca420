"""AutoPrune through the shared loop: disjoint halves, neuron pruning in the report, freezing."""

from __future__ import annotations

import json

import pytest
import torch

from cvsparse.config import from_dict
from cvsparse.methods import AutoPruneMethod
from cvsparse.nn import gated_layers
from cvsparse.train import Trainer
from cvsparse.train.outputs import summary_table

from .test_trainer import full_and_resumed, run_and_budget_warnings


def autoprune_config(model="lenet300", lr=0.05, **autoprune):
    return from_dict({
        "model": model, "method": "autoprune", "threads": 1,
        "data": {"dataset": "mnist", "batch_size": 64, "val_size": 2000, "val_batch_size": 1000},
        "optim": {"epochs": 2, "lr": lr, "max_steps_per_epoch": 25},
        "autoprune": {"finetune_epochs": 1, **autoprune},
    })


def test_training_halves_are_disjoint_and_cover_the_split():
    idx = torch.randperm(1001)
    first, second = AutoPruneMethod.split_training(idx)
    assert len(set(first.tolist()) & set(second.tolist())) == 0
    assert sorted(first.tolist() + second.tolist()) == sorted(idx.tolist())
    assert abs(len(first) - len(second)) <= 1


def test_neuron_run_reports_removed_units(tmp_path):
    trainer = Trainer(autoprune_config(granularity="neuron", aux_l1=0.05, aux_lr=0.1),
                      tmp_path, progress=False)
    report = trainer.run()
    gates = {f"{name}.weight": layer.aux.detach() > 0
             for name, layer in gated_layers(trainer.model)}
    rows = {row["name"]: row for row in json.loads((tmp_path / "report.json").read_text())
            ["layers"]}
    assert sum(int((~g).sum()) for g in gates.values()) > 0, "no unit was switched off"
    for name, gate in gates.items():
        row = rows[name]
        assert row["units_zero"] >= int((~gate).sum())
        fan_in = row["params"] // row["units_total"]
        assert row["nonzero"] <= int(gate.sum()) * fan_in
    assert report["params_nonzero"] < report["params_total"]


def test_target_check_every_freezes_the_gates_within_the_epoch(tmp_path):
    """``target_check_every = 1``: the gates stop at the first gate step after which the
    reported compression meets the target, so the epoch ends near the target; checked only at
    the epoch end, the same run overshoots it.  Oracle: the report's own measurement of the
    model after every gate step."""
    target = 3.0
    measured: list[tuple[float, list[torch.Tensor]]] = []
    trainer = Trainer(autoprune_config(aux_l1=0.05, aux_lr=0.5, target_compression=target,
                                       target_check_every=1), tmp_path / "k1", progress=False)
    method, step = trainer.method, trainer.method.train_step

    def recording_step(x, y):
        out = step(x, y)
        rate = trainer.report()["compression_rate"]
        measured.append((rate, [layer.aux.detach().clone()
                                for _, layer in gated_layers(trainer.model)]))
        return out

    method.train_step = recording_step
    trainer.run(max_epochs=1)
    rates = [rate for rate, _ in measured]
    first = next(i for i, rate in enumerate(rates) if rate >= target)
    assert 0 < first < len(rates) - 1, "the target must be met inside the epoch for this test"
    for _, aux in measured[first + 1:]:          # no gate moved after the target was met
        for a, b in zip(aux, measured[first][1], strict=True):
            assert torch.equal(a, b)
    assert method.frozen_at == 1
    assert rates[-1] == rates[first]     # frozen gates: the support no longer changes

    # Until the target is met both runs take the same steps; checked only at the epoch end,
    # the gates keep moving: the run ends past the stop by more than any one gate step moved
    # the compression before it (the granularity of the per-step check).
    epoch_end_only = Trainer(autoprune_config(aux_l1=0.05, aux_lr=0.5, target_compression=target),
                             tmp_path / "k0", progress=False)
    late = epoch_end_only.run(max_epochs=1)["compression_rate"]
    assert epoch_end_only.method.frozen_at == 1
    largest_step = max(b - a for a, b in zip(rates[:first], rates[1 : first + 1], strict=True))
    assert late - rates[first] > largest_step > 0


def test_aux_l1_ramp_epoch0_equals_a_run_at_the_ramped_strength(tmp_path):
    """With ``aux_l1_ramp_epochs = 4`` the first epoch runs at a quarter of ``aux_l1``: its
    weights and gates equal, bit for bit, those of an unramped run at that strength."""
    def first_epoch(name, **autoprune):
        trainer = Trainer(autoprune_config(aux_lr=0.5, **autoprune), tmp_path / name,
                          progress=False)
        trainer.run(max_epochs=1)
        return trainer.model.state_dict()

    ramped = first_epoch("ramped", aux_l1=0.08, aux_l1_ramp_epochs=4)
    plain = first_epoch("plain", aux_l1=0.02)
    full = first_epoch("full", aux_l1=0.08)
    assert ramped.keys() == plain.keys()
    for key in ramped:
        assert torch.equal(ramped[key], plain[key]), key
    assert any(not torch.equal(ramped[k], full[k]) for k in ramped if k.endswith(".aux"))


def test_aux_l1_ramp_reaches_full_strength_and_gate_steps_use_it(tmp_path):
    """The L1 every gate step applies: ``aux_l1 · (epoch + 1) / R`` until epoch R - 1, then
    ``aux_l1``; fine-tuning takes no gate step."""
    trainer = Trainer(autoprune_config(aux_l1=0.08, aux_l1_ramp_epochs=2), tmp_path,
                      progress=False)
    method = trainer.method
    used: list[tuple[int, float]] = []
    step = method.aux_opt.step

    def recording_step(*args, **kwargs):
        used.append((method._epoch, method.aux_opt.param_groups[0]["lambda1"]))
        return step(*args, **kwargs)

    method.aux_opt.step = recording_step
    trainer.run()
    per_epoch: dict[int, set[float]] = {}
    for epoch, lam in used:
        per_epoch.setdefault(epoch, set()).add(lam)
    assert per_epoch == {0: {0.04}, 1: {0.08}}


def test_aux_l1_ramp_resumes_bitwise(tmp_path):
    """Cut after epoch 1 of a 3-epoch ramp, resumed: the same weights and gates as one run."""
    full_and_resumed(autoprune_config(aux_l1=0.06, aux_l1_ramp_epochs=3, aux_lr=0.5), tmp_path, 1)


def test_target_compression_freezes_gates(tmp_path):
    trainer = Trainer(autoprune_config(aux_l1=0.02, target_compression=1.0001), tmp_path,
                      progress=False)
    trainer.run(max_epochs=1)
    frozen = [layer.aux.detach().clone() for _, layer in gated_layers(trainer.model)]
    assert trainer.method.frozen_at == 1
    trainer.run()
    for before, (_, layer) in zip(frozen, gated_layers(trainer.model), strict=True):
        assert torch.equal(before > 0, layer.aux.detach() > 0)


@pytest.mark.parametrize("model, lr", [("lenet300", 0.05), ("lenet5", 0.01)])
def test_frozen_gates_take_no_gradient_and_leave_the_run_as_it_was(tmp_path, monkeypatch,
                                                                   model, lr):
    """From the freeze on, the gates take no gradient: the fine-tuning steps' backward passes
    leave ``aux.grad`` unset, as they do after a resume into fine-tuning.  Oracle: the same
    run whose gates keep taking gradients through the gated op while frozen; both end bit for
    bit alike (weights and gates) with the same metrics."""
    config = dict(model=model, lr=lr, aux_l1=0.02, target_compression=1.0001)
    held = Trainer(autoprune_config(**config), tmp_path / "held", progress=False)
    held.run(max_epochs=2)
    assert held.method.frozen_at == 1
    gated = [layer for _, layer in gated_layers(held.model)]
    assert all(not g.aux.requires_grad and g.aux.grad is None for g in gated)
    resumed = Trainer(autoprune_config(**config), tmp_path / "held", resume=True,
                      progress=False)
    report = resumed.run()
    assert all(not g.aux.requires_grad and g.aux.grad is None
               for _, g in gated_layers(resumed.model))

    monkeypatch.setattr(AutoPruneMethod, "_hold_gates", lambda self: None)
    learning = Trainer(autoprune_config(**config), tmp_path / "learning", progress=False)
    oracle = learning.run()
    assert all(g.aux.requires_grad and g.aux.grad is not None
               for _, g in gated_layers(learning.model))
    assert oracle["gates_frozen_at_epoch"] == report["gates_frozen_at_epoch"] == 1
    for key in ("test_acc", "val_acc", "params_nonzero", "gate_history"):
        assert report[key] == oracle[key], key
    for (name, a), (_, b) in zip(resumed.model.state_dict().items(),
                                 learning.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_target_met_is_reported_and_a_missed_one_warns(tmp_path):
    """Met: ``budget_met_at_epoch`` is the freeze.  Missed (twice the rate a run reaches when
    its 2-epoch gating budget ends): a warning names the target and the rate reached, the gates
    freeze at the budget's end, the report and the summary say not met, and the run is the
    same, bit for bit, as the one without a target.  Oracle: that run's report."""
    met = Trainer(autoprune_config(aux_l1=0.02, target_compression=1.0001), tmp_path / "met",
                  progress=False).run()
    assert met["budget_met_at_epoch"] == met["gates_frozen_at_epoch"] == 1
    assert met["compression_rate"] >= 1.0001

    free = Trainer(autoprune_config(aux_l1=0.02), tmp_path / "free", progress=False).run()
    target = 2 * free["compression_rate"]
    trainer = Trainer(autoprune_config(aux_l1=0.02, target_compression=target),
                      tmp_path / "missed", progress=False)
    report, missed = run_and_budget_warnings(trainer)
    assert missed == [f"autoprune: the pruning phase ended after epoch 2 without meeting "
                      f"target_compression {target:g} (reached {free['compression_rate']:.1f}x); "
                      f"the remaining epochs fine-tune the support as it is"]
    assert report["gates_frozen_at_epoch"] == 2 and report["budget_met_at_epoch"] is None
    assert report["test_acc"] == free["test_acc"]
    assert report["params_nonzero"] == free["params_nonzero"]
    assert summary_table(report).splitlines()[4] == f"budget compression >= {target:g}x: NOT met"
    assert "budget" not in summary_table(free)


def test_start_from_pretrained_run(tmp_path):
    dense = Trainer(from_dict({
        "model": "lenet300", "method": "magnitude", "threads": 1,
        "data": {"dataset": "mnist", "val_size": 2000},
        "optim": {"epochs": 1, "max_steps_per_epoch": 20},
        "magnitude": {"target_compression": 1.0, "finetune_epochs": 0},
    }), tmp_path / "dense", progress=False)
    dense.run()
    config = autoprune_config()
    config.autoprune.pretrained = str(tmp_path / "dense")
    config.optim.epochs = 1
    config.autoprune.finetune_epochs = 0
    trainer = Trainer(config, tmp_path / "ap", progress=False)
    for name, value in dense.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], value), name
    config.autoprune.pretrained = str(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        Trainer(config, tmp_path / "ap2", progress=False)


def test_gate_options_reach_every_gated_layer(tmp_path):
    trainer = Trainer(autoprune_config(ste="leaky_relu", slope=0.2, update="bnn"), tmp_path,
                      progress=False)
    layers = [layer for _, layer in gated_layers(trainer.model)]
    assert len(layers) == 3
    assert all(layer.slope == 0.2 and layer.ste == "leaky_relu" and layer.update == "bnn"
               for layer in layers)


def test_skipped_layers_stay_plain_and_unknown_names_are_rejected(tmp_path):
    trainer = Trainer(autoprune_config(skip_layers=["body.1"]), tmp_path / "a", progress=False)
    gated = [name for name, _ in gated_layers(trainer.model)]
    assert gated == ["body.3", "body.5"]
    assert type(trainer.model.body[1]) is torch.nn.Linear
    with pytest.raises(ValueError, match="skip_layers"):
        Trainer(autoprune_config(skip_layers=["body.9"]), tmp_path / "b", progress=False)
