"""The step-level cvgrad API (:class:`cvsparse.CVGradOptimizer`) in a training loop of the
user's own: it reproduces :func:`cvsparse.compress` bit for bit, its state round-trips, and with
λ = 0 it is ``torch.optim.SGD``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import cvsparse
from cvsparse import AutoPruneOptimizer, AutoPruneSettings, CVGradOptimizer, CVGradSettings

from .synthetic_data import synthetic


class Net(nn.Module):
    """A user's own module: conv, BatchNorm, pooling, two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1)
        return self.fc2(F.relu(self.fc1(h)))


LR, EPOCHS, OUTER, ONLINE, HYPER_BATCHES, THRESHOLD = 0.05, 2, 2, 3, 2, 1e-4
MILESTONES, GAMMA = [0.5, 0.75], 0.5   # powers of two: the scheduler's lr equals the loop's


def loaders() -> tuple[DataLoader, DataLoader]:
    return (DataLoader(synthetic(96, 0), batch_size=16),
            DataLoader(synthetic(48, 1), batch_size=16))


def user_loop(model: nn.Module, train: DataLoader, val: DataLoader) -> CVGradOptimizer:
    """The schedule of ``compress(method="cvgrad")`` written with the step-level API: OUTER
    outer iterations of EPOCHS epochs, the lr stepped by a torch scheduler restarted with each,
    thresholding from the second epoch, a hyper step every ONLINE training steps on the next
    validation batch, and HYPER_BATCHES of them at each outer iteration's end."""
    opt = CVGradOptimizer(model, lr=LR, momentum=0.9, settings=CVGradSettings(lambda1=1e-3))
    steps = 0
    for outer in range(OUTER):
        for group in opt.param_groups:
            group["lr"] = LR
        milestones = [int(f * EPOCHS) for f in MILESTONES]
        schedule = torch.optim.lr_scheduler.MultiStepLR(opt.optimizer, milestones, GAMMA)
        for inner in range(EPOCHS):
            epoch = outer * EPOCHS + inner
            opt.param_groups[0]["threshold"] = THRESHOLD if epoch >= 1 else None
            online = iter(val)
            model.train()
            for x, y in train:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                steps += 1
                if steps % ONLINE == 0:
                    opt.hyper_step(next(online))
            schedule.step()
        for i, batch in enumerate(val):
            if i < HYPER_BATCHES:
                opt.hyper_step(batch)
    return opt


def test_a_user_loop_reproduces_compress_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = Net()
    mine = copy.deepcopy(model)
    train, val = loaders()
    result = cvsparse.compress(
        model, train, val, method="cvgrad", epochs=EPOCHS, seed=0,
        config={"optim": {"lr": LR, "milestones": MILESTONES, "gamma": GAMMA},
                "cvgrad": {"outer": OUTER, "lambda1": 1e-3, "online_every": ONLINE,
                           "hyper_batches": HYPER_BATCHES, "threshold": THRESHOLD,
                           "threshold_start_epoch": 1}})
    opt = user_loop(mine, train, val)
    for (name, a), b in zip(result.model.state_dict().items(), mine.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    history = result.report["lambda_history"][-1]
    assert history["lambda1"] == opt.lambdas.lambda1.tolist()
    assert history["lambda2"] == opt.lambdas.lambda2.tolist()
    assert history["lambda1"] != [1e-3]   # λ did move
    zeros = sum(int((p == 0).sum()) for p in opt.weights)
    assert zeros > 0 and result.report["params_nonzero"] == sum(p.numel()
                                                                for p in opt.weights) - zeros


def test_state_dict_round_trip_continues_the_same_run(tmp_path) -> None:
    torch.manual_seed(1)
    base = Net()
    train, val = loaders()
    batches = list(train)

    def run(model: nn.Module, opt: CVGradOptimizer, part: list) -> None:
        for x, y in part:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        opt.hyper_step(next(iter(val)))

    whole = copy.deepcopy(base)
    opt = CVGradOptimizer(whole, lr=0.05)
    run(whole, opt, batches[:3])
    run(whole, opt, batches[3:])

    first = copy.deepcopy(base)
    opt1 = CVGradOptimizer(first, lr=0.05)
    run(first, opt1, batches[:3])
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)   # no pickled objects
    state = (loaded["model"], loaded["opt"])
    second = Net()
    second.load_state_dict(state[0])
    opt2 = CVGradOptimizer(second, lr=0.05)
    opt2.load_state_dict(state[1])
    run(second, opt2, batches[3:])
    for a, b in zip(whole.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.lambdas.lambda1, opt2.lambdas.lambda1)
    assert opt2.param_groups[0]["lambda1"] == float(opt.lambdas.lambda1)


def test_without_lambda_it_is_torch_sgd_and_excluded_layers_are_never_shrunk() -> None:
    torch.manual_seed(2)
    ours, theirs = Net(), Net()
    theirs.load_state_dict(ours.state_dict())
    opt = CVGradOptimizer(ours, lr=0.05, momentum=0.9,
                          settings=CVGradSettings(lambda1=0.0, lambda2=0.0, log_space=False),
                          exclude=["fc2"])
    assert opt.names == ["conv.weight", "fc1.weight"]
    sgd = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    for x, y in DataLoader(synthetic(64, 3), batch_size=16):
        for model, step in ((ours, opt), (theirs, sgd)):
            step.zero_grad()
            F.cross_entropy(model(x), y).backward()
            step.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lambda_range_holds_lambda_within_its_factor_of_the_start() -> None:
    """Twelve hyper steps at hyper_lr 0.5 move λ by up to e^6 unbounded; with lambda_range 2
    every λ stays in [λ0/2, 2λ0], and the same steps take the unbounded λ outside it."""
    ranges = {}
    for factor in (None, 2.0):
        torch.manual_seed(0)
        model = Net()
        opt = CVGradOptimizer(model, lr=0.05,
                              settings=CVGradSettings(lambda1=1e-3, lambda2=1e-3,
                                                      lambda_range=factor))
        seen = []
        for batch in DataLoader(synthetic(192, 4), batch_size=16):
            opt.hyper_step(batch)
            seen += opt.lambdas.lambda1.tolist() + opt.lambdas.lambda2.tolist()
        ranges[factor] = (min(seen), max(seen))
    low, high = ranges[2.0]
    assert 5e-4 <= low and high <= 2e-3
    low, high = ranges[None]
    assert low < 5e-4 or high > 2e-3


def test_a_curvature_estimator_without_training_batches_is_refused() -> None:
    model = Net()
    opt = CVGradOptimizer(model, lr=0.05, settings=CVGradSettings(estimator="cg"))
    val = next(iter(loaders()[1]))
    with pytest.raises(ValueError, match="needs training batches"):
        opt.hyper_step(val)
    assert model.training


def test_names_and_include_are_exclusive() -> None:
    with pytest.raises(ValueError, match="not both"):
        CVGradOptimizer(Net(), lr=0.1, names=["fc1.weight"], include=["fc1"])


AP_LR, AP_EPOCHS = 0.05, 3


def test_an_autoprune_user_loop_reproduces_compress_bit_for_bit() -> None:
    """AutoPrune's schedule with the step-level API: a weight step on each training batch,
    then a gate step on the next gate batch (the gate batches cycled, restarted every epoch), the lr
    stepped by a torch scheduler; the stripped model equals compress's."""
    torch.manual_seed(3)
    model = Net()
    mine = copy.deepcopy(model)
    train, gates = loaders()
    val = DataLoader(synthetic(32, 4), batch_size=16)
    result = cvsparse.compress(
        model, train, val, method="autoprune", epochs=AP_EPOCHS, gate_loader=gates, seed=0,
        config={"optim": {"lr": AP_LR, "milestones": MILESTONES, "gamma": GAMMA},
                "autoprune": {"aux_l1": 5e-2, "finetune_epochs": 0}})

    torch.manual_seed(0)   # the gates' random init, drawn after compress seeds the run
    opt = AutoPruneOptimizer(mine, lr=AP_LR, settings=AutoPruneSettings(aux_l1=5e-2))
    milestones = [int(f * AP_EPOCHS) for f in MILESTONES]
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt.weight_opt, milestones, GAMMA)
    for _ in range(AP_EPOCHS):
        mine.train()
        gate_batches = iter(gates)
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(mine(x), y).backward()
            opt.step()
            try:
                xg, yg = next(gate_batches)
            except StopIteration:   # the gate half is cycled
                gate_batches = iter(gates)
                xg, yg = next(gate_batches)
            opt.zero_grad()
            F.cross_entropy(mine(xg), yg).backward()
            opt.gate_step()
        schedule.step()
    plain = opt.strip()
    assert not any(n.endswith(".aux") for n in plain.state_dict())
    for (name, a), b in zip(result.model.state_dict().items(), plain.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    zeros = sum(int((m.weight == 0).sum()) for m in plain.modules()
                if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert zeros > 0
    assert result.report["params_nonzero"] == result.report["params_total"] - zeros


def test_autoprune_gates_only_the_chosen_layers_and_its_state_loads_without_pickles(
        tmp_path) -> None:
    torch.manual_seed(4)
    model = Net()
    opt = AutoPruneOptimizer(model, lr=0.05, exclude=["conv"],
                             settings=AutoPruneSettings(skip_layers=["fc2"]))
    assert [n for n, _ in cvsparse.nn.gated_layers(model)] == ["fc1"]
    assert type(model.conv) is nn.Conv2d and type(model.fc2) is nn.Linear
    x, y = next(iter(loaders()[0]))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.gate_step()
    torch.save(opt.state_dict(), tmp_path / "ap.pt")
    again = AutoPruneOptimizer(copy.deepcopy(model), lr=0.05, exclude=["conv"],
                               settings=AutoPruneSettings(skip_layers=["fc2"]))
    again.load_state_dict(torch.load(tmp_path / "ap.pt", weights_only=True))
    for a, b in zip(opt.weight_opt.state.values(), again.weight_opt.state.values(),
                    strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    with pytest.raises(ValueError, match="not Conv2d / Linear layers"):
        AutoPruneOptimizer(Net(), lr=0.1, settings=AutoPruneSettings(skip_layers=["bn"]))
