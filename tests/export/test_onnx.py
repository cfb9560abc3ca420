"""ONNX export: the file runs in onnxruntime (standard operators only) and matches PyTorch within
1e-4 at the example batch and at others; what cannot be exported is a one-line error."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from cvsparse.export import load, save, to_onnx
from cvsparse.export.onnx_export import OnnxExportError
from cvsparse.models import build_model

from .helpers import Custom, magnitude_prune, sparse_lenet5, trained_bn, zoo_model

TOL = 1e-4


def _run(path, *inputs: torch.Tensor) -> list[np.ndarray]:
    runner = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(runner.get_inputs(), inputs, strict=True)}
    return runner.run(None, feeds)


def _check(model: nn.Module, path, shape: tuple[int, ...], batches=(1, 4)) -> None:
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}   # standard operators only
    for batch in batches:
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            want = model(x)
        want = want if isinstance(want, tuple) else (want,)
        got = _run(path, x)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.shape == tuple(w.shape)
            np.testing.assert_allclose(g, w.numpy(), rtol=TOL, atol=TOL)


def test_sparse_lenet300_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    model = magnitude_prune(build_model("lenet300"), 0.98)
    to_onnx(model, torch.randn(1, 1, 28, 28), tmp_path / "m.onnx")
    _check(model, tmp_path / "m.onnx", (1, 28, 28))


def test_resnet20_with_trained_batchnorm_matches_pytorch(tmp_path):
    model = zoo_model("resnet20")
    size = to_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "m.onnx")
    assert size == (tmp_path / "m.onnx").stat().st_size
    _check(model, tmp_path / "m.onnx", (3, 32, 32), batches=(1, 3))


def test_custom_module_with_two_outputs_and_a_portable_round_trip(tmp_path):
    torch.manual_seed(0)
    model = trained_bn(Custom())
    x = torch.randn(2, 3, 10, 10)
    save(model, tmp_path / "m.cvsp", example_input=x)
    loaded = load(tmp_path / "m.cvsp")                      # an fx.GraphModule exports too
    to_onnx(loaded, x, tmp_path / "m.onnx")
    _check(model, tmp_path / "m.onnx", (3, 10, 10))


def test_a_fixed_batch_export_takes_only_that_batch(tmp_path):
    model = trained_bn(build_model("lenet5"))
    to_onnx(model, torch.randn(2, 1, 28, 28), tmp_path / "m.onnx", dynamic_batch=False,
            metadata={"model": "lenet5"})
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert props["cvsparse"] == '{"model": "lenet5"}'
    _check(model, tmp_path / "m.onnx", (1, 28, 28), batches=(2,))
    with pytest.raises(Exception, match="[Ii]nvalid|dimension|shape"):
        _run(tmp_path / "m.onnx", torch.randn(3, 1, 28, 28))


class _Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_an_unexportable_model_is_a_one_line_error(tmp_path):
    with pytest.raises(OnnxExportError, match="cannot export _Branchy") as info:
        to_onnx(_Branchy(), torch.randn(2, 3), tmp_path / "m.onnx")
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    with pytest.raises(OnnxExportError, match="tensor or a tuple"):
        to_onnx(nn.Identity(), [torch.randn(2, 3)], tmp_path / "m.onnx")


def test_sparse_layers_export_as_dense_standard_operators(tmp_path):
    model = sparse_lenet5()
    to_onnx(model, torch.randn(1, 1, 28, 28), tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "Conv" in ops and ("Gemm" in ops or "MatMul" in ops)
    _check(model, tmp_path / "m.onnx", (1, 28, 28))
    assert any(type(m).__name__ == "SparseConv2d" for m in model.modules())   # not modified
