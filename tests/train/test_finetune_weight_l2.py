"""``optim.finetune_weight_l2``: the weight L2 of the fine-tuning phase, for every method.

Oracle: one fine-tuning step of the method's weight optimizer against the hand-written update
of docs/method.md §2 with λ1 = 0 (``d = g + λ2·w; v = μ·v + d; w = (w − lr·v)·mask``), computed
from the same batch's gradients, with λ2 the fine-tuning value; the training-phase value must
not fit.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from cvsparse.methods.base import supervised_step
from cvsparse.train import Trainer

from .test_trainer import tiny_config

TRAIN_L2 = 0.5     # large, so a step taken with the wrong λ2 is far from the oracle


def finetuning_trainer(tmp_path, method: str, finetune_l2: float | None) -> Trainer:
    """A tiny run of ``method`` stopped right where its fine-tuning phase begins."""
    config = tiny_config(**{
        "method": method, "optim.finetune_weight_l2": finetune_l2, "optim.epochs": 1,
        "cvgrad.outer": 1, "cvgrad.lambda2": TRAIN_L2, "cvgrad.learn_lambda2": False,
        "cvgrad.finetune_epochs": 1, "cvgrad.threshold_start_epoch": 0,
        "autoprune.weight_l2": TRAIN_L2, "autoprune.finetune_epochs": 1,
        "autoprune.aux_l1": 0.05,
        "magnitude.weight_l2": TRAIN_L2, "magnitude.finetune_epochs": 1,
        "magnitude.target_compression": 4.0,
    })
    trainer = Trainer(config, tmp_path, progress=False)
    trainer.run(max_epochs=1)
    trainer.method.set_epoch(1)      # the first fine-tuning epoch
    return trainer


def weight_optimizer(trainer: Trainer):
    method = trainer.method
    return method.weight_opt if method.name == "autoprune" else method.optimizer


def step_against_oracle(
    trainer: Trainer,
) -> tuple[torch.Tensor, Callable[[float], torch.Tensor]]:
    """Take one step of the weight group; return its result (all weight tensors flattened and
    concatenated) and the oracle: λ2 ↦ the hand-written step from the same starting state."""
    opt = weight_optimizer(trainer)
    group = opt.param_groups[0]
    lr, mu = group["lr"], group["momentum"]
    assert float(group["lambda1"]) == 0.0      # fine-tuning: no L1 on the weights
    x, y = next(iter(trainer.train_loader))
    trainer.model.zero_grad(set_to_none=True)
    F.cross_entropy(trainer.model(x), y).backward()
    before = [(p.detach().clone(), p.grad.detach().clone(),
               *(None if opt.state[p].get(k) is None else opt.state[p][k].clone()
                 for k in ("momentum_buffer", "mask")))
              for p in group["params"]]
    supervised_step(trainer.model, opt, x, y)
    after = torch.cat([p.detach().flatten() for p in group["params"]])

    def oracle(l2: float) -> torch.Tensor:
        out = []
        for w, g, v, mask in before:
            d = g + l2 * w
            v = d if v is None else mu * v + d
            z = w - lr * v
            out.append((z if mask is None else z * mask).flatten())
        return torch.cat(out)

    return after, oracle


@pytest.mark.parametrize("method", ["cvgrad", "autoprune", "magnitude"])
@pytest.mark.parametrize("finetune_l2", [0.0, 1e-3])
def test_finetuning_step_uses_finetune_weight_l2(tmp_path, method, finetune_l2):
    trainer = finetuning_trainer(tmp_path, method, finetune_l2)
    after, oracle = step_against_oracle(trainer)
    torch.testing.assert_close(after, oracle(finetune_l2), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(after, oracle(TRAIN_L2), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["cvgrad", "autoprune", "magnitude"])
def test_default_keeps_the_training_weight_l2(tmp_path, method):
    trainer = finetuning_trainer(tmp_path, method, None)
    after, oracle = step_against_oracle(trainer)
    torch.testing.assert_close(after, oracle(TRAIN_L2), rtol=1e-5, atol=1e-7)


def test_training_phase_is_untouched_by_the_option(tmp_path):
    """Before the fine-tuning phase both runs are the same run, bit for bit."""
    runs = [finetuning_trainer(tmp_path / str(v), "autoprune", v) for v in (None, 0.0)]
    for (name, a), (_, b) in zip(runs[0].model.state_dict().items(),
                                 runs[1].model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("value", [-1e-4, float("nan"), float("inf")])
def test_bad_finetune_weight_l2_fails_before_training(tmp_path, value):
    with pytest.raises(ValueError, match="finetune_weight_l2"):
        Trainer(tiny_config(**{"optim.finetune_weight_l2": value}), tmp_path, progress=False)
