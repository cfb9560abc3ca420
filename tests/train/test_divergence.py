"""Divergence is a fault, not a result: a step with a non-finite (or exploding) loss, gradient or
hypergradient changes nothing and is counted; K in a row stop the run with exit 3 and a usable
checkpoint; a non-finite evaluation is never checkpointed; LeNet-5 trains at its default lr."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from cvsparse import faults
from cvsparse.config import RunConfig, resolve_defaults
from cvsparse.faults import Diverged, SkippedStep, StepGuard
from cvsparse.train import Trainer, checkpoint

from .cli_helpers import TINY, cli_env, one_line_error, run_cli, tiny_yaml
from .test_trainer import tiny_config


@pytest.fixture
def inject(monkeypatch):
    """``inject("loss", {2})``: the hook of ``$CVSPARSE_TEST_FAULTS`` poisons those calls."""
    monkeypatch.setattr(faults, "_CALLS", dict.fromkeys(faults.KINDS, 0))

    def plan(kind: str, calls: set[int]) -> None:
        monkeypatch.setattr(faults, "_PLAN", {kind: calls})

    return plan


def _everything(trainer: Trainer) -> str:
    """Digest of the weights, buffers, optimizer state (momentum, masks, λ) and method state."""
    return checkpoint.digest({"model": trainer.model.state_dict(),
                              "method": trainer.method.state_dict()})


@pytest.mark.parametrize("kind", ["loss", "grad"])
@pytest.mark.parametrize("method", ["cvgrad", "autoprune", "magnitude"])
def test_a_poisoned_step_changes_nothing_and_is_counted(tmp_path, inject, kind, method):
    trainer = Trainer(tiny_config(method=method), tmp_path, progress=False)
    trainer.method.set_epoch(0)
    batches = iter(trainer.train_loader)
    trainer._guarded_step(*next(batches))          # a healthy step first: momentum exists
    before = _everything(trainer)
    inject(kind, {faults._CALLS[kind] + 1})
    with pytest.raises(SkippedStep, match="NaN|nan"):
        trainer._guarded_step(*next(batches))
    assert _everything(trainer) == before
    assert trainer.guard.counts["step"] == 1 and trainer.guard.consecutive["step"] == 1
    trainer._guarded_step(*next(batches))          # the next step trains again
    assert _everything(trainer) != before and trainer.guard.consecutive["step"] == 0


def test_an_exploding_gradient_is_skipped_once_its_history_is_known(tmp_path, inject):
    trainer = Trainer(tiny_config(), tmp_path, progress=False)
    trainer.method.set_epoch(0)
    batches = iter(trainer.train_loader)
    for _ in range(faults.MIN_HISTORY):
        trainer._guarded_step(*next(batches))
    history = list(trainer.guard.grads[0])
    assert len(history) == faults.MIN_HISTORY and all(v > 0 for v in history)
    before = _everything(trainer)
    inject("gradx", {faults._CALLS["gradx"] + 1})    # every gradient x 1e9: finite, huge
    with pytest.raises(SkippedStep, match="above the limit"):
        trainer._guarded_step(*next(batches))
    assert _everything(trainer) == before and trainer.guard.counts["step"] == 1


def test_proxsgd_refuses_a_gradient_above_its_limit_and_changes_nothing():
    from cvsparse.faults import ExplodingGradientError
    from cvsparse.optim import ProxSGD

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = ProxSGD([w], lr=0.1, momentum=0.9)
    w.grad = torch.tensor([0.5, -3.0])
    opt.grad_norm_limit = 2.5
    with pytest.raises(ExplodingGradientError, match="3 is above the limit 2.5"):
        opt.step()
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0])) and not opt.state[w]
    opt.grad_norm_limit = 3.0
    opt.step()
    assert opt.last_grad_norm == 3.0 and not torch.equal(w.detach(), torch.tensor([1.0, -2.0]))


def test_a_poisoned_hypergradient_leaves_lambda_and_its_optimizer(tmp_path, inject):
    trainer = Trainer(tiny_config(), tmp_path, progress=False)
    method = trainer.method
    before = checkpoint.digest({"lambdas": method.lambdas.state_dict(),
                                "group": method.optimizer.param_groups[0]["lambda1"]})
    inject("hyper", {1})
    method._hyper_step(next(iter(trainer.val_loader)))
    after = checkpoint.digest({"lambdas": method.lambdas.state_dict(),
                               "group": method.optimizer.param_groups[0]["lambda1"]})
    assert after == before and trainer.guard.counts["hyper"] == 1
    method._hyper_step(next(iter(trainer.val_loader)))   # call 2 is not poisoned
    assert method.lambdas.state_dict()["step"] == 1 and trainer.guard.consecutive["hyper"] == 0


def test_guard_skips_exploding_losses_and_stops_after_k_in_a_row():
    guard = StepGuard(max_consecutive=3)
    for value in [2.0, 2.2, 1.9, 2.1, 2.0, 2.3, 1.8, 2.0, 2.1, 2.2]:
        guard.check_loss(torch.tensor(value))
    guard.check_loss(torch.tensor(2.0e4 - 1))          # below 1e4 x the median (2.05)
    with pytest.raises(SkippedStep, match="running median"):
        guard.check_loss(torch.tensor(2.1e4))
    quiet = StepGuard(max_consecutive=3)
    for _ in range(faults.MIN_HISTORY):
        quiet.check_loss(torch.tensor(1e-4))          # a well-fit network's losses
    quiet.check_loss(torch.tensor(2.0))                 # 2e4 x the median, but ordinary
    guard.skipped("step", "a")
    guard.skipped("step", "b")
    with pytest.raises(Diverged, match="3 consecutive training steps skipped, the last "
                                       "because c"):
        guard.skipped("step", "c")


def test_cli_stops_with_exit_3_and_resumes_from_the_last_good_epoch(tmp_path):
    """Training losses 8-10 poisoned (epoch 2, after steps 6-7) with K = 3: exit 3, one line,
    metrics and checkpoint of epoch 1 only; resuming without the fault ends bit for bit where
    an uninterrupted run ends."""
    config = tiny_yaml(tmp_path)
    full = run_cli("train", "--config", config, "--out", tmp_path / "full", "--quiet")
    assert full.returncode == 0, full.stderr
    out = tmp_path / "run"
    stopped = run_cli("train", "--config", config, "--max-skipped-steps", "3", "--out", out,
                      "--quiet", env=cli_env(**{faults.FAULTS_ENV: "loss:8-10"}))
    assert stopped.returncode == 3, stopped.stderr
    line = one_line_error(stopped)
    assert "3 consecutive training steps skipped" in line and "loss is nan" in line
    assert f"the last good epoch (1) is in {out}/checkpoint.pt" in line
    assert checkpoint.CheckpointStore(out).load()["epoch"] == 1
    assert [r["skipped_steps"] for r in csv.DictReader(open(out / "metrics.csv"))] == ["0"]
    resumed = run_cli("train", "--resume", out, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    got = checkpoint.CheckpointStore(out).load()["model"]
    for name, tensor in checkpoint.CheckpointStore(tmp_path / "full").load()["model"].items():
        assert torch.equal(got[name], tensor), name


def test_skipped_steps_are_counted_in_metrics(tmp_path):
    result = run_cli("train", "--config", tiny_yaml(tmp_path), "--out", tmp_path / "run",
                     "--quiet", env=cli_env(**{faults.FAULTS_ENV: "loss:2,grad:3-4"}))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["skipped_steps"]) for r in rows] == [3, 0]


def test_a_non_finite_evaluation_is_never_checkpointed(tmp_path):
    config = tiny_config(**{"optim.max_skipped_steps": 1000})
    trainer = Trainer(config, tmp_path, progress=False)
    trainer.run(max_epochs=1)
    good = (tmp_path / checkpoint.CHECKPOINT_NAME).read_bytes()
    with torch.no_grad():
        trainer.method.weights[0].fill_(float("nan"))   # every later loss is NaN
    with pytest.raises(Diverged, match="epoch 2 evaluated to a non-finite loss"):
        trainer.run()
    assert (tmp_path / checkpoint.CHECKPOINT_NAME).read_bytes() == good
    assert len(list(csv.DictReader(open(tmp_path / "metrics.csv")))) == 1


def test_lenet5_trains_at_its_default_lr(tmp_path):
    assert resolve_defaults(RunConfig(model="lenet5")).optim.lr == 0.01
    assert resolve_defaults(RunConfig()).optim.lr == 0.1
    values = {**TINY, "model": "lenet5", "optim": {"epochs": 1, "max_steps_per_epoch": 60}}
    recipe = tmp_path / "lenet5.yaml"
    recipe.write_text(yaml.safe_dump(values))   # no lr: the model's default
    result = run_cli("train", "--config", recipe, "--out", tmp_path / "run", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["optim"]["lr"] == 0.01
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert all(int(r["skipped_steps"]) == 0 for r in rows)
    assert float(rows[-1]["test_acc"]) > 0.5   # far above chance (0.1)


def test_lenet5_at_lr_0_1_stops_with_exit_3_and_no_false_checkpoint(tmp_path):
    """The issue's case: LeNet-5 at lr 0.1 diverges within its first steps; the run stops
    with exit 3 and one line, and no epoch is checkpointed as good."""
    values = {**TINY, "model": "lenet5", "optim": {"epochs": 1, "max_steps_per_epoch": 60}}
    recipe = tmp_path / "lenet5.yaml"
    recipe.write_text(yaml.safe_dump(values))
    out = tmp_path / "run"
    result = run_cli("train", "--config", recipe, "--lr", "0.1", "--out", out, "--quiet")
    assert result.returncode == 3, result.stderr
    line = one_line_error(result)
    assert "consecutive training steps skipped" in line and "nothing was checkpointed" in line
    assert not (out / checkpoint.CHECKPOINT_NAME).exists()


def test_an_exploding_hypergradient_is_skipped_once_its_history_is_known(tmp_path, inject):
    """After MIN_HISTORY ordinary hyper steps, one whose hypergradient is 1e9 x larger (finite)
    leaves λ and its optimizer as they were and is counted; the next one goes through."""
    trainer = Trainer(tiny_config(), tmp_path, progress=False)
    method = trainer.method
    batches = iter(trainer.val_loader)
    batch = next(batches)
    for _ in range(faults.MIN_HISTORY):
        method._hyper_step(batch)
    assert trainer.guard.counts["hyper"] == 0
    before = checkpoint.digest({"lambdas": method.lambdas.state_dict(),
                                "group": method.optimizer.param_groups[0]["lambda1"]})
    inject("hyperx", {faults._CALLS["hyperx"] + 1})
    method._hyper_step(batch)
    after = checkpoint.digest({"lambdas": method.lambdas.state_dict(),
                               "group": method.optimizer.param_groups[0]["lambda1"]})
    assert after == before and trainer.guard.counts["hyper"] == 1
    method._hyper_step(batch)
    assert trainer.guard.consecutive["hyper"] == 0
    assert method.lambdas.state_dict()["step"] == faults.MIN_HISTORY + 1


def test_guard_judges_hypergradients_against_their_running_median():
    guard = StepGuard(max_consecutive=3)
    with pytest.raises(SkippedStep, match="hypergradient is nan"):
        guard.check_hypergradient(torch.tensor([1.0, float("nan")]), torch.zeros(2))
    for scale in [1.0, 1.2, 0.9, 1.1, 1.0, 1.3, 0.8, 1.0, 1.1, 1.2]:
        guard.check_hypergradient(torch.tensor([scale, -0.5]), torch.tensor([0.1]))
    guard.check_hypergradient(torch.tensor([0.0]), torch.tensor([-1.05e4 + 1]))  # < 1e4 x 1.05
    with pytest.raises(SkippedStep, match="running median"):   # the median is now 1.1
        guard.check_hypergradient(torch.tensor([1.1e4 + 1]), torch.tensor([0.0]))
    state = guard.state_dict()
    restored = StepGuard(max_consecutive=3)
    restored.load_state_dict(state)
    assert list(restored.hypers) == list(guard.hypers) and len(guard.hypers) == 11
