"""The reference run of an accuracy-constrained run (cvsparse.hyper.reference_run): what a run
folder gives, which schedules can be followed, and the stored copy a resumed run uses."""

from __future__ import annotations

import csv
import json

import pytest

from cvsparse.config import RunConfig
from cvsparse.hyper.reference_run import (
    FollowedRun,
    ReferenceCurve,
    followed_run_in,
    followed_run_of,
    read_followed_run,
)
from cvsparse.train.checkpoint import load, save_atomic


def test_a_finished_runs_val_acc_is_the_reference(tmp_path):
    run = tmp_path / "dense"
    run.mkdir()
    with pytest.raises(ValueError, match="no report.json"):
        read_followed_run(run)
    (run / "report.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        read_followed_run(run)
    (run / "report.json").write_text(json.dumps({"test_acc": 0.9}))
    with pytest.raises(ValueError, match="no validation accuracy"):
        read_followed_run(run)
    config = RunConfig()
    config.data.val_size = 5000
    report = {"val_acc": 0.975, "config": {"data": {"dataset": "mnist", "val_size": 5000,
                                                    "split_seed": 0}}}
    (run / "report.json").write_text(json.dumps(report))
    followed = read_followed_run(run, config)
    assert followed.accuracy == 0.975 and followed.source == "run folder dense"
    assert followed.split == {"dataset": "mnist", "val_size": 5000, "split_seed": 0}
    assert followed.curve is None and followed.note == "it has no metrics.csv"
    config.data.val_size = 6000
    with pytest.raises(ValueError, match="val_size"):
        read_followed_run(run, config)
    with pytest.raises(ValueError, match="val_size"):   # the copy read before the split was set
        followed.check(config)


def test_the_curve_interpolates_between_epoch_ends():
    curve = ReferenceCurve(lrs=(0.1, 0.1, 0.01, 0.01, 0.001), val_acc=(0.5, 0.6, 0.8, 0.7, 0.9))
    # after k whole epochs: the k-th epoch's accuracy; halfway: the mean of its two neighbours
    assert [curve.accuracy_after(k) for k in (1, 2, 3, 4, 5)] == [0.5, 0.6, 0.8, 0.7, 0.9]
    assert curve.accuracy_after(2.5) == pytest.approx(0.7)
    assert curve.accuracy_after(3.25) == pytest.approx(0.8 - 0.25 * 0.1)
    assert curve.accuracy_after(0.3) == 0.5 and curve.accuracy_after(7) == 0.9
    assert curve.drops() == [2, 4] and curve.phases(0.25) == (2, 4)
    one_drop = ReferenceCurve(lrs=(0.1,) * 4 + (0.01,) * 4, val_acc=(0.5,) * 8)
    assert one_drop.phases(0.25) == (4, 6)   # the drive until the last quarter
    assert ReferenceCurve(lrs=(0.1,) * 8, val_acc=(0.5,) * 8).phases(0.25) is None
    assert ReferenceCurve(lrs=(0.1,) * 7 + (0.01,), val_acc=(0.5,) * 8).phases(0.25) is None


def write_dense_run(folder, lrs, val_acc, model="lenet300", batch_size=64):
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps(
        {"val_acc": val_acc[-1], "config": {"model": model, "data": {"batch_size": batch_size}}}))
    with open(folder / "metrics.csv", "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["epoch", "lr", "train_loss", "val_acc"])
        out.writerows([e, lr, 1.0, a] for e, (lr, a) in enumerate(zip(lrs, val_acc, strict=True)))


def eight_epochs() -> RunConfig:
    config = RunConfig()
    config.optim.epochs, config.cvgrad.outer = 8, 1
    return config


@pytest.mark.parametrize("change, reason", [
    ({"model": "lenet5"}, "it trained 'lenet5'"),
    ({"batch_size": 128}, "batch size 128"),
    ({"epochs": 6}, "6 epochs in metrics.csv"),
    ({"flat": True}, "no drop"),
    ({"missing": True}, "it has no metrics.csv"),
])
def test_a_curve_is_followed_only_on_the_same_schedule(tmp_path, change, reason):
    config = eight_epochs()
    epochs = change.get("epochs", 8)
    lrs = [0.1] * epochs if change.get("flat") else [0.1] * 4 + [0.01] * 2 + [0.001] * 2
    accs = [0.5 + 0.01 * e for e in range(epochs)]
    write_dense_run(tmp_path / "same", [0.1] * 4 + [0.01] * 2 + [0.001] * 2,
                    [0.5 + 0.01 * e for e in range(8)])
    followed = read_followed_run(tmp_path / "same", config)
    assert followed.curve is not None and followed.note == "followed epoch by epoch"
    assert followed.curve.lrs[3:5] == (0.1, 0.01)
    assert followed.curve.val_acc[-1] == pytest.approx(0.57)
    write_dense_run(tmp_path / "other", lrs[:epochs], accs, change.get("model", "lenet300"),
                    change.get("batch_size", 64))
    if change.get("missing"):
        (tmp_path / "other" / "metrics.csv").unlink()
    followed = read_followed_run(tmp_path / "other", config)
    assert followed.curve is None and reason in followed.note
    assert followed.accuracy == pytest.approx(accs[-1])   # the final accuracy still counts


def test_a_followed_run_keeps_its_epoch_count(tmp_path):
    """A run that follows a schedule cannot change its epoch count (a resume with more
    fine-tuning epochs): the stored curve no longer matches it."""
    write_dense_run(tmp_path / "dense", [0.1] * 4 + [0.01] * 2 + [0.001] * 2, [0.5] * 8)
    config = eight_epochs()
    followed = read_followed_run(tmp_path / "dense", config)
    followed.check(config)
    config.cvgrad.finetune_epochs = 1
    with pytest.raises(ValueError, match="follows the 8 epochs of run folder dense, its "
                                         "configuration has 9"):
        followed.check(config)


def test_a_checkpoint_stores_the_followed_run_exactly(tmp_path):
    """Through a checkpoint file (weights-only load) the followed run comes back equal, every
    float bit for bit; a checkpoint without one reads the folder, and an unconstrained run
    has none."""
    write_dense_run(tmp_path / "dense", [0.1] * 4 + [0.01] * 2 + [0.001] * 2,
                    [0.1 + 0.1 / 3 * e for e in range(8)])
    (tmp_path / "dense" / "curve.csv").write_text(
        "epoch,step,steps,val_acc\n2,10,30,0.123456789\n")
    config = eight_epochs()
    config.accuracy.max_accuracy_drop = 1.0
    config.accuracy.reference = str(tmp_path / "dense")
    followed = followed_run_of(config)
    assert followed.curve.inner == ((2 + 10 / 30, 0.123456789),)
    save_atomic({"followed": followed.to_dict()}, tmp_path / "state.pt")
    assert followed_run_in(load(tmp_path / "state.pt"), config) == followed
    assert followed_run_in({}, config) == followed
    config.accuracy.max_accuracy_drop = None
    assert followed_run_of(config) is None and followed_run_in({}, config) is None
    plain = FollowedRun(0.9, "run folder x", None, "it has no metrics.csv")
    assert FollowedRun.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain
