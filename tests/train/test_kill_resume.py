"""kill -9 of a real training process at random moments, some inside a checkpoint write: the
resumed run ends bit for bit where an uninterrupted run ends (CPU)."""

from __future__ import annotations

import random
import signal
import time

import torch

from cvsparse.train import checkpoint

from .cli_helpers import cli_env, run_cli, start_cli, tiny_yaml

#: Four epochs (two outer iterations with hyper passes, online λ steps): ~1 s of training.
SECTIONS = {"optim": {"epochs": 2}, "cvgrad": {"outer": 2}}


def _final_state(folder) -> dict:
    return checkpoint.CheckpointStore(folder).load()


def _assert_same_run(got: dict, want: dict) -> None:
    assert got["epoch"] == want["epoch"]
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), f"{name} differs after resume"
    assert torch.equal(got["method"]["lambdas"]["lambda"], want["method"]["lambdas"]["lambda"])
    assert [r["test_acc"] for r in got["rows"]] == [r["test_acc"] for r in want["rows"]]
    assert [r["lambda1"] for r in got["rows"]] == [r["lambda1"] for r in want["rows"]]


def _kill_at(proc, folder, moment: str, delay: float) -> int:
    """SIGKILL ``proc`` once a checkpoint exists: ``delay`` s later ("anytime"), or while it
    is stalled inside a later checkpoint write ("in-write")."""
    deadline = time.monotonic() + 60
    current, previous = folder / checkpoint.CHECKPOINT_NAME, folder / checkpoint.PREVIOUS_NAME
    tmp = folder / (checkpoint.CHECKPOINT_NAME + ".tmp")
    while time.monotonic() < deadline and proc.poll() is None:
        if moment == "anytime" and (current.exists() or previous.exists()):
            time.sleep(delay)
            break
        if moment == "in-write" and previous.exists() and tmp.exists():
            time.sleep(delay)
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return proc.returncode


def test_kill_9_at_random_moments_then_resume_is_bitwise_identical(tmp_path):
    config = tiny_yaml(tmp_path, **SECTIONS)
    reference = run_cli("train", "--config", config, "--out", tmp_path / "full", "--quiet")
    assert reference.returncode == 0, reference.stderr
    want = _final_state(tmp_path / "full")
    rng = random.Random(21)
    moments = ["in-write", "anytime"] * 5   # the 10 trials, half inside a write
    for trial, moment in enumerate(moments):
        folder = tmp_path / f"trial{trial}"
        stall = {checkpoint.STALL_ENV: "0.4"}   # every write lasts long enough to be hit
        proc = start_cli("train", "--config", config, "--out", folder, "--quiet",
                         env=cli_env(**stall))
        # inside a write: well within its 0.4 s stall; anytime: anywhere in the next second
        delay = rng.uniform(0.0, 0.3) if moment == "in-write" else rng.uniform(0.0, 1.0)
        assert _kill_at(proc, folder, moment, delay) == -signal.SIGKILL
        resumed = run_cli("train", "--resume", folder, "--quiet")
        assert resumed.returncode == 0, f"trial {trial} ({moment}): {resumed.stderr}"
        assert "Traceback" not in resumed.stderr
        if moment == "in-write":   # killed with only checkpoint.prev.pt in place
            assert "resuming from checkpoint.prev.pt" in resumed.stderr
        _assert_same_run(_final_state(folder), want)
