"""End-to-end checks of the training loop, checkpoints, outputs and the command line."""

from __future__ import annotations

import copy
import csv
import json
import warnings

import pytest
import torch

from cvsparse.cli import main
from cvsparse.config import RunConfig, from_dict
from cvsparse.train import CVTrainer, Trainer


def tiny_config(**overrides) -> RunConfig:
    """LeNet-300-100 on MNIST, a few steps per epoch: seconds on a CPU."""
    values = {
        "model": "lenet300", "threads": 1,
        "data": {"dataset": "mnist", "batch_size": 64, "val_size": 2000, "val_batch_size": 500},
        "optim": {"epochs": 2, "lr": 0.05, "max_steps_per_epoch": 15},
        "cvgrad": {"outer": 2, "lambda1": 1e-4, "lambda2": 1e-4, "hyper_batches": 2,
                   "threshold_start_epoch": 1},
    }
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        (values.setdefault(section, {}) if section else values)[leaf] = value
    return from_dict(values)


def run_and_budget_warnings(trainer: Trainer) -> tuple[dict, list[str]]:
    """Run ``trainer`` to the end; its report and the messages of every "pruning phase ended
    short of the budget" warning it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = trainer.run()
    return report, [str(w.message) for w in caught if "pruning phase" in str(w.message)]


def full_and_resumed(config: RunConfig, root, stop_after: int) -> tuple[Trainer, Trainer]:
    """One uninterrupted run of ``config`` and one cut after ``stop_after`` epochs and resumed
    from its checkpoint; asserts that both end with bitwise identical model state."""
    full = Trainer(config, root / "full", progress=False)
    full.run()
    cut = Trainer(copy.deepcopy(config), root / "cut", progress=False)
    cut.run(max_epochs=stop_after)
    del cut
    resumed = Trainer(RunConfig(), root / "cut", resume=True, progress=False)
    assert resumed.epoch == stop_after
    resumed.run()
    for (name, a), (_, b) in zip(full.model.state_dict().items(),
                                 resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resume"
    return full, resumed


def test_kill_and_resume_is_bitwise_identical(tmp_path):
    # stops after epoch 3 of 4, mid outer iteration 2
    full, resumed = full_and_resumed(tiny_config(**{"cvgrad.online_every": 7}), tmp_path, 3)
    assert torch.equal(full.method.lambdas.lambda1, resumed.method.lambdas.lambda1)
    assert torch.equal(full.method.lambdas.lambda2, resumed.method.lambdas.lambda2)
    full_rows = list(csv.DictReader(open(tmp_path / "full" / "metrics.csv")))
    cut_rows = list(csv.DictReader(open(tmp_path / "cut" / "metrics.csv")))
    for a, b in zip(full_rows, cut_rows, strict=True):
        assert a["test_acc"] == b["test_acc"] and a["lambda1"] == b["lambda1"]


def test_run_writes_report_metrics_plots_and_learns_lambda(tmp_path):
    report = CVTrainer(tiny_config(), tmp_path, progress=False).run()
    on_disk = json.loads((tmp_path / "report.json").read_text())
    for key in ("test_acc", "val_acc", "params_total", "params_nonzero", "compression_rate",
                "pruned_pct", "flops_dense", "flops_effective", "lambda_history", "layers",
                "config", "wall_time_s"):
        assert key in on_disk, key
    assert on_disk["params_total"] == 784 * 300 + 300 * 100 + 100 * 10
    assert on_disk["compression_rate"] == pytest.approx(
        on_disk["params_total"] / on_disk["params_nonzero"])
    assert [h["outer"] for h in report["lambda_history"]] == [0, 1, 2]
    assert report["lambda_history"][-1]["lambda1"] != report["lambda_history"][0]["lambda1"]
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) == 4 and float(rows[-1]["test_acc"]) > 0.5  # far above chance (0.1)
    for name in ("accuracy.png", "sparsity.png", "lambda.png", "layers.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (tmp_path / "plots" / "drive.png").exists()   # no constraint, no drive
    assert on_disk["config"]["model"] == "lenet300"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": "resnet9000"}, "unknown model"),
        ({"cvgrad.lambda1": -1e-3}, "lambda1"),
        ({"optim.epochs": 0}, "epochs"),
        ({"data.val_size": 60000}, "validation split"),
        ({"cvgrad.estimator": "newton"}, "estimator"),
        ({"data.mnist_shift": -1}, "mnist_shift"),
        ({"data.mnist_shift": 14}, "mnist_shift"),
        ({"data.dataset": "cifar10", "data.mnist_shift": 2}, "MNIST only"),
        ({"method": "autoprune", "autoprune.aux_l1_ramp_epochs": -1}, "aux_l1_ramp_epochs"),
    ],
)
def test_bad_config_fails_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        Trainer(tiny_config(**overrides), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def _is_shift_of(shifted: torch.Tensor, plain: torch.Tensor, pixels: int) -> bool:
    """Whether every image of ``shifted`` is its ``plain`` counterpart moved by at most
    ``pixels`` each way (zero fill; both normalized, so the fill is ``plain``'s minimum)."""
    background = float(plain.min())
    size = plain.shape[-1]
    offsets = range(2 * pixels + 1)
    return all(
        any(torch.equal(a, torch.nn.functional.pad(b, (pixels,) * 4, value=background)
                        [:, dy : dy + size, dx : dx + size]) for dy in offsets for dx in offsets)
        for a, b in zip(shifted, plain, strict=True))


@pytest.mark.parametrize("method", ["cvgrad", "autoprune"])
def test_mnist_shift_augments_the_training_batches_only(tmp_path, method):
    """``data.mnist_shift``: the weight (and AutoPrune's gate) batches are shifted by up to that
    many pixels, unflipped; validation, test and hypergradient batches are not.  Default: off."""
    shifted = Trainer(tiny_config(**{"method": method, "data.mnist_shift": 2}), tmp_path / "a",
                      progress=False)
    plain = Trainer(tiny_config(method=method), tmp_path / "b", progress=False)
    train = [shifted.train_loader]
    if method == "autoprune":
        train.append(shifted.method.data.second_half)
    for loader in train:
        assert (loader.augment, loader.crop_padding, loader.flip) == (True, 2, False)
    for loader in (shifted.val_loader, shifted.test_loader, shifted.method.data.train_for_hvp,
                   plain.train_loader):
        assert not loader.augment
    x_shifted, y_shifted = next(iter(shifted.train_loader))
    x_plain, y_plain = next(iter(plain.train_loader))
    assert torch.equal(y_shifted, y_plain)           # same order, different pixels
    assert not torch.equal(x_shifted, x_plain)
    assert _is_shift_of(x_shifted, x_plain, 2)


@pytest.mark.parametrize("method", ["cvgrad", "autoprune", "magnitude"])
def test_augment_phase_finetune_shifts_only_the_finetuning_batches(tmp_path, method):
    """``data.augment_phase = "finetune"``: the training phase serves exactly the plain batches
    of an unaugmented run; the fine-tuning phase serves shifts of the batches its shuffled order
    names (oracle: the same pass replayed without augmentation from the same generator state)."""
    phases = {"optim.epochs": 1, "cvgrad.outer": 1, f"{method}.finetune_epochs": 1,
              "method": method, "data.mnist_shift": 2}
    trainer = Trainer(tiny_config(**phases, **{"data.augment_phase": "finetune"}),
                      tmp_path / "a", progress=False)
    plain = Trainer(tiny_config(method=method), tmp_path / "b", progress=False)
    served: dict[int, torch.Tensor] = {}
    flags: dict[int, bool] = {}
    start_states: dict[int, torch.Tensor] = {}
    set_epoch, train_step = trainer.method.set_epoch, trainer.method.train_step

    def recording_set_epoch(epoch):
        start_states[epoch] = trainer.generator.get_state()
        return set_epoch(epoch)

    def recording_train_step(x, y):
        epoch = len(start_states) - 1
        served.setdefault(epoch, x.clone())
        flags[epoch] = trainer.train_loader.augment
        return train_step(x, y)

    trainer.method.set_epoch, trainer.method.train_step = recording_set_epoch, recording_train_step
    trainer.run()
    assert flags == {0: False, 1: True} and trainer.method.finetuning
    second = trainer.method.data.second_half
    assert second is None or second.augment       # AutoPrune's gate half fine-tunes too
    assert torch.equal(served[0], next(iter(plain.train_loader))[0])
    replay = plain.train_loader
    replay.generator.set_state(start_states[1])
    x_plain = next(iter(replay))[0]
    assert not torch.equal(served[1], x_plain)
    assert _is_shift_of(served[1], x_plain, 2)


def test_augment_phase_default_and_bad_value(tmp_path):
    assert RunConfig().data.augment_phase == "all"
    with pytest.raises(ValueError, match="augment_phase"):
        Trainer(tiny_config(**{"data.augment_phase": "sometimes"}), tmp_path / "r",
                progress=False)
    assert not (tmp_path / "r").exists()


def test_unknown_yaml_key_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2


def test_cli_train_then_resume_finished_run(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--model", "lenet300", "--dataset", "mnist", "--method", "cvgrad",
            "--epochs", "1", "--outer", "1", "--max-steps-per-epoch", "5", "--quiet",
            "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    first = json.loads((out / "report.json").read_text())
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["params_nonzero"] == first["params_nonzero"]
    assert again["test_acc"] == first["test_acc"]
    assert main(["summary", str(out)]) == 0
    assert "compression" in capsys.readouterr().out
    assert main(["compare", str(out)]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"| {100 * (1 - again['test_acc']):.2f} |" in row
    assert f"| {again['compression_rate']:.1f}x |" in row
    assert row.endswith(f"| {100 * again['val_acc']:.2f} | {again['wall_time_s']:.0f} |")
    assert main(["compare", str(tmp_path / "missing")]) == 2


def test_missing_data_root_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CVSPARSE_DATA", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--dataset", "cifar100", "--data-root", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cifar100" in err and str(tmp_path / "empty") in err


def test_reinit_restarts_weights_each_outer_iteration(tmp_path):
    trainer = Trainer(tiny_config(**{"cvgrad.reinit": True}), tmp_path, progress=False)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run(max_epochs=2)  # one full outer iteration
    assert not all(torch.equal(v, initial[k]) for k, v in trainer.model.state_dict().items())
    trainer.method.set_epoch(2)  # the second outer iteration starts from the initialization
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, initial[k]), k
    assert len(trainer.method.optimizer.state) == 0


def test_finetune_keeps_the_pruned_support_and_drops_l1(tmp_path):
    config = tiny_config(**{"cvgrad.finetune_epochs": 1, "cvgrad.lambda1": 3e-3})
    trainer = Trainer(config, tmp_path, progress=False)
    trainer.run(max_epochs=4)
    zero_before = [p.detach() == 0 for p in trainer.method.weights]
    assert any(bool(z.any()) for z in zero_before)
    trainer.run()
    assert trainer.epoch == 5
    group = trainer.method.optimizer.param_groups[0]
    assert group["lambda1"] == 0.0 and group["threshold"] is None
    for z, p in zip(zero_before, trainer.method.weights, strict=True):
        assert bool((p.detach()[z] == 0).all()), "a pruned weight came back in fine-tuning"
    assert len(trainer.method.history) == 3  # no hyper pass during fine-tuning
