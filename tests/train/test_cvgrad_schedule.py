"""cvgrad schedule options: λ warm-up, Adam betas, recoverable masks."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

from cvsparse.train import Trainer

from .test_trainer import full_and_resumed, tiny_config


def test_no_lambda_step_before_the_warmup_epoch(tmp_path):
    config = tiny_config(**{"cvgrad.online_every": 5, "cvgrad.hyper_warmup_epochs": 2,
                            "cvgrad.outer": 2})
    Trainer(config, tmp_path, progress=False).run()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    lam = [float(r["lambda1"]) for r in rows]
    assert lam[0] == lam[1] == pytest.approx(1e-4, rel=1e-12)   # epochs 0-1: no step at all
    assert lam[2] != lam[1]                                    # online steps from epoch 2 on


def test_hyper_betas_reach_the_lambda_optimizer(tmp_path):
    trainer = Trainer(tiny_config(**{"cvgrad.hyper_betas": [0.5, 0.9]}), tmp_path,
                      progress=False)
    assert trainer.method.lambdas.betas == (0.5, 0.9)


@pytest.mark.parametrize("overrides, message", [
    ({"cvgrad.hyper_betas": [0.9]}, "hyper_betas"),
    ({"cvgrad.hyper_warmup_epochs": -1}, "hyper_warmup_epochs"),
    ({"cvgrad.release_batches": 0}, "release_batches"),
    ({"cvgrad.val_objective": "accuracy"}, "val_objective"),
])
def test_bad_schedule_options_fail_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        Trainer(tiny_config(**overrides), tmp_path / "run", progress=False)


def test_release_unmasks_exactly_the_weights_whose_mean_gradient_beats_lambda1(tmp_path):
    trainer = Trainer(tiny_config(**{"cvgrad.lambda1": 3e-3}), tmp_path, progress=False)
    trainer.run(max_epochs=2)
    method = trainer.method
    state = method.optimizer.state
    masks_before = [state[p]["mask"].clone() for p in method.weights]
    assert any(bool((~m).any()) for m in masks_before)
    weights_before = [p.detach().clone() for p in method.weights]
    bufs_before = [state[p]["momentum_buffer"].clone() for p in method.weights]
    gen_state = method.data.hyper_generator.get_state()
    batches = 4

    released = method.release_masks(batches)

    # oracle: the same four batches as one big batch (equal sizes: mean of means = mean)
    method.data.hyper_generator.set_state(gen_state)
    seen = [b for _, b in zip(range(batches), method.data.train_for_hvp, strict=False)]
    x = torch.cat([b[0] for b in seen])
    y = torch.cat([b[1] for b in seen])
    method.model.eval()
    grads = torch.autograd.grad(F.cross_entropy(method.model(x), y), method.weights)
    method.model.train()
    lam1 = float(method.lambdas.lambda1)
    expected = 0
    for p, g, before, w, v in zip(method.weights, grads, masks_before, weights_before,
                                  bufs_before, strict=True):
        grow = ~before & (g.abs() > lam1)
        expected += int(grow.sum())
        assert torch.equal(state[p]["mask"], before | grow)
        assert torch.equal(p.detach(), w) and torch.equal(state[p]["momentum_buffer"], v)
    assert released == expected > 0
    assert method.model.training


def test_released_run_records_the_count_per_outer_iteration(tmp_path):
    config = tiny_config(**{"cvgrad.lambda1": 3e-3, "cvgrad.release_masks": True,
                            "cvgrad.release_batches": 3, "cvgrad.outer": 3})
    Trainer(config, tmp_path, progress=False).run()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    counts = [int(r["released"]) for r in rows]
    assert counts[0] == counts[1] == counts[3] == counts[5] == 0
    assert counts[2] > 0 or counts[4] > 0      # at the start of outer iterations 2 and 3



@pytest.mark.parametrize("lr", [0.05, 0.0005])
def test_lr_scaled_hyper_step_equals_sgd_on_the_scaled_hypergradient(tmp_path, lr):
    """With SGD on λ the step must be hyper_lr · (lr / optim.lr) · dcv/dλ1 exactly."""
    from cvsparse.hyper import hypergradient

    config = tiny_config(**{"cvgrad.lr_scaled_hyper": True, "cvgrad.hyper_method": "sgd",
                            "cvgrad.log_space": False, "cvgrad.hyper_clip": None,
                            "cvgrad.hyper_lr": 1e-3, "cvgrad.learn_lambda2": False})
    trainer = Trainer(config, tmp_path, progress=False)
    trainer.run(max_epochs=1)
    method = trainer.method
    method.optimizer.param_groups[0]["lr"] = lr
    batch = next(iter(method.data.val))
    method.model.eval()
    d1, _ = hypergradient(method.weights, float(method.lambdas.lambda1), 1e-4, lambda: None,
                          lambda: F.cross_entropy(method.model(batch[0]), batch[1]))
    before = float(method.lambdas.lambda1)
    method._hyper_step(batch)
    expected = max(0.0, before - 1e-3 * (lr / config.optim.lr) * float(d1))
    assert float(method.lambdas.lambda1) == pytest.approx(expected, rel=1e-9, abs=1e-18)
    assert float(method.lambdas.lambda1) != before


@pytest.mark.parametrize("finetune_lr, expected", [(None, 0.05 * 0.1), (0.02, 0.02)])
def test_finetune_starts_at_finetune_lr(tmp_path, finetune_lr, expected):
    config = tiny_config(**{"cvgrad.finetune_epochs": 1, "cvgrad.outer": 1,
                            "optim.finetune_lr": finetune_lr})
    Trainer(config, tmp_path, progress=False).run()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) == 3
    assert float(rows[2]["lr"]) == pytest.approx(expected, rel=1e-12)
    assert float(rows[0]["lr"]) == pytest.approx(0.05, rel=1e-12)


def test_robust_schedule_resumes_bitwise(tmp_path):
    """Warm-up, lr-scaled steps, β2 and mask release keep kill-and-resume exact."""
    options = {"cvgrad.online_every": 7, "cvgrad.hyper_warmup_epochs": 2,
               "cvgrad.lr_scaled_hyper": True, "cvgrad.hyper_betas": [0.9, 0.99],
               "cvgrad.release_masks": True, "cvgrad.release_batches": 3,
               "cvgrad.lambda1": 3e-3, "cvgrad.outer": 3}
    # cut after the release at the start of epoch 2
    full, resumed = full_and_resumed(tiny_config(**options), tmp_path, 3)
    assert torch.equal(full.method.lambdas.lambda1, resumed.method.lambdas.lambda1)
    rows = [list(csv.DictReader(open(tmp_path / d / "metrics.csv"))) for d in ("full", "cut")]
    assert [r["released"] for r in rows[0]] == [r["released"] for r in rows[1]]
