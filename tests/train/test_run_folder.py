"""Output folders are never mixed: another run's folder is refused unless ``--overwrite``, an
unusable ``--out`` is refused before any data is read, and one folder has one writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cvsparse.train import rundir
from cvsparse.train.checkpoint import CHECKPOINT_NAME, STALL_ENV

from .cli_helpers import cli_env, one_line_error, run_cli, start_cli, tiny_yaml


def _no_data_yaml(tmp_path):
    """A recipe whose data cannot be found: a command that read data first would fail on
    that instead of the output folder."""
    empty = tmp_path / "no-data"
    empty.mkdir(exist_ok=True)
    return tiny_yaml(tmp_path, "nodata.yaml", data={"root": str(empty), "download": False})


def test_another_runs_folder_is_refused_then_replaced_with_overwrite(tmp_path):
    out = tmp_path / "run"
    first = run_cli("train", "--config", tiny_yaml(tmp_path), "--out", out, "--quiet")
    assert first.returncode == 0, first.stderr
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert (out / "plots" / "lambda.png").exists()   # cvgrad plots λ; magnitude does not

    again = run_cli("train", "--config", tiny_yaml(tmp_path), "--method", "magnitude",
                    "--out", out, "--quiet")
    assert again.returncode == 2
    line = one_line_error(again)
    assert "holds another run" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    replaced = run_cli("train", "--config", tiny_yaml(tmp_path), "--method", "magnitude",
                       "--out", out, "--overwrite", "--quiet")
    assert replaced.returncode == 0, replaced.stderr
    assert not (out / "plots" / "lambda.png").exists()
    assert (out / "plots" / "accuracy.png").exists()
    assert '"method": "magnitude"' in (out / "report.json").read_text()
    assert (out / "notes.txt").read_text() == "mine"          # not a run's file: left alone
    assert not (out / rundir.LOCK_NAME).exists()               # released at the end


@pytest.mark.parametrize("case", ["file", "under-file"])
def test_unusable_out_is_refused_before_any_data_is_read(tmp_path, case):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = {"file": blocker, "under-file": blocker / "sub" / "run"}[case]
    result = run_cli("train", "--config", _no_data_yaml(tmp_path), "--out", out, "--quiet")
    assert result.returncode == 2
    line = one_line_error(result)
    assert "output folder" in line and "is a file" in line and "not found" not in line
    assert blocker.read_text() == "x"


def test_a_read_only_out_is_refused_unless_the_process_may_write_there(tmp_path):
    """A folder without write permission stops the run before anything is written; root may
    write there all the same (permission bits do not bind it), and its run completes."""
    (tmp_path / "ro").mkdir(mode=0o555)
    out = tmp_path / "ro" / "run"
    result = run_cli("train", "--config", tiny_yaml(tmp_path), "--out", out, "--quiet")
    if os.geteuid() == 0:
        assert result.returncode == 0, result.stderr
        assert (out / "report.json").is_file()
    else:
        assert result.returncode == 2
        line = one_line_error(result)
        assert "output folder" in line and "not writable" in line
        assert not out.exists()


def test_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path):
    first = rundir.RunLock(tmp_path / "run")
    first.acquire()
    assert (tmp_path / "run" / rundir.LOCK_NAME).read_text() == f"{os.getpid()}\n"
    with pytest.raises(rundir.RunDirError, match=f"in use by process {os.getpid()}"):
        rundir.RunLock(tmp_path / "run").acquire()
    first.release()
    assert not (tmp_path / "run" / rundir.LOCK_NAME).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run" / rundir.LOCK_NAME).write_text(f"{dead.pid}\n")   # a stale lock
    with rundir.RunLock(tmp_path / "run"):
        assert (tmp_path / "run" / rundir.LOCK_NAME).read_text() == f"{os.getpid()}\n"


def _wait_for(path, proc, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_second_writer_is_refused_and_a_killed_writers_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    writer = start_cli("train", "--config", tiny_yaml(tmp_path), "--out", out, "--quiet",
                       env=cli_env(**{STALL_ENV: "30"}))
    try:
        _wait_for(out / (CHECKPOINT_NAME + ".tmp"), writer)   # stalled inside a write
        for args in (["--resume", out], ["--config", tiny_yaml(tmp_path), "--out", out,
                                         "--overwrite"]):
            second = run_cli("train", *args, "--quiet")
            assert second.returncode == 2
            assert f"in use by process {writer.pid}" in one_line_error(second)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.communicate()
    assert (out / rundir.LOCK_NAME).read_text().strip() == str(writer.pid)   # left behind
    taken = run_cli("train", "--config", tiny_yaml(tmp_path), "--out", out, "--overwrite",
                    "--quiet")
    assert taken.returncode == 0, taken.stderr
    assert (out / "report.json").exists() and not (out / rundir.LOCK_NAME).exists()


@pytest.mark.parametrize("text, message", [
    ('{"config": {"model"', "is not valid JSON"),
    ('[1, 2]', "is not a cvsparse report"),
    ('{"config": {}}', "is not a cvsparse report (no test_acc"),
])
@pytest.mark.parametrize("command", ["summary", "compare"])
def test_summary_and_compare_refuse_a_damaged_report(tmp_path, text, message, command):
    (tmp_path / "report.json").write_text(text)
    result = run_cli(command, tmp_path)
    assert result.returncode == 2
    line = one_line_error(result)
    assert message in line and str(tmp_path / "report.json") in line
