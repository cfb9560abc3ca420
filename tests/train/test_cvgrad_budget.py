"""cvgrad with a compression budget: the L1 phase ends once the budget is met, and the epochs
left in the run fine-tune the support it reached."""

from __future__ import annotations

import csv

import pytest
import torch

from cvsparse.train import Trainer
from cvsparse.train.outputs import summary_table

from .test_trainer import full_and_resumed, run_and_budget_warnings, tiny_config

# λ1 high enough that the tiny run prunes a little more in every epoch
BASE = {"cvgrad.lambda1": 3e-3, "cvgrad.outer": 3, "cvgrad.finetune_epochs": 1,
        "cvgrad.learn_lambda2": False, "cvgrad.online_every": 5, "optim.finetune_lr": 0.01}


def rows(path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(path / "metrics.csv")))


def budget_config(**overrides):
    return tiny_config(**{**BASE, **overrides})


def test_budget_met_at_an_epoch_end_starts_fine_tuning_on_the_next_epoch(tmp_path):
    """Oracle: the same run without a budget.  The target is its compression after epoch 1;
    with that budget the run is the same, bit for bit, for epochs 0–1, then fine-tunes for the
    remaining 5 epochs: the schedule restarts at ``finetune_lr``, λ1 no longer moves, and the
    support (every zero weight) stays as it was at the stop."""
    free = Trainer(budget_config(), tmp_path / "free", progress=False)
    free.run()
    reference = rows(tmp_path / "free")
    rates = [float(r["compression_rate"]) for r in reference]
    assert rates[0] < rates[1] < rates[-1], "the run must keep pruning for this test"

    trainer = Trainer(budget_config(**{"cvgrad.target_compression": rates[1]}), tmp_path / "b",
                      progress=False)
    zeros_at_stop: list[torch.Tensor] = []
    end_epoch = trainer.method.end_epoch

    def recording_end(epoch):
        out = end_epoch(epoch)
        if epoch == 1:
            zeros_at_stop.extend(p.detach() == 0 for p in trainer.method.weights)
        return out

    trainer.method.end_epoch = recording_end
    report = trainer.run()
    budget = rows(tmp_path / "b")

    assert trainer.method.stopped_at == 2 and report["budget_met_at_epoch"] == 2
    assert len(budget) == len(reference) == 7               # the epoch budget is unchanged
    for a, b in zip(budget[:2], reference[:2], strict=True):
        assert a == {**b, "wall_time_s": a["wall_time_s"]}
    assert [float(r["lr"]) for r in budget[2:]] == pytest.approx(
        [0.01, 0.01, 0.001, 1e-4, 1e-4])   # milestones 0.5, 0.75 of 5 epochs: epochs 2 and 3
    assert len({r["lambda1"] for r in budget[1:]}) == 1     # no hyper step after the stop
    assert {r["params_nonzero"] for r in budget[2:]} == {budget[1]["params_nonzero"]}
    for was_zero, p in zip(zeros_at_stop, trainer.method.weights, strict=True):
        assert torch.all(p.detach()[was_zero] == 0)
        assert bool((p.detach()[~was_zero] != 0).all())    # λ1 = 0: nothing else shrinks to 0
    assert float(budget[-1]["compression_rate"]) < rates[-1]


def test_budget_checked_every_k_steps_stops_inside_the_epoch(tmp_path):
    """``target_check_every = 1``: the L1 phase ends at the first step after which the
    reported compression meets the target; from then on no weight becomes zero and λ1 stays
    put, so epoch 0 ends at the rate of that step.  Checked only at the epoch end, the same run
    overshoots.  Oracle: the report's measurement of the model after every step."""
    early = {"cvgrad.threshold_start_epoch": 0}   # thresholding prunes from the first step
    free = Trainer(budget_config(**early), tmp_path / "free", progress=False)
    free.run(max_epochs=1)
    end_of_epoch0 = float(rows(tmp_path / "free")[0]["compression_rate"])
    target = 1 + (end_of_epoch0 - 1) / 2

    trainer = Trainer(budget_config(**early, **{"cvgrad.target_compression": target,
                                                "cvgrad.target_check_every": 1}),
                      tmp_path / "k1", progress=False)
    method, step = trainer.method, trainer.method.train_step
    measured: list[tuple[float, int, float]] = []

    def recording_step(x, y):
        out = step(x, y)
        zeros = sum(int((p.detach() == 0).sum()) for p in method.weights)
        measured.append((trainer.report()["compression_rate"], zeros,
                         float(method.lambdas.lambda1)))
        return out

    method.train_step = recording_step
    trainer.run(max_epochs=1)
    first = next(i for i, (rate, _, _) in enumerate(measured) if rate >= target)
    assert 0 < first < len(measured) - 1, "the budget must be met inside the epoch"
    assert {z for _, z, _ in measured[first:]} == {measured[first][1]}
    assert {lam for _, _, lam in measured[first:]} == {measured[first][2]}
    assert method.stopped_at == 1
    assert float(rows(tmp_path / "k1")[0]["compression_rate"]) == pytest.approx(measured[first][0])
    # the epoch-end check's overshoot: the free run (the same steps until the stop) ends past
    # the stop by more than any one step moved the compression before it
    rates = [rate for rate, _, _ in measured]
    largest_step = max(b - a for a, b in zip(rates[:first], rates[1 : first + 1], strict=True))
    assert end_of_epoch0 - rates[first] > largest_step > 0


def test_resume_after_the_budget_stop_is_bitwise(tmp_path):
    """Cut one epoch into fine-tuning (λ1 must not come back with the optimizer state)."""
    free = Trainer(budget_config(), tmp_path / "free", progress=False)
    free.run(max_epochs=2)
    target = float(rows(tmp_path / "free")[1]["compression_rate"])
    full, resumed = full_and_resumed(budget_config(**{"cvgrad.target_compression": target}),
                                     tmp_path, stop_after=3)
    assert full.method.stopped_at == resumed.method.stopped_at == 2
    assert resumed.method.optimizer.param_groups[0]["lambda1"] == 0.0


def test_budget_is_not_checked_before_thresholding_starts(tmp_path):
    """Epoch 0 has no thresholding (``threshold_start_epoch = 1``): its proximal zeros meet the
    target, yet the L1 phase goes on and ends at the end of epoch 1, the first checked."""
    free = Trainer(budget_config(), tmp_path / "free", progress=False)
    free.run(max_epochs=1)
    target = float(rows(tmp_path / "free")[0]["compression_rate"])
    assert target > 1, "epoch 0 must leave proximal zeros for this test"
    trainer = Trainer(budget_config(**{"cvgrad.target_compression": target,
                                       "cvgrad.target_check_every": 1}),
                      tmp_path / "b", progress=False)
    trainer.run(max_epochs=3)
    assert trainer.method.stopped_at == 2


def test_flops_budget_ends_the_l1_phase(tmp_path):
    free = Trainer(budget_config(), tmp_path / "free", progress=False)
    free.run(max_epochs=2)
    report = free.report()
    fraction = report["flops_effective"] / report["flops_dense"]
    trainer = Trainer(budget_config(**{"cvgrad.target_flops": fraction}), tmp_path / "f",
                      progress=False)
    trainer.run(max_epochs=3)
    assert trainer.method.stopped_at == 2 and trainer.method.finetuning


def test_budget_missed_warns_and_reports_it(tmp_path):
    """A budget the run cannot meet (twice its final compression, or a FLOPs fraction below
    what it keeps): a warning names the target and how far the run got, the report says not
    met, and the run is otherwise the run without a budget, bit for bit.  Oracle: that run."""
    free = Trainer(budget_config(), tmp_path / "free", progress=False)
    free_report = free.run()
    reached = free_report["compression_rate"]
    kept = free_report["flops_effective"] / free_report["flops_dense"]
    trainer = Trainer(budget_config(**{"cvgrad.target_compression": 2 * reached,
                                       "cvgrad.target_flops": kept / 2}),
                      tmp_path / "b", progress=False)
    report, missed = run_and_budget_warnings(trainer)
    assert missed == [f"cvgrad: the pruning phase ended after epoch 6 without meeting "
                      f"target_compression {2 * reached:g} (reached {reached:.1f}x) or "
                      f"target_flops {kept / 2:g} (reached {kept:.4f} of the dense FLOPs); "
                      f"the remaining epochs fine-tune the support as it is"]
    assert report["budget_met_at_epoch"] is None and trainer.method.stopped_at is None
    assert "budget compression >= " in summary_table(report)
    assert summary_table(report).splitlines()[4].endswith(": NOT met")
    for a, b in zip(rows(tmp_path / "b"), rows(tmp_path / "free"), strict=True):
        assert a == {**b, "wall_time_s": a["wall_time_s"]}


def test_budget_met_does_not_warn_and_the_summary_says_when(tmp_path):
    free = Trainer(budget_config(), tmp_path / "free", progress=False)
    free.run(max_epochs=2)
    target = float(rows(tmp_path / "free")[1]["compression_rate"])
    trainer = Trainer(budget_config(**{"cvgrad.target_compression": target}), tmp_path / "b",
                      progress=False)
    report, missed = run_and_budget_warnings(trainer)
    assert missed == []
    assert f"budget compression >= {target:g}x: met after epoch 2" in summary_table(report)


@pytest.mark.parametrize("key, value", [
    ("cvgrad.target_compression", 0.5),
    ("cvgrad.target_flops", 0.0),
    ("cvgrad.target_flops", 1.5),
    ("cvgrad.target_check_every", -1),
])
def test_bad_budget_fails_before_training(tmp_path, key, value):
    with pytest.raises(ValueError, match=key):
        Trainer(budget_config(**{key: value}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
