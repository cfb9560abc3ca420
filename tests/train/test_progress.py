"""Progress output: tqdm's redrawn bar on a terminal, one plain line per epoch elsewhere."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys

from cvsparse.train import Trainer

from .test_trainer import tiny_config

EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+): (\d+) steps, loss \d+\.\d{4}, acc \d\.\d{3}, ")


def test_piped_stderr_gets_one_line_per_epoch_and_no_carriage_returns(tmp_path):
    """``cvsparse train`` with stderr a pipe (a CI log, ``2> file``): no ``\\r`` redraws, and
    exactly one progress line per epoch, in order; the oracle for the epochs and their step
    counts is the run's own ``metrics.csv`` and ``--max-steps-per-epoch``."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cvsparse.cli", "train", "--model", "lenet300", "--dataset",
           "mnist", "--method", "magnitude", "--epochs", "2", "--max-steps-per-epoch", "4",
           "--threads", "1", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, timeout=600)   # stderr: a pipe
    assert run.returncode == 0, run.stderr.decode()
    err = run.stderr.decode()
    assert "\r" not in err
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    total = len(rows)
    assert total >= 2    # the training epochs and magnitude's fine-tuning
    progress = [m.groups() for m in map(EPOCH_LINE.match, err.splitlines()) if m]
    assert progress == [(str(k), str(total), "4") for k in range(1, total + 1)], err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_stderr_keeps_the_tqdm_bar(tmp_path, monkeypatch):
    """On a terminal the bar is redrawn in place (carriage returns) and the plain per-epoch
    line is not printed."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    Trainer(tiny_config(**{"optim.epochs": 1, "cvgrad.outer": 1}), tmp_path,
            progress=True).run()
    text = terminal.getvalue()
    assert "\r" in text and "epoch 1/1" in text
    assert not any(EPOCH_LINE.match(line) for line in text.replace("\r", "\n").splitlines())


def test_quiet_run_prints_no_progress(tmp_path, capsys):
    Trainer(tiny_config(**{"optim.epochs": 1, "cvgrad.outer": 1}), tmp_path,
            progress=False).run()
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
