"""cvgrad with an accuracy constraint (``accuracy.max_accuracy_drop``): a dense phase measures
the reference, a compression drive prunes, the sparsest support that met the constraint is
fine-tuned.  Tiny LeNet-300 runs on the MNIST fixture."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from cvsparse.config import AutoPruneConfig, RunConfig, resolve_autoprune, resolve_defaults
from cvsparse.metrics import evaluate
from cvsparse.train import Trainer
from cvsparse.train.outputs import comparison_table, summary_table

from .cli_helpers import run_cli, tiny_yaml
from .test_trainer import full_and_resumed, tiny_config

#: 8 epochs: 2 dense, 4 of drive, 2 of fine-tuning; 30 steps each.
BASE = {"optim.epochs": 4, "cvgrad.outer": 2, "optim.max_steps_per_epoch": 30,
        "optim.lr": 0.1, "accuracy.probe_fraction": 0.2, "accuracy.max_compression": 300.0}


def constrained(tmp_path, name: str, **overrides) -> tuple[Trainer, dict]:
    trainer = Trainer(tiny_config(**{**BASE, **overrides}), tmp_path / name, progress=False)
    return trainer, trainer.run()


def zeros_rate(model: torch.nn.Module, names: list[str]) -> float:
    """Compression rate counted from the model's weights: elements / nonzeros."""
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in names)
    return total / sum(int(torch.count_nonzero(params[n])) for n in names)


def test_the_kept_network_meets_the_bound_on_validation(tmp_path):
    trainer, report = constrained(tmp_path, "run", **{"accuracy.max_accuracy_drop": 3.0})
    assert report["reference_source"].startswith("dense phase of 2 epochs")
    assert report["accuracy_bound"] == pytest.approx(report["reference_val_acc"] - 0.03)
    val = evaluate(trainer.model, trainer.val_loader)["acc"]   # the loop's split, re-measured
    assert val == report["val_acc"] and val >= report["accuracy_bound"]
    assert report["constraint_met_val"] is True
    line = [s for s in summary_table(report).splitlines() if s.startswith("accuracy val")]
    assert line == [f"accuracy val {100 * val:.2f}% >= bound "
                    f"{100 * report['accuracy_bound']:.2f}% (reference "
                    f"{100 * report['reference_val_acc']:.2f}%, {report['reference_source']}): "
                    "met"]
    row = comparison_table({"run": report}).splitlines()[-1]
    assert f"| {100 * val:.2f} >= {100 * report['accuracy_bound']:.2f} |" in row
    rate = zeros_rate(trainer.model, report["regularized_tensors"])
    assert rate == pytest.approx(report["compression_rate"])
    assert rate >= report["selected_compression"] > 2   # the support kept, masked below τ
    kept = [h for h in report["constraint_history"] if h["at"] == report["selected_at"]]
    assert [(h["verdict"], h["compression"]) for h in kept] == [
        ("best", report["selected_compression"])]
    bounds = [h["bound"] for h in report["constraint_history"]]   # a rising reference
    assert kept[0]["val_acc"] >= kept[0]["bound"]
    assert bounds == sorted(bounds) and bounds[-1] == pytest.approx(report["accuracy_bound"])
    assert (tmp_path / "run" / "plots" / "drive.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [float(r["lambda1"]) for r in rows[:2]] == [1e-4, 1e-4]   # dense: λ untouched
    # the drive's λ stay within 10x of their start (cvgrad.lambda_range of a constrained run)
    assert all(1e-5 <= float(r[k]) <= 1e-3 for r in rows for k in ("lambda1", "lambda2"))
    assert all(float(r["compression_rate"]) == pytest.approx(1.0) for r in rows[:2])
    assert all(float(r["compression_rate"]) == pytest.approx(rate) for r in rows[-2:])


def test_a_larger_drop_never_keeps_a_denser_network(tmp_path):
    """Same seed, three drops: the runs agree until the stricter one stops, so the kept
    compression cannot fall as the drop grows (and here it rises)."""
    rates = []
    for drop in (0.2, 2.0, 20.0):
        _, report = constrained(tmp_path, f"d{drop}", **{"accuracy.max_accuracy_drop": drop})
        rates.append(report["compression_rate"])
    assert rates == sorted(rates) and rates[-1] > rates[0]


def test_a_constraint_that_never_binds_leaves_the_drive_alone(tmp_path):
    """With drops so large that no check can fail, nothing stops the drive: both runs are
    bitwise the same, no violation is counted, and the support kept is the sparsest checked."""
    runs = [constrained(tmp_path, f"d{d}", **{"accuracy.max_accuracy_drop": d})
            for d in (90.0, 99.0)]
    (a, ra), (b, rb) = runs
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(),
                                 strict=True):
        assert torch.equal(x, y), name
    assert ra["drive_stopped_at"] is None and a.method.drive.constraint.violations == 0
    assert ra["selected_compression"] == rb["selected_compression"]
    assert ra["lambda_history"] == rb["lambda_history"]


def test_a_given_reference_skips_the_dense_phase(tmp_path):
    trainer, report = constrained(tmp_path, "given", **{"accuracy.max_accuracy_drop": 1.0,
                                                         "accuracy.reference_accuracy": 80.0})
    assert report["reference_val_acc"] == pytest.approx(0.80)
    assert report["accuracy_bound"] == pytest.approx(0.79)
    rows = list(csv.DictReader(open(tmp_path / "given" / "metrics.csv")))
    assert float(rows[0]["lambda1"]) != 1e-4   # λ moves from the first epoch on


def test_kill_and_resume_with_the_constraint_is_bitwise(tmp_path):
    config = tiny_config(**{**BASE, "accuracy.max_accuracy_drop": 1.0})
    # cut in the middle of the drive (a kept support exists), then once more in fine-tuning
    full, resumed = full_and_resumed(config, tmp_path, 4)
    assert full.method.drive.constraint.report() == resumed.method.drive.constraint.report()
    rows = [list(csv.DictReader(open(tmp_path / d / "metrics.csv"))) for d in ("full", "cut")]
    assert rows[0] == [{**r, "wall_time_s": rows[0][i]["wall_time_s"]}
                       for i, r in enumerate(rows[1])]


def test_a_reference_run_folder_sets_the_reference(tmp_path):
    dense = tmp_path / "dense"
    dense.mkdir()
    config = tiny_config(**BASE)
    (dense / "report.json").write_text(json.dumps(
        {"val_acc": 0.9, "config": {"data": {"dataset": "mnist", "val_size": 2000,
                                             "split_seed": 0}}}))
    with pytest.warns(UserWarning, match="final validation accuracy only: it has no metrics"):
        trainer, report = constrained(tmp_path, "ref", **{"accuracy.max_accuracy_drop": 1.0,
                                                          "accuracy.reference": str(dense)})
    assert report["reference_val_acc"] == 0.9 and report["reference_curve"] is False
    assert report["reference_source"] == "run folder dense (final accuracy: it has no metrics.csv)"
    assert config.data.val_size == trainer.config.data.val_size


@pytest.mark.parametrize("flags, message", [
    (["--max-accuracy-drop", "-1"], "max_accuracy_drop"),
    (["--max-relative-drop", "100"], "max_relative_drop"),
    (["--max-accuracy-drop", "1", "--reference", "no-such-run"], "no report.json"),
    (["--max-accuracy-drop", "1", "--reference-accuracy", "0.9"], "in percent"),
    (["--reference-accuracy", "90"], "needs accuracy.max_accuracy_drop"),
    (["--max-accuracy-drop", "1", "--method", "magnitude"], "not 'magnitude'"),
    (["--max-accuracy-drop", "1", "--target-compression", "10"], "sets the size by hand"),
    (["--max-accuracy-drop", "1", "--epochs", "1"], "no room"),
])
def test_bad_settings_exit_2_before_training(tmp_path, flags, message):
    out = tmp_path / "out"
    done = run_cli("train", "--config", tiny_yaml(tmp_path), "--out", out, *flags)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_compress_takes_the_constraint_as_a_keyword(tmp_path):
    """The Python API: ``max_accuracy_drop=`` on a user's module and plain DataLoaders; the
    report's bound is recomputed from its reference, the returned model meets it."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import cvsparse

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 20, generator=g)
    y = (x[:, :5].sum(1) > 0).long()
    train = DataLoader(TensorDataset(x[:384], y[:384]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[384:], y[384:]), batch_size=128)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
    result = cvsparse.compress(model, train, val, epochs=4, outer=2, lr=0.1, lambda1=1e-2,
                               max_accuracy_drop=5.0, probe_fraction=0.5)
    report = result.report
    assert report["accuracy_bound"] == pytest.approx(report["reference_val_acc"] - 0.05)
    assert evaluate(result.model, val)["acc"] >= report["accuracy_bound"]
    assert report["constraint_met_val"] is True and report["compression_rate"] > 1.5


# ---- AutoPrune: the same schedule, gates closed by the cut ------------------------------------

AP = {"method": "autoprune", "optim.epochs": 6, "autoprune.finetune_epochs": 2,
      "optim.max_steps_per_epoch": 30, "optim.lr": 0.1, "accuracy.probe_fraction": 0.2,
      "accuracy.max_compression": 300.0}


def test_autoprune_keeps_the_sparsest_gates_that_meet_the_bound(tmp_path):
    trainer = Trainer(tiny_config(**{**AP, "accuracy.max_accuracy_drop": 3.0}),
                      tmp_path / "ap", progress=False)
    report = trainer.run()
    exported = trainer.method.measured_model()
    val = evaluate(exported, trainer.val_loader)["acc"]
    assert val == pytest.approx(report["val_acc"]) and val >= report["accuracy_bound"]
    rate = zeros_rate(exported, [n for n, _ in exported.named_parameters()
                                 if n.endswith("weight")])   # every Linear is gated here
    assert rate == pytest.approx(report["compression_rate"])
    assert rate >= report["selected_compression"] > 2
    assert report["gates_frozen_at_epoch"] is not None


def test_autoprune_trains_its_weights_on_the_whole_split_in_the_dense_phase(tmp_path):
    """The dense phase takes no gate step, and its weights train on both halves of the
    training split, as the dense run it is compared with does: in the first (dense) epoch
    every training forward is followed by a weight step, and as many of them draw on the
    second half as on the first (oracle: the halves' own examples)."""
    trainer = Trainer(tiny_config(**{**AP, "accuracy.max_accuracy_drop": 3.0}),
                      tmp_path / "ap", progress=False)
    method = trainer.method
    assert method.drive.dense_end == 2
    first, second = ({row.numpy().tobytes() for x, _ in loader for row in x}
                     for loader in (trainer.train_loader, method.data.second_half))
    seen: list[bytes] = []
    steps = {"weight": 0, "aux": 0}

    def record(module, args):
        if module.training and torch.is_grad_enabled():
            seen.extend(row.numpy().tobytes() for row in args[0])

    trainer.model.register_forward_pre_hook(record)
    for name, opt in (("weight", method.weight_opt), ("aux", method.aux_opt)):
        opt.register_step_post_hook(lambda *_, name=name: steps.__setitem__(name, steps[name] + 1))
    trainer.run(max_epochs=1)
    assert steps == {"weight": 2 * 30, "aux": 0}
    assert sum(row in first for row in seen) == sum(row in second for row in seen) == 30 * 64
    assert len(seen) == 2 * 30 * 64


@pytest.mark.parametrize("aux_lr, gate_step", [(0.1, ["aux"]), (None, [])])
def test_autoprune_drive_keeps_the_dense_runs_pace_of_weight_steps(tmp_path, aux_lr, gate_step):
    """In the drive every training step takes a weight step on the first half's batch, then a
    gate step and a second weight step on the second half's: two weight steps per training
    step, as the dense phase (and the dense run the checks follow) takes them.  An allowed drop
    no check fails keeps the gate steps going for the whole epoch.  With the default
    ``aux_lr`` 0 of a constrained run the gates' optimizer takes no step."""
    extra = {} if aux_lr is None else {"autoprune.aux_lr": aux_lr}
    trainer = Trainer(tiny_config(**{**AP, **extra, "accuracy.max_accuracy_drop": 90.0}),
                      tmp_path / "ap", progress=False)
    method = trainer.method
    trainer.run(max_epochs=method.drive.dense_end)
    order: list[str] = []
    for name, opt in (("weight", method.weight_opt), ("aux", method.aux_opt)):
        opt.register_step_post_hook(lambda *_, name=name: order.append(name))
    trainer.run(max_epochs=method.drive.dense_end + 1)   # the drive's first epoch
    assert method.drive.phase(method.drive.dense_end) == "drive"
    assert order == ["weight", *gate_step, "weight"] * 30


def test_autoprune_drive_without_gate_steps_changes_gates_only_at_its_cuts(tmp_path):
    """Under a constraint ``autoprune.aux_lr`` is 0 unless given: the gate steps move no gate,
    so after a drive epoch every gate holds its value from the drive's start, except those the
    cuts closed (0 and masked); the gates take no gradient."""
    trainer = Trainer(tiny_config(**{**AP, "accuracy.max_accuracy_drop": 90.0}),
                      tmp_path / "ap", progress=False)
    method = trainer.method
    assert trainer.config.autoprune.aux_lr == 0
    trainer.run(max_epochs=method.drive.dense_end)
    aux = [p for g in method.aux_opt.param_groups for p in g["params"]]
    start = [p.detach().clone() for p in aux]
    trainer.run(max_epochs=method.drive.dense_end + 1)   # the drive's first epoch
    closed = 0
    for p, before in zip(aux, start, strict=True):
        mask = method.aux_opt.state[p]["mask"]
        assert torch.equal(p[mask], before[mask]) and bool((p[~mask] == 0).all())
        closed += int((~mask & (before > 0)).sum())
        assert not p.requires_grad and p.grad is None
    assert closed > 0   # the cuts did close gates


def test_autoprune_probe_trains_on_the_batches_of_its_share_of_an_epoch(tmp_path):
    """A probe of ``probe_fraction`` = 0.2 of an epoch trains on the batches the dense run
    takes in a fifth of an epoch: 0.2 · 30 steps · 2 batches per step = 12 (cvgrad, one batch
    per step: 6)."""
    for settings, batches in ((AP, 12), (BASE, 6)):
        trainer = Trainer(tiny_config(**{**settings, "accuracy.max_accuracy_drop": 90.0}),
                          tmp_path / settings.get("method", "cvgrad"), progress=False)
        drive = trainer.method.drive
        trainer.run(max_epochs=drive.dense_end)
        draws = [0]
        fresh = drive.train_batch

        def counted(fresh=fresh, draws=draws):
            draws[0] += 1
            return fresh()

        drive.train_batch = counted
        trainer.run(max_epochs=drive.dense_end + 1)
        checks = [h for h in trainer.method.report()["constraint_history"]
                  if h["at"][0] == drive.dense_end]
        assert len(checks) >= 2 and draws[0] == batches * len(checks)


def test_autoprune_is_monotone_in_the_drop_and_resumes_bitwise(tmp_path):
    rates = []
    for drop in (0.5, 30.0):
        config = tiny_config(**{**AP, "accuracy.max_accuracy_drop": drop})
        if drop == 30.0:   # cut inside the drive, resumed: the same network as uninterrupted
            full, _ = full_and_resumed(config, tmp_path, 3)
            report = full.report()
        else:
            report = Trainer(config, tmp_path / "strict", progress=False).run()
        rates.append(report["compression_rate"])
    assert rates[1] >= rates[0] and rates[1] > 2


def test_autoprune_refuses_neuron_gates_with_a_constraint(tmp_path):
    done = run_cli("train", "--config", tiny_yaml(tmp_path), "--out", tmp_path / "out",
                   "--method", "autoprune", "--granularity", "neuron",
                   "--max-accuracy-drop", "1")
    assert done.returncode == 2 and "granularity 'weight'" in done.stderr


# ---- following a dense run of the same schedule -----------------------------------------------

#: The dense reference: the constrained run's model and 8 epochs, λ1 held at ~0, no threshold.
DENSE = {"optim.epochs": 8, "cvgrad.outer": 1, "optim.max_steps_per_epoch": 30, "optim.lr": 0.1,
         "cvgrad.lambda1": 1e-12, "cvgrad.hyper_lr": 0.0, "cvgrad.learn_lambda2": False,
         "cvgrad.threshold": 0.0}


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference") / "dense"
    Trainer(tiny_config(**DENSE), folder, progress=False).run()
    return folder, list(csv.DictReader(open(folder / "metrics.csv")))


@pytest.mark.parametrize("method", ["cvgrad", "autoprune"])
def test_a_reference_run_of_the_same_schedule_is_followed_epoch_by_epoch(tmp_path, dense_run,
                                                                          method):
    """With ``--reference`` on a dense run of the same 8 epochs (drops of the learning rate at
    epochs 4 and 6), the constrained run takes the dense run's learning rates, stays dense
    until the first drop, drives until the second, and every epoch's bound is the dense run's
    validation accuracy of that epoch minus the drop; the kept check met the bound at its
    point of the schedule (between the dense accuracies of its epoch's two ends)."""
    folder, dense_rows = dense_run
    extra = ({"method": "autoprune", "optim.epochs": 6, "autoprune.finetune_epochs": 2}
             if method == "autoprune" else {})
    trainer, report = constrained(tmp_path, "follow", **{
        **extra, "accuracy.max_accuracy_drop": 2.0, "accuracy.reference": str(folder)})
    rows = list(csv.DictReader(open(tmp_path / "follow" / "metrics.csv")))
    assert [r["lr"] for r in rows] == [r["lr"] for r in dense_rows]
    assert report["reference_curve"] is True
    assert report["reference_source"] == "run folder dense, followed epoch by epoch"
    dense_val = [float(r["val_acc"]) for r in dense_rows]
    assert report["reference_val_acc"] == pytest.approx(dense_val[-1])
    assert report["accuracy_bound"] == pytest.approx(dense_val[-1] - 0.02)   # the final verdict
    assert report["constraint_met_val"] == (report["val_acc"] >= report["accuracy_bound"])
    for row, val in zip(rows, dense_val, strict=True):
        assert float(row["accuracy_bound"]) == pytest.approx(val - 0.02)
    # dense until the first drop (AutoPrune's gates as initialized, some closed), then pruned
    dense_rate = 1.0 if method == "cvgrad" else float(rows[0]["compression_rate"])
    assert all(float(r["compression_rate"]) == pytest.approx(dense_rate) for r in rows[:4])
    assert float(rows[5]["compression_rate"]) > 2 * dense_rate
    epoch, _ = report["selected_at"]
    assert 4 <= epoch < 6   # a check of the drive
    lower = min(dense_val[epoch - 1], dense_val[epoch])
    assert report["selected_val_acc"] >= lower - 0.02
    # each check against the dense run's accuracy after as much training as its probed
    # network had: its step of 30 and the probe's 6 (0.2 of an epoch), to the epoch's end
    checks = report["constraint_history"]
    assert len(checks) == report["constraint_checks"] > 6
    for check in checks:
        e, step = check["at"]
        share = min(1.0, (step + 6) / 30)
        dense_then = (1 - share) * dense_val[e - 1] + share * dense_val[e]
        assert check["bound"] == pytest.approx(dense_then - 0.02), check
    assert any(0 < step < 24 for _, step in (c["at"] for c in checks))   # mid-epoch ones
    if method == "cvgrad":   # (AutoPrune's gated model is counted in its own tests)
        assert zeros_rate(trainer.model, report["regularized_tensors"]) == pytest.approx(
            report["compression_rate"])
    else:   # the weights took the dense run's L2, the gates no step
        dense_l2 = json.loads((folder / "report.json").read_text())["config"]["cvgrad"]["lambda2"]
        assert trainer.method.weight_opt.param_groups[0]["lambda2"] == dense_l2
        assert trainer.method.aux_opt.param_groups[0]["lr"] == 0


def reference_copy(dense_run, folder, **cvgrad) -> str:
    """A copy of the dense run's folder whose stored configuration has ``cvgrad`` changed."""
    source, _ = dense_run
    shutil.copytree(source, folder)
    report = json.loads((folder / "report.json").read_text())
    report["config"]["cvgrad"].update(cvgrad)
    (folder / "report.json").write_text(json.dumps(report))
    return str(folder)


def test_autoprune_defaults_follow_the_constraint_and_the_followed_run(tmp_path, dense_run):
    """Unset, ``autoprune.aux_lr`` is 0.1 and ``autoprune.weight_l2`` 5e-4.  Under an accuracy
    constraint the gates take no steps (``aux_lr`` 0); a run that follows a dense run of its
    schedule takes that run's weight L2 (the ``cvgrad.lambda2`` of its report, when cvgrad did
    not learn it).  Values given are kept; cvgrad's runs leave the section alone."""
    plain = reference_copy(dense_run, tmp_path / "plain", lambda2=3e-4)
    learned = reference_copy(dense_run, tmp_path / "learned", lambda2=3e-4, learn_lambda2=True,
                             hyper_lr=0.01)
    drop = {"accuracy.max_accuracy_drop": 1.0}
    cases = [
        ({}, (0.1, 5e-4)),
        (drop, (0.0, 5e-4)),
        ({**drop, "accuracy.reference": plain}, (0.0, 3e-4)),
        ({**drop, "accuracy.reference": plain, "autoprune.aux_lr": 0.2,
          "autoprune.weight_l2": 1e-3}, (0.2, 1e-3)),
        ({**drop, "accuracy.reference": learned}, (0.0, 5e-4)),
        ({**drop, "accuracy.reference": plain, "optim.epochs": 5}, (0.0, 5e-4)),  # not followed
        ({**drop, "accuracy.reference": str(tmp_path / "missing")}, (0.0, 5e-4)),
        ({**drop, "accuracy.reference": plain, "method": "cvgrad"}, (0.1, 5e-4)),
    ]
    for overrides, expected in cases:
        config = resolve_defaults(tiny_config(**{**AP, **overrides}))
        assert (config.autoprune.aux_lr, config.autoprune.weight_l2) == expected, overrides
    # a section handed to the method's constructor unresolved gets the same defaults
    for constrained, followed, expected in ((False, 3e-4, (0.1, 5e-4)), (True, None, (0.0, 5e-4)),
                                            (True, 3e-4, (0.0, 3e-4))):
        section = resolve_autoprune(AutoPruneConfig(), constrained, followed)
        assert (section.aux_lr, section.weight_l2) == expected


def test_a_reference_run_of_another_schedule_gives_its_final_accuracy_only(tmp_path, dense_run):
    folder, dense_rows = dense_run
    with pytest.warns(UserWarning, match="final validation accuracy only: it has 8 epochs"):
        _, report = constrained(tmp_path, "other", **{
            "optim.epochs": 5, "accuracy.max_accuracy_drop": 2.0,
            "accuracy.reference": str(folder)})
    assert report["reference_curve"] is False
    assert report["reference_val_acc"] == pytest.approx(float(dense_rows[-1]["val_acc"]))
    assert report["accuracy_bound"] == pytest.approx(report["reference_val_acc"] - 0.02)


def test_a_resumed_run_is_judged_against_the_reference_it_started_with(tmp_path, dense_run):
    """The reference run is read once, when the run starts, and stored in its checkpoints.
    Cut in its drive, the run resumes after another curve was written into the reference
    folder, and again after the folder was removed, and ends bit for bit as the uninterrupted
    run, every check judged against the curve it started with.  A resume that would change
    the epoch count of the followed schedule is refused before anything moves."""
    reference = reference_copy(dense_run, tmp_path / "reference")
    config = tiny_config(**{**BASE, "accuracy.max_accuracy_drop": 2.0,
                            "accuracy.reference": reference})
    full = Trainer(copy.deepcopy(config), tmp_path / "full", progress=False)
    full.run()
    Trainer(config, tmp_path / "cut", progress=False).run(max_epochs=5)
    metrics = Path(reference) / "metrics.csv"
    rows = list(csv.DictReader(open(metrics)))
    with open(metrics, "w", newline="") as handle:   # a looser curve: 10 points lower
        out = csv.DictWriter(handle, fieldnames=list(rows[0]))
        out.writeheader()
        out.writerows({**r, "val_acc": float(r["val_acc"]) - 0.1} for r in rows)

    def more_finetuning(stored):
        stored.cvgrad.finetune_epochs += 1
        return stored

    with pytest.raises(ValueError, match="keeps its epoch count"):
        Trainer(RunConfig(), tmp_path / "cut", resume=True, progress=False,
                on_resume=more_finetuning)
    Trainer(RunConfig(), tmp_path / "cut", resume=True, progress=False).run(max_epochs=6)
    shutil.rmtree(reference)
    resumed = Trainer(RunConfig(), tmp_path / "cut", resume=True, progress=False)
    resumed.run()
    assert full.method.drive.constraint.report() == resumed.method.drive.constraint.report()
    for (name, a), (_, b) in zip(full.model.state_dict().items(),
                                 resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resume"
    runs = [list(csv.DictReader(open(tmp_path / d / "metrics.csv"))) for d in ("full", "cut")]
    assert [{**r, "wall_time_s": ""} for r in runs[0]] == [{**r, "wall_time_s": ""}
                                                            for r in runs[1]]


@pytest.mark.parametrize("section", [{"accuracy": {"drive_lr": 0.01}},
                                     {"optim": {"finetune_lr": 0.01}}])
def test_learning_rates_of_a_followed_schedule_cannot_be_set(tmp_path, dense_run, section):
    folder, _ = dense_run
    out = tmp_path / "out"
    recipe = tiny_yaml(tmp_path, data={"batch_size": 64, "val_size": 2000}, **section)
    done = run_cli("train", "--config", recipe, "--epochs", "4", "--outer", "2",
                   "--max-accuracy-drop", "1", "--reference", folder, "--out", out)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "follows its reference run's learning rates" in lines[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("settings", [BASE, AP], ids=["cvgrad", "autoprune"])
def test_a_drive_with_no_feasible_check_keeps_the_network_it_started_from(tmp_path, settings):
    """A bound no support can meet (100% given, 0.1 points allowed): every check fails, and the
    delivered network is the one from before the drive's first cut — denser than the first
    check's level — never the one the failed checks' cuts left behind."""
    trainer = Trainer(tiny_config(**{**settings, "accuracy.max_accuracy_drop": 0.1,
                                     "accuracy.reference_accuracy": 100.0}),
                      tmp_path / "run", progress=False)
    report = trainer.run()
    drive = trainer.method.drive
    assert report["selected_compression"] is None and report["constraint_met_val"] is False
    assert drive.constraint.violations >= drive.accuracy.patience   # the cuts went on
    exported = trainer.method.measured_model()
    rate = zeros_rate(exported, [n for n, _ in exported.named_parameters()
                                 if n.endswith("weight")])   # every Linear weight here
    assert rate == pytest.approx(report["compression_rate"])
    assert rate < drive.accuracy.check_ratio


@pytest.mark.filterwarnings("ignore:bf16 on this CPU:UserWarning")   # a CPU without AVX-512
@pytest.mark.parametrize("method", ["cvgrad", "autoprune"])
def test_the_checks_of_a_bf16_run_compute_in_bf16(tmp_path, method):
    """A bf16 constrained run's checks train and validate copies of the network under bf16
    autocast, as the run's own steps and the dense run it is compared with do (only the
    hyper steps stay float32 by design, and the FLOP count's one-image pass)."""
    base = AP if method == "autoprune" else BASE
    trainer = Trainer(tiny_config(**{**base, "accuracy.max_accuracy_drop": 3.0,
                                     "precision": "bf16"}), tmp_path / method, progress=False)
    seen = []   # (a copy?, training?, under autocast?) of every forward pass on a batch
    trainer.model.register_forward_hook(lambda module, args, out: seen.append(
        (module is not trainer.model, module.training, torch.is_autocast_enabled("cpu")))
        if len(args[0]) > 1 else None)
    report = trainer.run()
    checks = len(report["constraint_history"])
    assert checks >= 3
    copies = [(training, autocast) for copy, training, autocast in seen if copy]
    steps, val_batches = trainer.method.drive.probe_steps(), 2000 // 500
    assert copies.count((True, True)) == checks * steps
    assert copies.count((False, True)) == checks * val_batches
    assert len(copies) == checks * (steps + val_batches)
    assert all(autocast for copy, training, autocast in seen if training)
