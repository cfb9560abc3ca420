"""AccuracyConstraint: the bound, the kept support and the stop, against a brute-force reading
of the rule "the sparsest feasible check before the patience-th violation in a row"."""

from __future__ import annotations

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


# ---- the probe computes as the run does --------------------------------------------------------

def probe_problem():
    """A small convolutional network on 3-channel 8x8 images (so that channels-last is a
    layout of its own), five fixed training batches and two validation batches."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    batches = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
               for _ in range(5)]
    val = [(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
           for _ in range(2)]
    return net, batches, val


def probe_by_hand(net, batches, val, names, threshold, lr, momentum, dtype, channels_last,
                  scale=None):
    """The probe written out with torch.autocast and torch.optim.SGD (and, with ``scale``, a
    torch.amp.GradScaler started there): (accuracy, weights)."""
    import torch
    import torch.nn.functional as F

    layout = torch.channels_last if channels_last else torch.contiguous_format
    params = dict(net.named_parameters())
    weights = [params[n] for n in names]
    with torch.no_grad():
        masks = [(w != 0) & (w.abs() >= threshold) for w in weights]
        for w, m in zip(weights, masks, strict=True):
            w.mul_(m)
    net.to(memory_format=layout)
    sgd = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, enabled=scale is not None)
    for x, y in batches:
        sgd.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = net(x.contiguous(memory_format=layout))
        scaler.scale(F.cross_entropy(logits.float(), y)).backward()
        scaler.step(sgd)
        scaler.update()
        with torch.no_grad():
            for w, m in zip(weights, masks, strict=True):
                w.mul_(m)
    net.eval()
    correct = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        for x, y in val:
            correct += int((net(x.contiguous(memory_format=layout)).argmax(1) == y).sum())
    return correct / sum(len(y) for _, y in val), [w.detach().clone() for w in weights]


@pytest.mark.parametrize("precision,channels_last",
                         [("fp32", False), ("bf16", True), ("fp16", False)])
def test_the_probe_trains_and_measures_in_the_runs_precision(precision, channels_last):
    """A bf16 channels-last run's checks train and validate under bf16 autocast on
    channels-last batches, fp16 ones under fp16 autocast with a loss scaler started at the
    run's scale, fp32 ones in fp32: the probe's accuracy and trained weights are those of the
    same steps written with torch.autocast, torch.amp.GradScaler and torch.optim.SGD."""
    import copy
    import warnings

    import torch
    import torch.nn.functional as F

    from cvsparse.methods.accuracy_drive import AccuracyDrive
    from cvsparse.precision import Precision

    net, batches, val = probe_problem()
    names = ["0.weight", "2.weight", "5.weight"]
    config = RunConfig()
    config.accuracy.max_accuracy_drop = 1.0
    config.accuracy.probe_lr = 0.05
    feed = iter(batches)
    drive = AccuracyDrive(config.accuracy, config.optim, config.total_epochs, val,
                          lambda: next(feed), F.cross_entropy)
    drive.steps_per_epoch = 100   # probe_fraction 0.05: five steps, the five batches
    assert drive.probe_steps() == len(batches)
    threshold = 0.05
    probed = copy.deepcopy(net)
    seen = []   # (training?, under autocast?, channels-last batch?) of every forward pass
    probed.register_forward_hook(lambda module, args, out: seen.append(
        (module.training, torch.is_autocast_enabled("cpu"),
         args[0].is_contiguous(memory_format=torch.channels_last)
         and not args[0].is_contiguous())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # fp16 on the CPU: slow convolutions, said once
        run = Precision(precision, channels_last)
    if run.scaler is not None:
        run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)   # the run's scale
    accuracy = drive.probe(probed, names, threshold, run)
    reduced = precision != "fp32"
    assert seen == [(True, reduced, channels_last)] * len(batches) \
        + [(False, reduced, channels_last)] * len(val)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    expected, weights = probe_by_hand(copy.deepcopy(net), batches, val, names, threshold,
                                      0.05, config.optim.momentum, dtype, channels_last,
                                      2.0 ** 10 if precision == "fp16" else None)
    params = dict(probed.named_parameters())
    assert accuracy == expected
    for name, weight in zip(names, weights, strict=True):
        assert torch.equal(params[name], weight), name
        assert int((weight == 0).sum()) > 0   # the threshold pruned something, held at zero
    assert params["0.weight"].is_contiguous(memory_format=torch.channels_last) == channels_last
    if reduced:   # the reduced precision really changed what the steps computed
        _, in_fp32 = probe_by_hand(copy.deepcopy(net), batches, val, names, threshold, 0.05,
                                   config.optim.momentum, None, False)
        assert not torch.equal(in_fp32[0], weights[0])
