"""cvsparse.compress: any model (torchvision's resnet18, a module defined here) on plain
DataLoaders, for every method.  Oracles: the zeros counted on the returned model, the loss
recomputed on it, an uninterrupted run for the resumed one."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cvsparse
from cvsparse.nn.gated import GATED_LAYERS

METHODS = ("cvgrad", "autoprune", "magnitude")
#: Settings that make each method prune visibly within a few steps.
AGGRESSIVE = {
    "cvgrad": {"outer": 1, "lambda1": 3e-2, "threshold_start_epoch": 0, "finetune_epochs": 1},
    "autoprune": {"aux_l1": 5e-2, "aux_lr": 0.5, "finetune_epochs": 1},
    "magnitude": {"target_compression": 5.0, "finetune_epochs": 1},
}


class TwoLayer(nn.Module):
    """A user's own module: conv, pooling, a residual-free head."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(8 * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def data(n: int, size: int, classes: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = (x[:, 0].mean((1, 2)) * 8).long().clamp(-(classes // 2), classes // 2) + classes // 2
    return TensorDataset(x, y)


def loaders(size: int = 16, classes: int = 3, batch: int = 8):
    torch.manual_seed(0)
    train = DataLoader(data(32, size, classes, 0), batch_size=batch, shuffle=True)
    val = DataLoader(data(16, size, classes, 1), batch_size=16)
    return train, val


def conv_linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": m.weight.detach() for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def assert_report_counts_zeros(result, model: nn.Module) -> None:
    assert result.model is model
    assert not any(isinstance(m, GATED_LAYERS) for m in model.modules())
    assert not any(name.endswith(".aux") for name, _ in model.named_parameters())
    weights = conv_linear_weights(model)
    total = sum(w.numel() for w in weights.values())
    nonzero = sum(int(torch.count_nonzero(w)) for w in weights.values())
    assert result.report["params_total"] == total
    assert result.report["params_nonzero"] == nonzero
    assert result.report["compression_rate"] == pytest.approx(total / nonzero, rel=1e-12)
    assert nonzero < total   # the method pruned something: the count is not trivially 1x


@pytest.mark.parametrize("method", METHODS)
def test_torchvision_resnet18(method):
    torch.set_num_threads(1)
    train, val = loaders(size=32, classes=10)
    model = torchvision.models.resnet18(num_classes=10)
    result = cvsparse.compress(model, train, val, method=method, epochs=1, test_loader=val,
                               max_steps_per_epoch=2, lr=0.01, **AGGRESSIVE[method])
    assert type(result.model) is torchvision.models.ResNet
    assert_report_counts_zeros(result, model)
    report = result.report
    assert {"val_acc", "test_acc", "layers"} <= report.keys()
    assert len(report["layers"]) == 21
    assert len(result.history) == report["epochs"] == 2
    if method == "cvgrad":
        assert len(report["lambda_history"]) == 2


@pytest.mark.parametrize("method", METHODS)
def test_custom_module(method):
    train, val = loaders()
    model = TwoLayer()
    result = cvsparse.compress(model, train, val, method=method, epochs=2,
                               **AGGRESSIVE[method])
    assert_report_counts_zeros(result, model)
    assert result.report["test_acc"] is None
    assert "test_acc" not in result.history[0]
    # the returned model is the one evaluated: its validation accuracy, recomputed here
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in val)
    assert result.report["val_acc"] == correct / 16


@pytest.mark.parametrize("method", METHODS)
def test_exclude_leaves_layers_dense_and_out_of_the_report(method):
    train, val = loaders()
    model = TwoLayer()
    result = cvsparse.compress(model, train, val, method=method, epochs=2, exclude=["head"],
                               **AGGRESSIVE[method])
    assert [row["name"] for row in result.report["layers"]] == ["features.0.weight"]
    assert result.report["regularized"] == ["features.0.weight"]
    assert int(torch.count_nonzero(model.head.weight)) == model.head.weight.numel()
    conv = model.features[0].weight
    assert result.report["params_nonzero"] == int(torch.count_nonzero(conv))
    assert int(torch.count_nonzero(conv)) < conv.numel()


def test_include_by_predicate_and_by_name():
    train, val = loaders()
    model = TwoLayer()
    result = cvsparse.compress(model, train, val, method="magnitude", epochs=1,
                               include=lambda name, module: isinstance(module, nn.Linear),
                               **AGGRESSIVE["magnitude"])
    assert result.report["regularized"] == ["head.weight"]
    assert int(torch.count_nonzero(model.features[0].weight)) == model.features[0].weight.numel()
    nonzero = int(torch.count_nonzero(model.head.weight))
    assert result.report["compression_rate"] == pytest.approx(model.head.weight.numel() / nonzero)
    named = cvsparse.compress(TwoLayer(), train, val, method="magnitude", epochs=1,
                              include=["features"], **AGGRESSIVE["magnitude"])
    assert named.report["regularized"] == ["features.0.weight"]
    with pytest.raises(ValueError, match="not modules of the model"):
        cvsparse.compress(TwoLayer(), train, val, include=["classifier"])


def test_custom_loss_fn_is_the_loss_trained_and_reported():
    train, val = loaders()
    calls = {"n": 0}

    def smoothed(outputs, targets):
        calls["n"] += 1
        return F.cross_entropy(outputs, targets, label_smoothing=0.2)

    model = TwoLayer()
    result = cvsparse.compress(model, train, val, method="cvgrad", epochs=2, loss_fn=smoothed,
                               **AGGRESSIVE["cvgrad"])
    assert calls["n"] > 0
    model.eval()
    with torch.no_grad():
        expected = sum(float(smoothed(model(x), y)) * len(y) for x, y in val) / 16
        plain = sum(float(F.cross_entropy(model(x), y)) * len(y) for x, y in val) / 16
    assert result.history[-1]["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert abs(expected - plain) > 1e-3   # the oracle tells the two losses apart


def test_any_iterable_of_batches_as_loaders():
    train, val = loaders()
    as_lists = [list(train), list(val)]
    result = cvsparse.compress(TwoLayer(), *as_lists, method="cvgrad", epochs=1,
                               **AGGRESSIVE["cvgrad"])
    assert result.report["compression_rate"] > 1
    with pytest.raises(ValueError, match="gate_loader"):
        cvsparse.compress(TwoLayer(), *as_lists, method="autoprune", epochs=1)
    gated = cvsparse.compress(TwoLayer(), *as_lists, method="autoprune", epochs=1,
                              gate_loader=as_lists[0], **AGGRESSIVE["autoprune"])
    assert gated.report["compression_rate"] >= 1


def test_settings_that_do_not_apply_are_refused():
    train, val = loaders()
    with pytest.raises(TypeError, match="unknown setting 'outer' for method 'magnitude'"):
        cvsparse.compress(TwoLayer(), train, val, method="magnitude", outer=2)
    with pytest.raises(ValueError, match="unknown method"):
        cvsparse.compress(TwoLayer(), train, val, method="random")
    with pytest.raises(ValueError, match="lambda1 must be >= 0"):
        cvsparse.compress(TwoLayer(), train, val, lambda1=-1.0)


def test_out_writes_the_run_and_resume_is_bitwise(tmp_path):
    train, val = loaders()
    settings = dict(method="cvgrad", epochs=2, test_loader=val, outer=2, lambda1=3e-2,
                    threshold_start_epoch=0, finetune_epochs=1)

    def fresh() -> TwoLayer:   # the same initial weights every time
        torch.manual_seed(1)
        return TwoLayer()

    full = cvsparse.compress(fresh(), train, val, out=tmp_path / "full", **settings)
    for name in ("report.json", "metrics.csv", "checkpoint.pt", "plots/accuracy.png",
                 "plots/lambda.png"):
        assert (tmp_path / "full" / name).is_file(), name
    written = json.loads((tmp_path / "full" / "report.json").read_text())
    assert written["compression_rate"] == full.report["compression_rate"]
    assert written["lambda_history"] == full.report["lambda_history"]

    class Stop(Exception):
        pass

    class Dying:
        def __init__(self) -> None:
            self.left = 3 * 4 + 2   # in the fourth epoch (four batches per epoch)

        def __iter__(self):
            for batch in train:
                if self.left == 0:
                    raise Stop
                self.left -= 1
                yield batch

    with pytest.raises(Stop):
        cvsparse.compress(fresh(), Dying(), val, out=tmp_path / "cut", **settings)
    with pytest.raises(Exception, match="holds another run"):
        cvsparse.compress(TwoLayer(), train, val, out=tmp_path / "cut", **settings)
    resumed = cvsparse.compress(fresh(), train, val, out=tmp_path / "cut", resume=True,
                                test_loader=val)
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3, 4]
    for (name, a), (_, b) in zip(full.model.state_dict().items(),
                                 resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.report["lambda_history"] == full.report["lambda_history"]


@pytest.mark.filterwarnings("ignore:bf16 on this CPU:UserWarning")
@pytest.mark.parametrize("precision, channels_last", [("fp32", False), ("bf16", True)])
def test_fixed_gates_leave_a_constrained_autoprune_run_as_it_was(precision, channels_last):
    """At ``aux_lr`` 0 (a constrained run's default) the gates take no gradient and a gate step
    is its forward pass alone.  Oracle: the run that computes both, at ``aux_lr`` 1e-300, whose
    gate steps round to nothing in float32; the two end bit for bit alike, BatchNorm statistics
    included (they moved), in float32 and under bf16 autocast on channels-last tensors."""
    train, val = loaders()
    settings = dict(method="autoprune", epochs=6, finetune_epochs=2, lr=0.05,
                    max_accuracy_drop=50.0, probe_fraction=0.5, max_compression=50.0,
                    precision=precision, channels_last=channels_last)
    runs = []
    for aux_lr in (0.0, 1e-300):
        torch.manual_seed(1)
        runs.append(cvsparse.compress(TwoLayer(), train, val, aux_lr=aux_lr, **settings))
    fixed, full = runs
    assert fixed.report["constraint_history"] == full.report["constraint_history"]
    assert fixed.report["constraint_checks"] > 3 and fixed.report["compression_rate"] > 2
    state = fixed.model.state_dict()
    assert state["features.1.running_mean"].abs().sum() > 0
    for (name, a), (_, b) in zip(state.items(), full.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_run_without_test_set_is_summarized_by_the_command(tmp_path, capsys):
    from cvsparse.cli import main

    train, val = loaders()
    cvsparse.compress(TwoLayer(), train, val, method="magnitude", epochs=1, out=tmp_path,
                      **AGGRESSIVE["magnitude"])
    assert main(["summary", str(tmp_path)]) in (0, None)
    text = capsys.readouterr().out
    assert "test acc -" in text and "custom:TwoLayer" in text
    assert main(["compare", str(tmp_path)]) in (0, None)
    assert "| - |" in capsys.readouterr().out


#: The line an epoch's training steps end with when stderr is no terminal (the command line's).
PASS_LINE = re.compile(r"^epoch (\d+)/(\d+): (\d+) steps, loss \d+\.\d{4}, acc \d\.\d{3}, ")


@pytest.mark.parametrize("with_test", [False, True])
def test_progress_prints_the_command_lines_epoch_lines_on_stderr(capsys, with_test):
    """``progress=True`` with stderr a pipe (pytest's capture): per epoch, one line when the
    training steps end and one with the epoch's accuracies, in order, nothing on stdout, no
    carriage return.  Oracles: the returned history (epochs, accuracies) and the loader's
    length (steps); ``progress=False`` prints nothing."""
    train, val = loaders()
    result = cvsparse.compress(TwoLayer(), train, val, method="magnitude", epochs=2,
                               test_loader=val if with_test else None, progress=True,
                               **AGGRESSIVE["magnitude"])
    out, err = capsys.readouterr()
    assert out == "" and "\r" not in err
    total = len(result.history)
    assert total == 3   # two pruning epochs and the fine-tuning epoch
    passes = [m.groups() for m in map(PASS_LINE.match, err.splitlines()) if m]
    assert passes == [(str(k), str(total), str(len(train))) for k in range(1, total + 1)]
    results = [line for line in err.splitlines() if re.match(r"^epoch \d+: train acc", line)]
    assert len(results) == total
    for line, row in zip(results, result.history, strict=True):
        assert f"val acc {row['val_acc']:.4f}" in line
        assert ("test acc" in line) == with_test
        if with_test:
            assert f"test acc {row['test_acc']:.4f}" in line
        assert f"compression {row['compression_rate']:.1f}x" in line
    cvsparse.compress(TwoLayer(), train, val, method="magnitude", epochs=1,
                      **AGGRESSIVE["magnitude"])
    assert capsys.readouterr() == ("", "")
