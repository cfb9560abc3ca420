"""Learning-rate phases handed to ``torch.optim.lr_scheduler``.  Oracles: torch's own
``MultiStepLR`` / ``CosineAnnealingLR`` stepped on a separate optimizer, rates written out by
hand, and an uninterrupted run for a resumed one."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, MultiStepLR
from torch.utils.data import DataLoader, TensorDataset

import cvsparse
from cvsparse.config import OptimConfig
from cvsparse.methods.schedules import (
    FollowedLR,
    LRPhase,
    PhaseScheduler,
    recipe_scheduler,
)


def optimizer(lr: float = 1.0, groups: int = 1) -> torch.optim.SGD:
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]} for _ in range(groups)],
                           lr=lr)


def torch_rates(scheduler_of, epochs: int, lr: float) -> list[float]:
    """The rate of each epoch as torch schedules it: read, then step after the epoch."""
    opt = optimizer(lr)
    scheduler = scheduler_of(opt)
    rates = []
    for _ in range(epochs):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return rates


def phase_rates(factory, phases: list[LRPhase]) -> list[float]:
    """The rate of every epoch of consecutive ``phases`` through one :class:`PhaseScheduler`."""
    opt, schedule = optimizer(), PhaseScheduler(factory)
    rates = []
    for phase in phases:
        for epoch in range(phase.start, phase.start + phase.epochs):
            rates.append(schedule.enter(opt, epoch, phase))
            opt.step()
    return rates


def test_recipe_train_phase_is_multistep_lr():
    optim = OptimConfig(lr=0.1, milestones=[0.5, 0.75], gamma=0.1)
    got = phase_rates(recipe_scheduler(optim), [LRPhase("train", 0, 8, 0.1)])
    want = torch_rates(lambda o: MultiStepLR(o, milestones=[4, 6], gamma=0.1), 8, 0.1)
    assert got == pytest.approx(want, rel=1e-15)


def test_each_phase_restarts_its_schedule_at_its_base_rate():
    optim = OptimConfig(lr=0.1, milestones=[0.5], gamma=0.1, swa_epochs=2, swa_lr=0.003)
    phases = [LRPhase("train", 0, 4, 0.1), LRPhase("train", 4, 4, 0.1),
              LRPhase("finetune", 8, 6, 0.02), LRPhase("drive", 14, 2, 0.05)]
    got = phase_rates(recipe_scheduler(optim), phases)
    # fine-tuning: stepped over 6 − 2 epochs (the drop after 2), then the averaging window
    want = [0.1, 0.1, 0.01, 0.01] * 2 + [0.02, 0.02, 0.002, 0.002, 0.003, 0.003] + [0.05] * 2
    assert got == pytest.approx(want, rel=1e-14)


def test_followed_rates_are_taken_bit_for_bit():
    rates = (0.1, 0.1 * 0.1, 0.0123456789, 1e-7)
    opt = optimizer(groups=2)
    scheduler = FollowedLR(opt, rates)
    for rate in rates:
        assert [g["lr"] for g in opt.param_groups] == [rate, rate]
        opt.step()
        scheduler.step()


def test_entering_mid_phase_matches_the_uninterrupted_schedule_bitwise():
    """A resume rebuilds the phase's scheduler and steps it to the epoch; with a chainable
    scheduler (cosine) the rates must still be those of the run that never stopped."""
    def factory(opt, phase):
        return CosineAnnealingLR(opt, T_max=phase.epochs, eta_min=1e-4)

    phases = [LRPhase("train", 0, 7, 0.1), LRPhase("finetune", 7, 5, 0.01)]
    whole = phase_rates(factory, phases)
    assert whole[:7] == pytest.approx(
        torch_rates(lambda o: CosineAnnealingLR(o, T_max=7, eta_min=1e-4), 7, 0.1), rel=1e-15)
    for stop in (3, 7, 9):   # a fresh scheduler enters at epoch ``stop``
        opt, schedule = optimizer(lr=123.0), PhaseScheduler(factory)
        resumed = []
        for phase in phases:
            for epoch in range(max(stop, phase.start), phase.start + phase.epochs):
                resumed.append(schedule.enter(opt, epoch, phase))
                opt.step()
        assert resumed == whole[stop:], stop


def loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 10, generator=g)
    y = (x[:, 0] > 0).long()
    train = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8, shuffle=True)
    return train, DataLoader(TensorDataset(x[32:], y[32:]), batch_size=16)


def mlp() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 2))


def cosine(opt, phase):
    return CosineAnnealingLR(opt, T_max=phase.epochs)


@pytest.mark.parametrize("method, settings, lengths", [
    ("magnitude", {"target_compression": 3.0, "finetune_epochs": 2}, [3, 2]),
    ("cvgrad", {"outer": 2, "finetune_epochs": 2, "lambda1": 1e-3}, [3, 3, 2]),
])
def test_compress_runs_a_users_scheduler_in_every_phase(tmp_path, method, settings, lengths):
    train, val = loaders()
    run = cvsparse.compress(mlp(), train, val, method=method, epochs=3, lr=0.05,
                            lr_scheduler=cosine, out=tmp_path / "full", **settings)
    base = {"magnitude": [0.05, 0.05], "cvgrad": [0.05, 0.05, 0.05 * 0.1]}[method]
    want = []
    for length, lr in zip(lengths, base, strict=True):
        want += torch_rates(lambda o, n=length: CosineAnnealingLR(o, T_max=n), length, lr)
    assert [row["lr"] for row in run.history] == pytest.approx(want, rel=1e-12)

    class Stop(Exception):
        pass

    def dying(batches: int):
        for i, batch in enumerate(train):
            if i == batches:
                raise Stop
            yield batch

    class Dying:   # dies in the second epoch of the second phase
        def __init__(self) -> None:
            self.epoch = 0

        def __iter__(self):
            self.epoch += 1
            return dying(2 if self.epoch == 5 else 10**6)

    with pytest.raises(Stop):
        cvsparse.compress(mlp(), Dying(), val, method=method, epochs=3, lr=0.05,
                          lr_scheduler=cosine, out=tmp_path / "cut", **settings)
    resumed = cvsparse.compress(mlp(), train, val, resume=True, lr_scheduler=cosine,
                                out=tmp_path / "cut")
    assert [row["lr"] for row in resumed.history] == [row["lr"] for row in run.history]
    for (name, a), (_, b) in zip(run.model.state_dict().items(),
                                 resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
