"""Each method driven by hand (set_epoch / train_step / end_epoch) on a small synthetic
in-memory dataset served by plain ``torch.utils.data.DataLoader``s or lists of batches: nothing
in the methods may assume cvsparse's own loader, the input shape comes from the batches, and
the loss is any ``loss_fn(outputs, targets)``."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cvsparse.config import from_dict
from cvsparse.methods import METHOD_CLASSES, RunData

from .synthetic_data import synthetic


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(x)).flatten(1))


def config(method: str, **section):
    values = {"method": method, "optim": {"epochs": 2, "lr": 0.05},
              "cvgrad": {"outer": 2, "lambda1": 1e-3, "threshold_start_epoch": 0,
                         "hyper_batches": 1},
              "autoprune": {"aux_l1": 1e-2, "finetune_epochs": 1},
              "magnitude": {"target_compression": 4.0, "finetune_epochs": 1}}
    values[method].update(section)
    return from_dict(values)


def drive(method: str, run_data: RunData, train, model: nn.Module, **section) -> list[dict]:
    """Every epoch of ``method`` over ``train``; the rows ``end_epoch`` returned."""
    cfg = config(method, **section)
    # the narrow constructor: the method's own section, optim and the epoch count
    m = METHOD_CLASSES[method](model, run_data, getattr(cfg, method), cfg.optim,
                               cfg.total_epochs)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # budgets missed on purpose
        for epoch in range(cfg.total_epochs):
            m.set_epoch(epoch)
            model.train()
            for x, y in train:
                m.train_step(x, y)
            rows.append(m.end_epoch(epoch))
    return rows, m


def loaders(kind: str):
    train, val = synthetic(96, 0), synthetic(32, 1)
    if kind == "dataloader":
        return (DataLoader(train, batch_size=16, shuffle=True),
                DataLoader(val, batch_size=16))
    return ([(train.tensors[0][i:i + 16], train.tensors[1][i:i + 16]) for i in range(0, 96, 16)],
            [(val.tensors[0][i:i + 16], val.tensors[1][i:i + 16]) for i in range(0, 32, 16)])


@pytest.mark.parametrize("kind", ["dataloader", "list"])
@pytest.mark.parametrize("budget", [None, 1e6])
def test_cvgrad_runs_every_epoch_on_plain_loaders(kind, budget):
    # the failure this guards against: epoch 2 read `.images` of the loader for the budget
    torch.manual_seed(0)
    train, val = loaders(kind)
    model = Small()
    rows, method = drive("cvgrad", RunData(val=val, train_for_hvp=train), train, model,
                         target_compression=budget, target_check_every=2 if budget else 0)
    assert len(rows) == 4
    assert method.input_shape() == (1, 8, 8)
    assert len(method.history) == 3   # the initial λ and one record per outer iteration
    assert any(int((p == 0).sum()) for p in method.weights)   # exact zeros: λ1 acted


@pytest.mark.parametrize("name", ["autoprune", "magnitude"])
def test_other_methods_run_on_plain_loaders(name):
    torch.manual_seed(0)
    train, val = loaders("dataloader")
    second = DataLoader(synthetic(48, 2), batch_size=16, shuffle=True)
    model = Small()
    rows, method = drive(name, RunData(val=val, train_for_hvp=train, second_half=second),
                         train, model, target_compression=2.0)
    assert len(rows) == 3
    measured = method.measured_model()
    zeros = sum(int((measured.get_submodule(n).weight == 0).sum()) for n in ("conv", "head"))
    assert zeros > 0


def test_input_shape_without_any_training_batch_comes_from_validation():
    # a method restored into its fine-tuning phase checks its budget before any step
    train, val = loaders("dataloader")
    cfg = config("cvgrad")
    method = METHOD_CLASSES["cvgrad"].from_config(cfg, Small(),
                                                  RunData(val=val, train_for_hvp=train))
    assert method.input_shape() == (1, 8, 8)


def test_loss_fn_drives_training_and_hyper_steps():
    torch.manual_seed(0)
    train, val = loaders("dataloader")
    calls = {"n": 0}

    def smoothed(outputs, targets):
        calls["n"] += 1
        return F.cross_entropy(outputs, targets, label_smoothing=0.1)

    steps = sum(1 for _ in train) * 4
    _, method = drive("cvgrad", RunData(val=val, train_for_hvp=train, loss_fn=smoothed),
                      train, Small())
    # every training step, and the validation loss of each of the two hyper steps (the identity
    # estimator needs no training loss)
    assert calls["n"] == steps + 2


def test_regularized_names_restrict_what_is_penalized():
    torch.manual_seed(0)
    train, val = loaders("dataloader")
    model = Small()
    head_before = model.head.weight.detach().clone()
    _, method = drive("cvgrad", RunData(val=val, train_for_hvp=train,
                                        regularized=["conv.weight"]),
                      train, model, lambda1=1e-1)
    assert method.names == ["conv.weight"]
    assert int((model.conv.weight == 0).sum()) > 0
    assert int((model.head.weight == 0).sum()) == 0   # trained, never shrunk to zero
    assert not torch.equal(model.head.weight, head_before)
