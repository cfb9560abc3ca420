"""``to_onnx(model, example_input, path)``: the model as standard ONNX operators.

cvsparse's sparse inference layers have no ONNX operator of their own; they are exported as the
dense Conv / Gemm they compute (zeros included), through each layer's ``to_dense()``.  The export
goes through ``torch.export`` (``torch.onnx.export(..., dynamo=True)``, which needs the
``onnxscript`` package), with a symbolic batch dimension unless ``dynamic_batch=False``.

    from cvsparse.export import to_onnx
    to_onnx(model, torch.randn(1, 3, 32, 32), "model.onnx")
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


class OnnxExportError(ValueError):
    """The model cannot be exported to ONNX; the message (one line) says why."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: BaseException) -> str:
    """The first line of the innermost cause of ``exc`` (the exporter wraps the real reason),
    without terminal colour codes."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = _ANSI.sub("", str(exc)).strip()
    return f"{type(exc).__name__}: " + (text.splitlines()[0] if text else "")[:300]


def dense_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every cvsparse sparse layer replaced by the
    dense layer it computes (the layer's ``to_dense()``)."""
    from .portable import module_types

    sparse_classes = tuple(cls for name, (_, cls) in module_types().items()
                           if name.startswith("cvsparse."))
    model = copy.deepcopy(model).eval()
    if isinstance(model, sparse_classes):
        return model.to_dense().eval()
    for name, module in list(model.named_modules()):
        if name and isinstance(module, sparse_classes):
            owner, _, leaf = name.rpartition(".")
            holder = model.get_submodule(owner) if owner else model
            setattr(holder, leaf, module.to_dense().eval())
    return model


def to_onnx(model: nn.Module, example_input: Any, path: str | os.PathLike[str], *,
            dynamic_batch: bool = True, opset_version: int | None = None,
            metadata: Mapping[str, Any] | None = None) -> int:
    """Export ``model`` (in eval mode; sparse layers as dense) to the ONNX file ``path`` with
    ``example_input`` (a tensor or a tuple of tensors) and return the file size in bytes.

    With ``dynamic_batch`` the first dimension of every input and output is symbolic, so the
    file runs at any batch size (an example batch of 1 is doubled for the trace, because
    ``torch.export`` fixes dimensions of size 1).  The weights are stored inside the file.
    ``metadata`` (JSON data, e.g. the input normalization) is stored as the model's
    ``metadata_props`` entry ``cvsparse`` (a JSON string).
    Raises OnnxExportError (one line) if the model cannot be exported.
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise OnnxExportError("example_input must be a tensor or a tuple of tensors")
    dense = dense_copy(model)
    dynamic_shapes = None
    if dynamic_batch:
        if any(x.dim() == 0 for x in inputs):
            raise OnnxExportError("dynamic_batch needs inputs with a batch dimension")
        inputs = tuple(torch.cat([x, x]) if x.shape[0] == 1 else x for x in inputs)
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    path = Path(path)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(dense, inputs, dynamo=True,
                                        dynamic_shapes=dynamic_shapes,
                                        opset_version=opset_version, verbose=False)
            if metadata is not None:
                program.model.metadata_props["cvsparse"] = json.dumps(dict(metadata),
                                                                      allow_nan=False)
            program.save(str(path), external_data=False)
    except ImportError as exc:
        raise OnnxExportError(f"ONNX export needs the onnx and onnxscript packages "
                              f"(pip install 'cvsparse[export]'); {_first_line(exc)}") from None
    except Exception as exc:
        raise OnnxExportError(f"cannot export {type(model).__name__} to ONNX: "
                              f"{_first_line(exc)}") from None
    return path.stat().st_size


__all__ = ["OnnxExportError", "dense_copy", "to_onnx"]
