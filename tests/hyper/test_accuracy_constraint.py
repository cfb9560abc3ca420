"""AccuracyConstraint: the bound, the kept support and the stop, against a brute-force reading
of the rule "the sparsest feasible check before the patience-th violation in a row"."""

from __future__ import annotations

import csv
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvsparse.config import RunConfig
from cvsparse.hyper import AccuracyConstraint
from cvsparse.hyper.accuracy_constraint import (
    BEST,
    FEASIBLE,
    STOP,
    VIOLATED,
    ReferenceCurve,
    read_reference,
    read_reference_curve,
)


def brute_force(checks, bound, patience, reference=None, window=3):
    """(best compression or None, index of the stop or None) by the rule's definition; with a
    ``reference`` (rising), each check first raises it to the mean of the last ``window``
    accuracies when that is higher, and ``bound`` is the drop D as a fraction."""
    best, run, level = None, 0, reference
    for i, (accuracy, compression) in enumerate(checks):
        if level is not None:
            last = [a for a, _ in checks[max(0, i - window + 1):i + 1]]
            if len(last) == window:
                level = max(level, sum(last) / window)
            bound_now = level - bound
        else:
            bound_now = bound
        if accuracy >= bound_now:
            run = 0
            best = compression if best is None or compression > best else best
        else:
            run += 1
            if run == patience:
                return best, i
    return best, None


def test_bound_is_the_stricter_of_the_absolute_and_relative_drops():
    c = AccuracyConstraint(max_drop=1.0, max_relative_drop=None)
    c.set_reference(0.90, "given")
    assert c.bound == pytest.approx(0.89)
    c = AccuracyConstraint(max_drop=None, max_relative_drop=5.0)
    c.set_reference(0.90, "given")
    assert c.bound == pytest.approx(0.855)
    c = AccuracyConstraint(max_drop=1.0, max_relative_drop=5.0)   # 0.89 vs 0.855
    c.set_reference(0.90, "given")
    assert c.bound == pytest.approx(0.89)
    c = AccuracyConstraint(max_drop=10.0, max_relative_drop=5.0)  # 0.80 vs 0.855
    c.set_reference(0.90, "given")
    assert c.bound == pytest.approx(0.855)


def test_verdicts_of_a_short_sequence():
    c = AccuracyConstraint(max_drop=1.0, max_relative_drop=None, patience=2)
    c.set_reference(0.95, "given")                        # bound 0.94
    assert c.observe(0.95, 2.0, (0, 1)) == BEST
    assert c.observe(0.945, 1.5, (0, 2)) == FEASIBLE      # feasible, but denser
    assert c.observe(0.93, 8.0, (0, 3)) == VIOLATED
    assert c.observe(0.941, 9.0, (0, 4)) == BEST          # a feasible check resets the run
    assert c.observe(0.90, 20.0, (1, 0)) == VIOLATED
    assert c.observe(0.92, 30.0, (1, 1)) == STOP
    assert c.observe(0.99, 40.0, (1, 2)) == STOP          # stopped for good
    report = c.report()
    assert report["selected_compression"] == 9.0 and report["selected_at"] == [0, 4]
    assert report["drive_stopped_at"] == [1, 1] and report["constraint_checks"] == 6
    history = report["constraint_history"]   # every judged check, the stopped call excluded
    assert [h["verdict"] for h in history] == [BEST, FEASIBLE, VIOLATED, BEST, VIOLATED, STOP]
    assert [h["at"] for h in history] == [[0, 1], [0, 2], [0, 3], [0, 4], [1, 0], [1, 1]]
    assert [h["val_acc"] for h in history] == [0.95, 0.945, 0.93, 0.941, 0.90, 0.92]
    assert [h["compression"] for h in history] == [2.0, 1.5, 8.0, 9.0, 20.0, 30.0]
    assert all(h["bound"] == pytest.approx(0.94) for h in history)


@settings(max_examples=300, deadline=None)
@given(
    checks=st.lists(st.tuples(st.floats(0.5, 1.0), st.floats(1.0, 1e3)), max_size=30),
    drops=st.tuples(st.floats(0, 20), st.floats(0, 20)),
    patience=st.integers(1, 4),
    rising=st.booleans(),
)
def test_matches_the_rule_and_is_monotone_in_the_drop(checks, drops, patience, rising):
    """The kept compression equals the brute-force rule's, for fixed and rising references,
    and a larger drop never keeps a denser support (the same sequence of checks)."""
    kept = []
    for drop in sorted(drops):
        c = AccuracyConstraint(max_drop=drop, max_relative_drop=None, patience=patience)
        c.set_reference(0.9, "test", rising=rising)
        stop = None
        for i, (accuracy, compression) in enumerate(checks):
            if c.observe(accuracy, compression, (0, i)) == STOP and stop is None:
                stop = i
        expected = brute_force(checks, drop / 100 if rising else 0.9 - drop / 100, patience,
                               0.9 if rising else None)
        best = c.report()["selected_compression"]
        assert (best, stop) == expected
        kept.append(best if best is not None else 0.0)
    assert kept[1] >= kept[0]


def test_state_round_trip_continues_identically():
    a = AccuracyConstraint(max_drop=0.5, max_relative_drop=None, patience=3)
    a.set_reference(0.8, "dense", rising=True)
    for i, (acc, comp) in enumerate([(0.81, 2.0), (0.79, 5.0), (0.70, 9.0)]):
        a.observe(acc, comp, (0, i))
    b = AccuracyConstraint(max_drop=0.5, max_relative_drop=None, patience=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))   # plain data only
    for i, (acc, comp) in enumerate([(0.6, 12.0), (0.9, 14.0), (0.2, 20.0)], start=3):
        assert a.observe(acc, comp, (1, i)) == b.observe(acc, comp, (1, i))
    assert a.report() == b.report()


@pytest.mark.parametrize("kwargs, message", [
    ({"max_drop": None, "max_relative_drop": None}, "give max_drop"),
    ({"max_drop": -0.1, "max_relative_drop": None}, "max_drop"),
    ({"max_drop": None, "max_relative_drop": 100.0}, "max_relative_drop"),
    ({"max_drop": 1.0, "max_relative_drop": None, "patience": 0}, "patience"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AccuracyConstraint(**kwargs)


def test_read_reference_takes_a_finished_runs_val_acc(tmp_path):
    run = tmp_path / "dense"
    run.mkdir()
    with pytest.raises(ValueError, match="no report.json"):
        read_reference(run)
    (run / "report.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        read_reference(run)
    (run / "report.json").write_text(json.dumps({"test_acc": 0.9}))
    with pytest.raises(ValueError, match="no validation accuracy"):
        read_reference(run)
    config = RunConfig()
    config.data.val_size = 5000
    report = {"val_acc": 0.975, "config": {"data": {"dataset": "mnist", "val_size": 5000,
                                                    "split_seed": 0}}}
    (run / "report.json").write_text(json.dumps(report))
    accuracy, source = read_reference(run, config)
    assert accuracy == 0.975 and "dense" in source
    config.data.val_size = 6000
    with pytest.raises(ValueError, match="val_size"):
        read_reference(run, config)


# ---- a dense run's curve, followed epoch by epoch ------------------------------------------------

def test_a_per_check_reference_moves_the_bound_with_it():
    """Against a curve, each check has its own reference: 0.80 passes against 0.805 and fails
    against 0.815 under a 1-point drop; a check without one is judged against the run's one
    reference, which the per-check references leave as it was."""
    constraint = AccuracyConstraint(1.0, None, patience=2)
    constraint.set_reference(0.90, "final")
    assert constraint.observe(0.80, 2.0, (0, 1), reference=0.805) == BEST
    assert constraint.observe(0.80, 3.0, (0, 2), reference=0.815) == VIOLATED
    # without one, the run's reference: 0.85 < 0.89 is the second violation in a row
    assert constraint.observe(0.85, 4.0, (0, 3)) == STOP
    assert constraint.reference == 0.90 and constraint.bound_for(0.5) == pytest.approx(0.49)


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


@pytest.mark.parametrize("change, reason", [
    ({"model": "lenet5"}, "it trained 'lenet5'"),
    ({"batch_size": 128}, "batch size 128"),
    ({"epochs": 6}, "6 epochs in metrics.csv"),
    ({"flat": True}, "no drop"),
    ({"missing": True}, "it has no metrics.csv"),
])
def test_a_curve_is_followed_only_on_the_same_schedule(tmp_path, change, reason):
    config = RunConfig()
    config.optim.epochs, config.cvgrad.outer = 8, 1
    epochs = change.get("epochs", 8)
    lrs = [0.1] * epochs if change.get("flat") else [0.1] * 4 + [0.01] * 2 + [0.001] * 2
    accs = [0.5 + 0.01 * e for e in range(epochs)]
    write_dense_run(tmp_path / "same", [0.1] * 4 + [0.01] * 2 + [0.001] * 2,
                    [0.5 + 0.01 * e for e in range(8)])
    curve, note = read_reference_curve(tmp_path / "same", config)
    assert curve is not None and note == "followed epoch by epoch"
    assert curve.lrs[3:5] == (0.1, 0.01) and curve.val_acc[-1] == pytest.approx(0.57)
    write_dense_run(tmp_path / "other", lrs[:epochs], accs, change.get("model", "lenet300"),
                    change.get("batch_size", 64))
    if change.get("missing"):
        (tmp_path / "other" / "metrics.csv").unlink()
    curve, note = read_reference_curve(tmp_path / "other", config)
    assert curve is None and reason in note


# ---- the drive's level and cut (cvsparse.methods.accuracy_drive) --------------------------------

def drive_at(epoch: int, steps: int, steps_per_epoch: int = 100):
    from cvsparse.methods.accuracy_drive import AccuracyDrive

    config = RunConfig()
    config.accuracy.max_accuracy_drop = 1.0
    config.accuracy.max_compression = 1000.0
    drive = AccuracyDrive(config.accuracy, config.optim, config.total_epochs, [], lambda: None,
                          lambda o, t: o)
    drive.steps_per_epoch = steps_per_epoch
    drive.start_epoch(epoch)
    drive.epoch_steps = steps
    return drive


def test_the_level_rises_geometrically_over_the_drive():
    first = drive_at(0, 0)
    dense, end = first.dense_end, first.drive_end   # 12 epochs: 2 dense, 7 of drive
    assert (dense, end) == (2, 9)
    assert drive_at(dense - 1, 50).level() == 1.0
    assert drive_at(dense, 0).level() == pytest.approx(1.0)
    assert drive_at(dense + 3, 50).level() == pytest.approx(1000 ** (3.5 / 7))
    assert drive_at(end + 1, 0).level() == pytest.approx(1000.0)


def test_the_cut_leaves_the_share_of_weights_the_level_asks_for():
    import torch

    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(300, 784, generator=g), torch.randn(100, 300, generator=g) * 3]
    weights[0][:, :10] = 0   # already pruned
    drive = drive_at(5, 0)
    level = drive.level()
    cut = drive.cut(weights)
    total = sum(w.numel() for w in weights)
    kept = sum(int((w.abs() >= cut).sum()) for w in weights)
    assert kept == int(total / level)
    pruned = [w * (w.abs() >= cut) for w in weights]
    assert drive.cut(pruned) is None   # as compressed as asked: no further cut
