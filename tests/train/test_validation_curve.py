"""Validation points inside the epochs (``accuracy.curve_points``, ``curve.csv``) and a
constrained run that follows them.  Tiny LeNet-300 runs on the MNIST fixture."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from cvsparse import compress
from cvsparse.hyper.reference_run import ReferenceCurve
from cvsparse.train import Trainer
from cvsparse.train.curve import point_steps

from .cli_helpers import run_cli, tiny_yaml
from .test_trainer import full_and_resumed, tiny_config

#: A dense run of 8 epochs of 30 steps (drops of the learning rate at epochs 4 and 6).
DENSE = {"optim.epochs": 8, "cvgrad.outer": 1, "optim.max_steps_per_epoch": 30, "optim.lr": 0.1,
         "cvgrad.lambda1": 1e-12, "cvgrad.hyper_lr": 0.0, "cvgrad.learn_lambda2": False,
         "cvgrad.threshold": 0.0}


def rows_of(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def without_time(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in rows]


@pytest.fixture(scope="module")
def dense_with_points(tmp_path_factory):
    """The dense run with 3 points per epoch: its folder."""
    folder = tmp_path_factory.mktemp("reference") / "dense"
    Trainer(tiny_config(**DENSE, **{"accuracy.curve_points": 3}), folder, progress=False).run()
    return folder


@pytest.mark.parametrize(("points", "steps", "expected"), [
    (3, 40, [10, 20, 30]), (1, 7, [4]), (4, 100, [20, 40, 60, 80]),
    (5, 3, [1, 2]),          # more points than room: each step at most once
    (2, 1, []), (0, 50, []),
])
def test_points_are_evenly_spaced_strictly_inside_the_epoch(points, steps, expected):
    assert point_steps(points, steps) == expected


def test_points_do_not_change_the_run_and_measure_what_a_shorter_epoch_ends_with(
        tmp_path, dense_with_points):
    """The run with points trains exactly as the run without (same metrics.csv, same
    weights); the point after 15 of the first epoch's 30 steps is the validation accuracy a
    twin run measures at the end of a first epoch of 15 steps."""
    plain = Trainer(tiny_config(**DENSE), tmp_path / "plain", progress=False)
    plain.run()
    with_points = rows_of(dense_with_points / "metrics.csv")
    assert without_time(with_points) == without_time(rows_of(tmp_path / "plain" / "metrics.csv"))
    points = rows_of(dense_with_points / "curve.csv")
    assert [(int(p["epoch"]), int(p["step"]), int(p["steps"])) for p in points] == [
        (e, s, 30) for e in range(8) for s in (8, 15, 22)]
    half = Trainer(tiny_config(**{**DENSE, "optim.max_steps_per_epoch": 15}),
                   tmp_path / "half", progress=False)
    half.run(max_epochs=1)
    first_half = rows_of(tmp_path / "half" / "metrics.csv")[0]
    assert float(points[1]["val_acc"]) == float(first_half["val_acc"])
    assert float(points[1]["val_loss"]) == pytest.approx(float(first_half["val_loss"]),
                                                         rel=1e-12)


def test_points_resume_bitwise(tmp_path):
    config = tiny_config(**{**DENSE, "optim.epochs": 4, "accuracy.curve_points": 2})
    full_and_resumed(config, tmp_path, stop_after=2)
    full = rows_of(tmp_path / "full" / "curve.csv")
    assert len(full) == 8
    assert full == rows_of(tmp_path / "cut" / "curve.csv")


def test_a_reference_curve_interpolates_between_its_measured_points():
    """Linear between the epoch ends and the inner points, flat outside: numpy's interp is
    the oracle; without inner points, the line between epoch ends."""
    val = (0.5, 0.7, 0.75, 0.9)
    inner = ((0.25, 0.3), (1.5, 0.72), (2.5, 0.85))
    curve = ReferenceCurve((0.1,) * 4, val, inner)
    xs = np.array([1.0, 2.0, 3.0, 4.0, 0.25, 1.5, 2.5])
    ys = np.array([*val, 0.3, 0.72, 0.85])
    order = np.argsort(xs)
    for at in (0.0, 0.1, 0.25, 0.6, 1.0, 1.2, 1.5, 1.99, 2.5, 2.7, 3.0, 3.5, 4.0, 7.0):
        assert curve.accuracy_after(at) == pytest.approx(np.interp(at, xs[order], ys[order]))
    plain = ReferenceCurve((0.1,) * 4, val)
    assert plain.accuracy_after(0.5) == 0.5 and plain.accuracy_after(9.0) == 0.9
    assert plain.accuracy_after(2.25) == pytest.approx(0.7 + 0.25 * 0.05)


def test_a_followed_run_judges_each_check_at_the_measured_points(tmp_path, dense_with_points):
    """Following a dense run that measured points inside its epochs, each check's bound is the
    dense accuracy, interpolated between its epoch ends and points (numpy's interp over the
    two files), after as much training as the check's probe had, less the drop."""
    folder = dense_with_points
    config = tiny_config(**{
        "optim.epochs": 4, "cvgrad.outer": 2, "optim.max_steps_per_epoch": 30,
        "optim.lr": 0.1, "accuracy.probe_fraction": 0.2, "accuracy.max_compression": 300.0,
        "accuracy.max_accuracy_drop": 2.0, "accuracy.reference": str(folder)})
    report = Trainer(config, tmp_path / "follow", progress=False).run()
    assert report["reference_source"] == (
        "run folder dense, followed epoch by epoch, with 24 validation points inside its "
        "epochs")
    ends = [(e + 1.0, float(r["val_acc"]))
            for e, r in enumerate(rows_of(folder / "metrics.csv"))]
    inner = [(int(p["epoch"]) + int(p["step"]) / int(p["steps"]), float(p["val_acc"]))
             for p in rows_of(folder / "curve.csv")]
    xs, ys = zip(*sorted(ends + inner), strict=True)
    checks = report["constraint_history"]
    assert len(checks) > 6
    reached = []
    for check in checks:
        epoch, step = check["at"]
        reached.append(epoch + min(1.0, (step + 6) / 30))
        assert check["bound"] == pytest.approx(np.interp(reached[-1], xs, ys) - 0.02), check
    assert any(at % 1 for at in reached)   # some inside an epoch, where the points matter


def test_a_malformed_curve_file_exits_2_before_training(tmp_path, dense_with_points):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("report.json", "metrics.csv"):
        (broken / name).write_bytes((dense_with_points / name).read_bytes())
    (broken / "curve.csv").write_text("epoch,step,steps,val_loss,val_acc\n0,40,30,0.1,0.9\n")
    recipe = tiny_yaml(tmp_path, data={"batch_size": 64, "val_size": 2000},
                       optim={"epochs": 8, "max_steps_per_epoch": 30, "lr": 0.1})
    out = tmp_path / "run"
    done = run_cli("train", "--config", recipe, "--max-accuracy-drop", "1",
                   "--reference", broken, "--out", out)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "curve.csv cannot be read" in lines[0]
    assert "out of range" in lines[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("value", ["-1", "101"])
def test_a_bad_point_count_exits_2_before_training(tmp_path, value):
    out = tmp_path / "run"
    done = run_cli("train", "--config", tiny_yaml(tmp_path), "--curve-points", value,
                   "--out", out)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "accuracy.curve_points" in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_compress_measures_points_over_a_sized_loader_and_refuses_an_unsized_one(tmp_path):
    """Through the Python API, with a DataLoader: the points land in ``out``/curve.csv and
    match the history's epoch count; an iterable without a length is refused up front."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 10, generator=g), torch.randint(0, 3, (256,), generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True,
                                        generator=torch.Generator().manual_seed(1))
    val = torch.utils.data.DataLoader(data, batch_size=128)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    result = compress(model, train, val, method="magnitude", epochs=2, curve_points=1,
                      target_compression=2.0, out=tmp_path / "api")
    points = rows_of(tmp_path / "api" / "curve.csv")
    epochs = len(result.history)
    assert [(int(p["epoch"]), int(p["step"]), int(p["steps"])) for p in points] == [
        (e, 4, 8) for e in range(epochs)]

    def unsized():
        yield from train

    class Batches:
        def __iter__(self):
            return unsized()

    with pytest.raises(ValueError, match="curve_points .* must have a length"):
        compress(torch.nn.Linear(10, 3), Batches(), val, method="magnitude", epochs=1,
                 curve_points=1, target_compression=2.0)
