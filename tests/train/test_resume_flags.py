"""Resume is explicit: ``--resume DIR`` with a flag that would change the stored configuration is
refused naming it; threads, device, data location, quiet and more fine-tuning epochs are
accepted."""

from __future__ import annotations

import csv
import json
import warnings

import pytest

from cvsparse import cli
from cvsparse.config import RunConfig
from cvsparse.train.checkpoint import CHECKPOINT_NAME

from .cli_helpers import one_line_error, run_cli, tiny_yaml


def _resume(argv: list[str], stored: RunConfig) -> RunConfig:
    args = cli._parser().parse_args(["train", "--resume", "unused", *argv])
    return cli.resume_config(args, stored)


def test_flags_that_change_the_configuration_are_named_and_refused():
    stored = RunConfig()
    stored.optim.lr = 0.1
    with pytest.raises(ValueError) as caught, warnings.catch_warnings():
        warnings.simplefilter("error")   # refused: no warning about the threads first
        _resume(["--model", "lenet5", "--epochs", "7", "--lr", str(stored.optim.lr),
                 "--aux-lr", "0.5", "--threads", "2"], stored)
    named = str(caught.value).split(" would change it")[0].split("; ")[1].split(", ")
    assert named == ["--model", "--epochs", "--aux-lr"]   # --lr as stored, --threads allowed


@pytest.mark.parametrize("argv, named", [
    (["--config", "x.yaml"], "--config"), (["--out", "elsewhere"], "--out"),
    (["--overwrite"], "--overwrite"), (["--finetune-epochs", "0"], "--finetune-epochs"),
])
def test_resume_refuses_a_new_recipe_folder_or_fewer_epochs(argv, named):
    stored = RunConfig()
    stored.cvgrad.finetune_epochs = 2
    with pytest.raises(ValueError, match=named):
        _resume(argv, stored)


def test_resume_safe_flags_are_applied():
    stored = RunConfig()
    with pytest.warns(UserWarning, match="^--threads 3 instead of"):
        resumed = _resume(["--threads", "3", "--device", "cpu", "--data-root", "/data",
                           "--finetune-epochs", "4", "--quiet"], stored)
    assert (resumed.threads, resumed.device, resumed.data.root) == (3, "cpu", "/data")
    assert resumed.cvgrad.finetune_epochs == 4
    stored_swa = RunConfig()
    stored_swa.cvgrad.finetune_epochs, stored_swa.optim.swa_epochs = 2, 1
    with pytest.raises(ValueError, match="--finetune-epochs"):   # would move the SWA window
        _resume(["--finetune-epochs", "4"], stored_swa)


def test_another_thread_count_is_accepted_with_a_warning_that_names_both():
    def one_thread() -> RunConfig:
        stored = RunConfig()
        stored.threads = 1
        return stored

    with pytest.warns(UserWarning, match=r"^--threads 3 instead of the 1 it was trained with: "
                                         r".*not bit for bit"):
        assert _resume(["--threads", "3"], one_thread()).threads == 3
    with pytest.warns(UserWarning, match=r"^--threads 2 instead of torch's default it used"):
        assert _resume(["--threads", "2"], RunConfig()).threads == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the thread count it had: no warning
        assert _resume(["--threads", "1"], one_thread()).threads == 1


def test_cli_resume_refuses_changes_and_accepts_more_epochs(tmp_path):
    out = tmp_path / "run"
    first = run_cli("train", "--config", tiny_yaml(tmp_path), "--out", out, "--quiet")
    assert first.returncode == 0, first.stderr
    before = (out / CHECKPOINT_NAME).read_bytes()
    refused = run_cli("train", "--resume", out, "--model", "lenet5", "--epochs", "3", "--quiet")
    assert refused.returncode == 2
    line = one_line_error(refused)
    assert "--model" in line and "--epochs" in line
    assert (out / CHECKPOINT_NAME).read_bytes() == before

    more = run_cli("train", "--resume", out, "--finetune-epochs", "1", "--threads", "1",
                   "--device", "cpu", "--quiet")
    assert more.returncode == 0, more.stderr
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["cvgrad"]["finetune_epochs"] == 1 and report["epochs"] == 3
