"""The step-level magnitude baseline (:class:`cvsparse.MagnitudePruner`): its cut is
``torch.nn.utils.prune``'s global L1 cut, in place on any memory layout; pruned weights stay
zero; a user loop reproduces ``compress(method="magnitude")`` bit for bit; its state loads
without pickles."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import prune
from torch.utils.data import DataLoader

import cvsparse
from cvsparse import MagnitudePruner

from .synthetic_data import synthetic
from .test_step_optimizers import Net

LR, EPOCHS, FINETUNE, TARGET, L2 = 0.05, 3, 2, 4.0, 5e-4
MILESTONES, GAMMA = [0.5, 0.75], 0.5   # powers of two: the scheduler's lr equals the loop's


def torch_cut(model: Net, target: float) -> Net:
    """The oracle: ``torch.nn.utils.prune``'s global L1-unstructured cut on a contiguous copy."""
    out = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    layers = [(m, "weight") for m in out.modules() if isinstance(m, (torch.nn.Conv2d,
                                                                     torch.nn.Linear))]
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured,
                              amount=1 - 1 / target)
    for m, name in layers:
        prune.remove(m, name)
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_cut_is_torchs_global_l1_cut_in_place(channels_last: bool) -> None:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():   # many exact ties between magnitudes
        for p in model.parameters():
            p.copy_((p * 20).round() / 20)
    want = torch_cut(model, TARGET)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    pruner = MagnitudePruner(model, lr=LR)
    storage = model.conv.weight.data_ptr()
    pruner.prune(TARGET)
    cut = want.state_dict()   # (prune.remove re-registers each weight: compare by name)
    assert model.state_dict().keys() == cut.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, cut[name]), name
    assert model.conv.weight.data_ptr() == storage   # in place
    assert model.conv.weight.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    total = sum(p.numel() for p in pruner.weights)
    zeros = sum(int((p == 0).sum()) for p in pruner.weights)
    assert zeros >= round(total * (1 - 1 / TARGET))
    assert pruner.compression() == pytest.approx(total / (total - zeros))


def test_pruned_weights_stay_zero_with_their_momentum_cleared() -> None:
    torch.manual_seed(0)
    model = Net()
    pruner = MagnitudePruner(model, lr=LR, weight_l2=L2)
    x, y = synthetic(32, 0).tensors
    for _ in range(3):
        pruner.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pruner.step()
    pruner.prune(TARGET)
    pruned = [p == 0 for p in pruner.weights]
    for p, zero in zip(pruner.weights, pruned, strict=True):
        assert not pruner.optimizer.state[p]["momentum_buffer"][zero].any()
    for _ in range(3):
        pruner.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pruner.step()
    for p, zero in zip(pruner.weights, pruned, strict=True):
        assert not p[zero].any() and p[~zero].ne(0).all()


def user_loop(model: Net, train: DataLoader) -> MagnitudePruner:
    """``compress(method="magnitude")`` written with the step-level API: EPOCHS dense epochs
    (the lr stepped by a torch scheduler), the cut, FINETUNE epochs restarted at LR."""
    pruner = MagnitudePruner(model, lr=LR, weight_l2=L2)
    for epochs, cut_after in ((EPOCHS, True), (FINETUNE, False)):
        for group in pruner.param_groups:
            group["lr"] = LR
        milestones = [int(f * epochs) for f in MILESTONES]
        schedule = torch.optim.lr_scheduler.MultiStepLR(pruner.optimizer, milestones, GAMMA)
        for _ in range(epochs):
            model.train()
            for x, y in train:
                pruner.zero_grad()
                F.cross_entropy(model(x), y).backward()
                pruner.step()
            schedule.step()
        if cut_after:
            pruner.prune(TARGET)
    return pruner


def test_a_user_loop_reproduces_compress_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = Net()
    mine = copy.deepcopy(model)
    train = DataLoader(synthetic(96, 0), batch_size=16)
    val = DataLoader(synthetic(48, 1), batch_size=16)
    result = cvsparse.compress(
        model, train, val, method="magnitude", epochs=EPOCHS, seed=0,
        config={"optim": {"lr": LR, "milestones": MILESTONES, "gamma": GAMMA},
                "magnitude": {"target_compression": TARGET, "finetune_epochs": FINETUNE,
                              "weight_l2": L2}})
    pruner = user_loop(mine, train)
    for (name, a), b in zip(result.model.state_dict().items(), mine.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    zeros = sum(int((p == 0).sum()) for p in pruner.weights)
    assert result.report["params_nonzero"] == sum(p.numel() for p in pruner.weights) - zeros


def test_state_round_trip_without_pickles(tmp_path) -> None:
    torch.manual_seed(0)
    model = Net()
    pruner = MagnitudePruner(model, lr=LR, include=["fc1", "fc2"])
    assert pruner.names == ["fc1.weight", "fc2.weight"]
    x, y = synthetic(32, 0).tensors
    F.cross_entropy(model(x), y).backward()
    pruner.step()
    pruner.prune(TARGET)
    torch.save(pruner.state_dict(), tmp_path / "state.pt")
    again = MagnitudePruner(copy.deepcopy(model), lr=LR, include=["fc1", "fc2"])
    again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert again.pruned
    for a, b in zip(again.weights, pruner.weights, strict=True):
        assert torch.equal(again.optimizer.state[a]["mask"], pruner.optimizer.state[b]["mask"])
    with pytest.raises(ValueError, match=">= 1"):
        pruner.prune(0.5)
