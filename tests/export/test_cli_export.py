"""``cvsparse export`` and ``cvsparse eval`` on real (tiny) runs.

Oracles: the run's own report.json (test accuracy of the unmodified model), the pruned model
evaluated here with the normalization written out in float64, and the pruned model's outputs.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from cvsparse import cli
from cvsparse.data import load_dataset
from cvsparse.export import load
from cvsparse.export.portable import read_spec
from cvsparse.models import build_model
from cvsparse.train import checkpoint

from .helpers import magnitude_prune

#: LeNet-300-100 on MNIST (the fixtures), two epochs of five steps: a few seconds.
TINY = """\
model: lenet300
threads: 1
data: {dataset: mnist, batch_size: 32, val_size: 500, val_batch_size: 500}
optim: {epochs: 2, lr: 0.05, max_steps_per_epoch: 5}
cvgrad: {outer: 1, hyper_batches: 1, online_every: 2}
"""


def run_cli(*args) -> subprocess.CompletedProcess:
    """``python -m cvsparse ARGS`` in a fresh process (``$CVSPARSE_DATA`` inherited)."""
    return subprocess.run([sys.executable, "-m", "cvsparse", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished two-epoch LeNet-300 run (a real ``cvsparse train`` process)."""
    folder = tmp_path_factory.mktemp("run")
    (folder / "tiny.yaml").write_text(TINY)
    result = run_cli("train", "--config", folder / "tiny.yaml", "--out", folder / "run",
                     "--quiet")
    assert result.returncode == 0, result.stderr
    return folder / "run"


@pytest.fixture(scope="module")
def pruned_run(tiny_run, tmp_path_factory):
    """``tiny_run`` with its checkpoint's weights 95% magnitude-pruned and 50 hidden neurons
    of the first layer dead (zero rows): what a compressing run leaves."""
    import shutil

    folder = tmp_path_factory.mktemp("pruned") / "run"
    shutil.copytree(tiny_run, folder)
    state = checkpoint.load(folder / checkpoint.CHECKPOINT_NAME)
    model = build_model("lenet300")
    model.load_state_dict(state["model"])
    magnitude_prune(model, 0.95)
    with torch.no_grad():
        model.body[1].weight[::6] = 0.0
    state["model"] = model.state_dict()
    checkpoint.save_atomic(state, folder / checkpoint.CHECKPOINT_NAME)
    return folder, model.eval()


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _accuracy_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("test accuracy"))


def _reference_accuracy(model: nn.Module) -> float:
    """Test accuracy with the training normalization written out in float64."""
    ds = load_dataset("mnist")
    mean = torch.tensor(ds.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(ds.std, dtype=torch.float64).view(1, -1, 1, 1)
    x = ((ds.x_test.double() / 255.0 - mean) / std).float()
    with torch.no_grad():
        return float((model(x).argmax(1) == ds.y_test).double().mean())


def test_export_and_eval_reproduce_the_runs_test_accuracy(tiny_run, tmp_path, capsys):
    import json

    report = json.loads((tiny_run / "report.json").read_text())
    code, out, err = _main(capsys, "export", tiny_run, "--format", "shrunk",
                           "--out", tmp_path / "m.cvsp")
    assert code == 0, err
    assert "parameters" in out and "latency" in out and f"wrote {tmp_path / 'm.cvsp'}" in out
    meta = read_spec(tmp_path / "m.cvsp")["spec"]["metadata"]
    assert meta["model"] == "lenet300" and meta["dataset"] == "mnist"
    assert len(meta["normalization"]["mean"]) == 1
    code, out, err = _main(capsys, "eval", tmp_path / "m.cvsp", "--dataset", "mnist",
                           "--batch-size", "50")
    assert code == 0, err
    assert f"{100 * report['test_acc']:.2f}%" in _accuracy_line(out)
    for row in ("parameters", "file size", "latency, batch 1 ", "latency, batch 50 "):
        assert row in out
    assert "dense lenet300" in out


def test_shrunk_export_is_small_and_exact(pruned_run, tmp_path, capsys):
    folder, model = pruned_run
    code, out, err = _main(capsys, "export", folder, "--format", "shrunk",
                           "--out", tmp_path / "m.cvsp")
    assert code == 0, err
    loaded = load(tmp_path / "m.cvsp")
    assert loaded.get_submodule("body.1").out_features <= 250     # dead neurons removed
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
    weights = sum(int(m.weight.count_nonzero()) for m in model.modules()
                  if isinstance(m, nn.Linear))
    size = (tmp_path / "m.cvsp").stat().st_size
    assert size <= 1.2 * (4 * nonzero + 4 * weights) + 8192
    code, out, err = _main(capsys, "eval", tmp_path / "m.cvsp", "--dataset", "mnist")
    assert code == 0, err
    accuracy = float(_accuracy_line(out).split()[-2].rstrip("%")) / 100
    assert accuracy == pytest.approx(_reference_accuracy(model), abs=1.5e-3)   # ≤ 1 image


def test_onnx_export_matches_the_model(pruned_run, tmp_path, capsys):
    folder, model = pruned_run
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
    code, out, err = _main(capsys, "export", folder, "--format", "onnx",
                           "--out", tmp_path / "m.onnx")
    assert code == 0, err
    runner = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = runner.run(None, {runner.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    code, out, err = _main(capsys, "eval", tmp_path / "m.onnx", "--dataset", "mnist",
                           "--batch-size", "100")
    assert code == 0, err
    accuracy = float(_accuracy_line(out).split()[-2].rstrip("%")) / 100
    assert accuracy == pytest.approx(_reference_accuracy(model), abs=1.5e-3)


def test_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.cvsp").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    exported = tmp_path / "m.cvsp"
    assert _main(capsys, "export", tiny_run, "--format", "shrunk", "--out", exported)[0] == 0
    flipped = bytearray(exported.read_bytes())
    flipped[len(flipped) // 2] ^= 0x10
    (tmp_path / "flipped.cvsp").write_bytes(bytes(flipped))
    cases = [
        (("export", tmp_path / "none", "--out", tmp_path / "a.cvsp"), "not a run folder"),
        (("export", tmp_path / "empty", "--out", tmp_path / "a.cvsp"), "no checkpoint"),
        (("export", tiny_run, "--out", tmp_path), "is a folder"),
        (("export", tiny_run, "--out", tmp_path / "no" / "a.cvsp"), "does not exist"),
        (("export", tiny_run, "--out", tmp_path / "a.cvsp", "--batch-size", "0"),
         "--batch-size"),
        (("eval", tmp_path / "none.cvsp", "--dataset", "mnist"), "no file"),
        (("eval", tmp_path / "junk.cvsp", "--dataset", "mnist"), "corrupt"),
        (("eval", tmp_path / "flipped.cvsp", "--dataset", "mnist"), "SHA-256"),
        (("eval", exported, "--dataset", "cifar10"), "does not take cifar10 images"),
    ]
    for argv, named in cases:
        code, out, err = _main(capsys, *argv)
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], (
            argv, err)


def test_the_command_as_a_process(tiny_run, tmp_path):
    result = run_cli("export", tiny_run, "--format", "shrunk", "--out", tmp_path / "m.cvsp")
    assert result.returncode == 0, result.stderr
    result = run_cli("eval", tmp_path / "m.cvsp", "--dataset", "cifar10", "--no-download")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "does not take cifar10 images" in lines[0]


def test_an_autoprune_run_exports_with_its_gates_applied(tmp_path, capsys):
    import json

    (tmp_path / "tiny.yaml").write_text(TINY)
    result = run_cli("train", "--config", tmp_path / "tiny.yaml", "--method", "autoprune",
                     "--out", tmp_path / "run", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    code, out, err = _main(capsys, "export", tmp_path / "run", "--format", "shrunk",
                           "--out", tmp_path / "m.cvsp")
    assert code == 0, err
    assert not any("Gated" in type(m).__name__ for m in load(tmp_path / "m.cvsp").modules())
    code, out, err = _main(capsys, "eval", tmp_path / "m.cvsp", "--dataset", "mnist")
    assert code == 0, err
    assert f"{100 * report['test_acc']:.2f}%" in _accuracy_line(out)


def test_the_default_sparse_export_matches_the_model(pruned_run, tmp_path, capsys):
    folder, model = pruned_run
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
    code, out, err = _main(capsys, "export", folder, "--out", tmp_path / "m.cvsp",
                           "--batch-size", "4")
    assert code == 0, err
    assert "| layer |" in out                                   # sparsify's per-layer choices
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "m.cvsp")(x), want, rtol=1e-4, atol=1e-4)
    code, out, err = _main(capsys, "eval", tmp_path / "m.cvsp", "--dataset", "mnist")
    assert code == 0, err
    accuracy = float(_accuracy_line(out).split()[-2].rstrip("%")) / 100
    assert accuracy == pytest.approx(_reference_accuracy(model), abs=1.5e-3)
