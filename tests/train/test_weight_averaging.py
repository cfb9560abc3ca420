"""Weight averaging of the fine-tuning phase (``optim.swa_epochs``, ``optim.swa_lr``).

Oracles: ``torch.optim.swa_utils.AveragedModel`` (uniform mean) and ``update_bn`` for the
averaging itself; the iterates recorded step by step during a real run for the trainer; a run cut
inside the window and resumed for the checkpoint.
"""

from __future__ import annotations

import copy
import csv

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from cvsparse.config import RunConfig
from cvsparse.train import Trainer
from cvsparse.train.averaging import WeightAverage

from .test_trainer import full_and_resumed, tiny_config


def small_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def sgd_iterates(model: nn.Module, steps: int):
    """Yield after each of ``steps`` SGD steps on random batches (so the weights really move)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        yield


def test_mean_and_batchnorm_match_torch_swa_utils():
    model = small_bn_net()
    oracle = AveragedModel(model)             # uniform mean; its first update copies
    average = WeightAverage(model, batches(), torch.device("cpu"))
    for _ in sgd_iterates(model, 5):
        average.update()
        oracle.update_parameters(model)
    assert average.count == 5
    update_bn(batches(), oracle)
    iterate = copy.deepcopy(model.state_dict())
    with average.applied():
        averaged = model.state_dict()
        for name, value in oracle.module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            # both are float32 running means of the same 5 iterates, updated by different
            # formulas (lerp vs AveragedModel's): a few roundings of 2⁻²⁴ relative apart
            torch.testing.assert_close(averaged[name], value, rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.equal(averaged["0.weight"], iterate["0.weight"])
    for name, value in model.state_dict().items():      # the iterate is back, bit for bit
        assert torch.equal(value, iterate[name]), name


def test_state_dict_round_trip_continues_the_same_mean():
    model = small_bn_net()
    a = WeightAverage(model, batches(), torch.device("cpu"))
    steps = sgd_iterates(model, 4)
    for _ in range(2):
        next(steps)
        a.update()
    b = WeightAverage(model, batches(), torch.device("cpu"))
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for _ in steps:
        a.update()
        b.update()
    assert a.count == b.count == 4
    for x, y in zip(a.mean, b.mean, strict=True):
        assert torch.equal(x, y)
    empty = WeightAverage(model, batches(), torch.device("cpu"))
    empty.load_state_dict(WeightAverage(model, [], torch.device("cpu")).state_dict())
    assert empty.count == 0
    with pytest.raises(RuntimeError, match="before any update"):
        empty.copy_to_model()


def swa_config(method: str, **overrides) -> RunConfig:
    """Two training epochs, then three fine-tuning epochs of which the last two average."""
    return tiny_config(**{
        "method": method, "optim.epochs": 2, "cvgrad.outer": 1,
        "cvgrad.finetune_epochs": 3, "autoprune.finetune_epochs": 3,
        "magnitude.finetune_epochs": 3, "magnitude.target_compression": 4.0,
        "autoprune.aux_l1": 0.05, "cvgrad.threshold_start_epoch": 0,
        "optim.swa_epochs": 2, "optim.swa_lr": 0.02, **overrides})


@pytest.mark.parametrize("method", ["cvgrad", "autoprune", "magnitude"])
def test_run_ends_with_the_mean_of_the_window_iterates(tmp_path, method):
    """The finished model is the mean of the weights after every training step of the last two
    epochs (recorded as the run goes), those epochs ran at swa_lr, and weights the support holds
    at zero stay exactly zero."""
    trainer = Trainer(swa_config(method), tmp_path, progress=False)
    recorded: list[list[torch.Tensor]] = []
    epochs: list[int] = []
    set_epoch, train_step = trainer.method.set_epoch, trainer.method.train_step

    def recording_set_epoch(epoch):
        epochs.append(epoch)
        return set_epoch(epoch)

    def recording_train_step(x, y):
        out = train_step(x, y)
        if epochs[-1] >= 3:
            recorded.append([p.detach().clone() for p in trainer.model.parameters()])
        return out

    trainer.method.set_epoch, trainer.method.train_step = recording_set_epoch, recording_train_step
    report = trainer.run()
    steps = trainer.config.optim.max_steps_per_epoch
    assert len(recorded) == 2 * steps == trainer.average.count
    for i, p in enumerate(trainer.model.parameters()):
        mean = torch.stack([r[i] for r in recorded]).mean(0)
        # a running mean over 2·steps = 30 float32 updates (lerp) against one stacked mean:
        # each update adds at most ~2⁻²³ relative, 30·1.2e-7 ≈ 4e-6 in all
        torch.testing.assert_close(p.detach(), mean, rtol=1e-5, atol=1e-6)
        always_zero = torch.stack([r[i] == 0 for r in recorded]).all(0)
        assert (p.detach()[always_zero] == 0).all()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [float(r["lr"]) for r in rows[3:]] == [0.02, 0.02]
    assert float(rows[2]["lr"]) != 0.02
    assert report["params_nonzero"] == int(rows[-1]["params_nonzero"])
    assert report["params_nonzero"] < report["params_total"]
    assert report["test_acc"] == float(rows[-1]["test_acc"])


def test_window_evaluates_the_mean_but_trains_the_iterate(tmp_path):
    """Inside the window the logged accuracy is that of the mean, while training continues from
    the iterate: a run stopped after the first averaging epoch holds the iterate and a mean of
    one epoch, and its logged test accuracy is the mean's."""
    from cvsparse import metrics

    trainer = Trainer(swa_config("cvgrad"), tmp_path, progress=False)
    trainer.run(max_epochs=4)
    assert trainer.average.count == trainer.config.optim.max_steps_per_epoch
    iterate = [p.detach().clone() for p in trainer.model.parameters()]
    assert any(not torch.equal(p, m) for p, m in zip(iterate, trainer.average.mean, strict=True))
    with trainer.average.applied():
        mean_acc = metrics.evaluate(trainer.model, trainer.test_loader, trainer.device)["acc"]
    assert trainer.rows[-1]["test_acc"] == mean_acc
    for p, q in zip(trainer.model.parameters(), iterate, strict=True):
        assert torch.equal(p, q)


def test_resume_inside_the_window_is_bitwise(tmp_path):
    full, resumed = full_and_resumed(swa_config("cvgrad"), tmp_path, stop_after=4)
    assert full.average.count == resumed.average.count
    for a, b in zip(full.average.mean, resumed.average.mean, strict=True):
        assert torch.equal(a, b)


def test_default_swa_lr_is_the_phase_first_lr(tmp_path):
    trainer = Trainer(swa_config("autoprune", **{"optim.swa_lr": None,
                                                 "optim.finetune_lr": 0.03}),
                      tmp_path, progress=False)
    trainer.run()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [float(r["lr"]) for r in rows[-2:]] == [0.03, 0.03]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"optim.swa_epochs": 4}, r"optim.swa_epochs must be an int in \[0, 3\]"),
    ({"optim.swa_epochs": -1}, "optim.swa_epochs"),
    ({"optim.swa_lr": 0.0}, "optim.swa_lr must be a finite number > 0"),
    ({"optim.swa_lr": float("nan")}, "optim.swa_lr"),
])
def test_bad_averaging_settings_fail_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        Trainer(swa_config("cvgrad", **overrides), tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()
