"""Provenance: a ``--data-root`` that does not exist is an error; the report names the data
file actually read with its SHA-256, and the versions and machine that produced it."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import torch

import cvsparse
from cvsparse.data import load_dataset

from .cli_helpers import one_line_error, run_cli, tiny_yaml


def test_missing_data_root_is_refused_before_anything_is_written(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_cli("train", "--config", tiny_yaml(tmp_path), "--data-root", missing,
                     "--out", tmp_path / "out", "--quiet")
    assert result.returncode == 2
    line = one_line_error(result)
    assert str(missing) in line and "does not exist" in line and "'mnist'" in line
    assert not (tmp_path / "out").exists() and not missing.exists()


def test_report_records_the_file_read_its_sha256_and_versions(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    source = Path(load_dataset("mnist").source)   # whichever MNIST file the tests use
    copy = root / "mnist.npz"
    shutil.copyfile(source, copy)
    with open(copy, "rb") as f:
        want_sha = hashlib.sha256(f.read()).hexdigest()
    result = run_cli("train", "--config", tiny_yaml(tmp_path), "--data-root", root,
                     "--out", tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "out" / "report.json").read_text())["provenance"]
    assert record["data"]["files"] == [{"path": str(copy.resolve()), "sha256": want_sha,
                                        "bytes": copy.stat().st_size}]
    assert record["package_version"] == cvsparse.__version__
    assert record["torch_version"] == torch.__version__
    assert record["device"]["type"] == "cpu" and record["device"]["name"]
    repo = Path(cvsparse.__file__).resolve().parent.parent
    if (repo / ".git").exists():
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        assert record["git_commit"].split("+")[0] == head


def test_resume_reads_the_same_data_or_refuses(tmp_path):
    """``--data-root`` may move on resume (resume-safe), but the files read must be the ones
    the run started with (oracle: their SHA-256, recorded in the checkpoint)."""
    import numpy as np

    source = Path(load_dataset("mnist").source)
    roots = {name: tmp_path / name for name in ("a", "b", "c")}
    for root in roots.values():
        root.mkdir()
    shutil.copyfile(source, roots["a"] / "mnist.npz")
    shutil.copyfile(source, roots["b"] / "mnist.npz")           # the same bytes elsewhere
    with np.load(source) as archive:
        arrays = {k: archive[k].copy() for k in archive.files}
    arrays["x_train"][0, 0, 0] ^= 1                               # one pixel differs
    np.savez(roots["c"] / "mnist.npz", **arrays)
    config = tiny_yaml(tmp_path, optim={"epochs": 3})
    out = tmp_path / "out"
    assert run_cli("train", "--config", config, "--data-root", roots["a"], "--out", out,
                   "--quiet").returncode == 0
    changed = run_cli("train", "--resume", out, "--data-root", roots["c"], "--quiet")
    assert changed.returncode == 2
    assert "not the data this run started with" in one_line_error(changed)
    moved = run_cli("train", "--resume", out, "--data-root", roots["b"], "--quiet")
    assert moved.returncode == 0, moved.stderr
