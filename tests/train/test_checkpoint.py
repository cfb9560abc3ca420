"""Checkpoints that cannot lie: plain-data files, a verified checksum, the previous checkpoint
as a fallback, and no code run from any file a user hands over."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from cvsparse.train import checkpoint
from cvsparse.train.checkpoint import CheckpointError, CheckpointStore

from .cli_helpers import one_line_error, run_cli, tiny_yaml


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"epoch": seed, "model": {"w": torch.randn(64, 32, generator=g),
                                     "mask": torch.rand(64, generator=g) > 0.5},
            "rows": [{"epoch": 0, "lr": 0.1, "note": None}], "split": (torch.arange(5),)}


def _equal(a, b) -> bool:
    return checkpoint.digest(a) == checkpoint.digest(b)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished two-epoch CLI run (so both checkpoint.pt and checkpoint.prev.pt exist)."""
    root = tmp_path_factory.mktemp("run")
    result = run_cli("train", "--config", tiny_yaml(root), "--out", root / "run", "--quiet")
    assert result.returncode == 0, result.stderr
    return root / "run"


def test_every_file_a_run_writes_loads_weights_only_or_is_json(run_dir):
    for name in (checkpoint.CHECKPOINT_NAME, checkpoint.PREVIOUS_NAME):
        envelope = torch.load(run_dir / name, weights_only=True)
        assert envelope["sha256"] == checkpoint.digest(envelope["state"])
        assert isinstance(envelope["state"]["config"], dict)
    assert torch.load(run_dir / checkpoint.PREVIOUS_NAME, weights_only=True)["state"][
        "epoch"] == 1
    json.loads((run_dir / "report.json").read_text())


def test_digest_refuses_objects_a_weights_only_load_could_not_restore(tmp_path):
    import numpy as np

    with pytest.raises(TypeError, match="float64"):
        checkpoint.save_atomic({"x": np.float64(1.0)}, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("fraction", [0.0, 0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.97, 0.999])
def test_a_flipped_byte_never_loads_different_content(tmp_path, fraction):
    """Oracle: the state as written.  Either the load refuses with CheckpointError, or (a byte
    the content does not depend on, e.g. zip padding) it returns exactly that state."""
    state = _state(1)
    path = tmp_path / "c.pt"
    checkpoint.save_atomic(state, path)
    raw = bytearray(path.read_bytes())
    offset = min(int(fraction * len(raw)), len(raw) - 1)
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))
    try:
        loaded = checkpoint.load(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
    else:
        assert _equal(loaded, state)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.25, 0.5, 0.75, 0.99])
def test_a_truncated_file_is_refused(tmp_path, fraction):
    path = tmp_path / "c.pt"
    checkpoint.save_atomic(_state(1), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(fraction * len(raw))])
    with pytest.raises(CheckpointError, match="cannot read|not a cvsparse"):
        checkpoint.load(path)


def test_store_keeps_the_previous_checkpoint_and_falls_back_to_it(tmp_path):
    store = CheckpointStore(tmp_path, required=("epoch", "model"))
    store.save(_state(1))
    store.save(_state(2))
    assert _equal(checkpoint.load(tmp_path / checkpoint.PREVIOUS_NAME), _state(1))
    raw = bytearray(store.current.read_bytes())
    store.current.write_bytes(bytes(raw[: len(raw) // 2]))
    reader = CheckpointStore(tmp_path, required=("epoch", "model"))
    with pytest.warns(UserWarning, match="resuming from checkpoint.prev.pt"):
        assert _equal(reader.load(), _state(1))
    reader.save(_state(3))   # the damaged file is replaced, not kept as the previous one
    assert _equal(checkpoint.load(tmp_path / checkpoint.PREVIOUS_NAME), _state(1))
    assert _equal(CheckpointStore(tmp_path).load(), _state(3))


def test_store_refuses_when_no_checkpoint_is_valid(tmp_path):
    store = CheckpointStore(tmp_path, required=("epoch", "model", "optimizer"))
    store.save(_state(1))
    store.save(_state(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match="missing optimizer") as caught:
            store.load()
    assert "\n" not in str(caught.value)


def _corrupt(path, offset_fraction: float) -> None:
    raw = bytearray(path.read_bytes())
    raw[int(offset_fraction * len(raw))] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_cli_resume_falls_back_to_the_previous_checkpoint(tmp_path):
    """A damaged checkpoint.pt: the resume warns, reruns the last epoch from checkpoint.prev.pt
    and ends where the uninterrupted run ended (oracle: that run's report)."""
    config = tiny_yaml(tmp_path)
    full = run_cli("train", "--config", config, "--out", tmp_path / "full", "--quiet")
    assert full.returncode == 0, full.stderr
    cut = tmp_path / "cut"
    assert run_cli("train", "--config", config, "--out", cut, "--quiet").returncode == 0
    raw = (cut / checkpoint.CHECKPOINT_NAME).read_bytes()
    (cut / checkpoint.CHECKPOINT_NAME).write_bytes(raw[: len(raw) // 3])
    resumed = run_cli("train", "--resume", cut, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert "resuming from checkpoint.prev.pt" in resumed.stderr
    want = json.loads((tmp_path / "full" / "report.json").read_text())
    got = json.loads((cut / "report.json").read_text())
    assert (got["test_acc"], got["params_nonzero"]) == (want["test_acc"], want["params_nonzero"])
    full_state = checkpoint.load(tmp_path / "full" / checkpoint.CHECKPOINT_NAME)["model"]
    for name, tensor in checkpoint.load(cut / checkpoint.CHECKPOINT_NAME)["model"].items():
        assert torch.equal(tensor, full_state[name]), name


def test_cli_resume_with_no_valid_checkpoint_exits_2(tmp_path, run_dir):
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in (checkpoint.CHECKPOINT_NAME, checkpoint.PREVIOUS_NAME):
        (cut / name).write_bytes((run_dir / name).read_bytes())
    _corrupt(cut / checkpoint.CHECKPOINT_NAME, 0.5)
    (cut / checkpoint.PREVIOUS_NAME).write_bytes(b"")
    result = run_cli("train", "--resume", cut, "--quiet")
    assert result.returncode == 2
    line = one_line_error(result)
    assert checkpoint.CHECKPOINT_NAME in line and checkpoint.PREVIOUS_NAME in line


def test_cli_pretrained_refuses_a_damaged_checkpoint(tmp_path, run_dir):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((run_dir / checkpoint.CHECKPOINT_NAME).read_bytes())
    _corrupt(damaged, 0.6)
    result = run_cli("train", "--config", tiny_yaml(tmp_path), "--method", "autoprune",
                     "--pretrained", damaged, "--out", tmp_path / "o", "--quiet")
    assert result.returncode == 2
    line = one_line_error(result)
    assert str(damaged) in line and ("corrupt" in line or "cannot read" in line)


class _Payload:
    """Unpickling this object would create ``marker`` (``__reduce__`` names ``open``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["pretrained", "resume"])
def test_a_crafted_pickle_is_refused_and_never_run(tmp_path, how):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    for name in (checkpoint.CHECKPOINT_NAME, checkpoint.PREVIOUS_NAME):
        torch.save({"model": _Payload(marker)}, folder / name, pickle_protocol=2)
    probe = tmp_path / "probe.pt"   # the oracle: an unrestricted load does run such a file
    torch.save({"model": _Payload(tmp_path / "probe")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe").exists()
    if how == "pretrained":
        args = ["train", "--config", tiny_yaml(tmp_path), "--method", "autoprune",
                "--pretrained", folder / checkpoint.CHECKPOINT_NAME, "--out", tmp_path / "o"]
    else:
        args = ["train", "--resume", folder]
    result = run_cli(*args, "--quiet")
    assert result.returncode == 2, result.stderr
    assert "refused" in one_line_error(result)
    assert not marker.exists()
