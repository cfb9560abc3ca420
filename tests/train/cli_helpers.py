"""Real ``python -m cvsparse`` processes on tiny MNIST runs, for the end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

#: LeNet-300-100 on MNIST, two epochs of five steps: a few seconds per process.
TINY = {
    "model": "lenet300", "threads": 1,
    "data": {"dataset": "mnist", "batch_size": 32, "val_size": 500, "val_batch_size": 500},
    "optim": {"epochs": 2, "lr": 0.05, "max_steps_per_epoch": 5},
    "cvgrad": {"outer": 1, "hyper_batches": 1, "online_every": 2},
}


def tiny_yaml(folder: Path, name: str = "tiny.yaml", **sections: dict) -> Path:
    """A YAML recipe of :data:`TINY` with ``sections`` merged in (one level deep)."""
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    path = folder / name
    path.write_text(yaml.safe_dump(values))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    """The test process's environment (``$CVSPARSE_DATA`` included) plus ``extra``."""
    return {**os.environ, **extra}


def run_cli(*args: str | Path, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m cvsparse ARGS`` to completion, output captured as text."""
    return subprocess.run([sys.executable, "-m", "cvsparse", *map(str, args)],
                          capture_output=True, text=True, env=env or cli_env(), timeout=timeout)


def start_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m cvsparse ARGS`` started in the background."""
    return subprocess.Popen([sys.executable, "-m", "cvsparse", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or cli_env())


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single ``error: ...`` line a refused command prints (asserts there is no
    traceback and exactly one error line)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]
