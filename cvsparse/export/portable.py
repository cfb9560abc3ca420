"""A portable, pickle-free model file: ``save(model, path)`` / ``load(path)``.

The file is a valid `safetensors <https://huggingface.co/docs/safetensors>`_ file.  Its tensors
are the model's parameters and buffers (zero-heavy ones in a CSR encoding); its
``__metadata__`` holds

- ``format`` — ``"cvsparse-portable"``;
- ``version`` — the format version (:data:`FORMAT_VERSION`);
- ``spec`` — a JSON architecture spec: every module with its type (a name from a fixed
  whitelist) and its constructor arguments, the ``torch.fx`` graph that connects them (only
  whitelisted functions and tensor methods), and how each tensor is encoded;
- ``sha256`` — SHA-256 of the whole file as written with this field set to 64 zeros.

:func:`load` checks the checksum before it parses anything else, rebuilds every module from the
whitelist alone (it never imports a module or resolves a name found in the file, so a crafted
file cannot run code) and returns an ``fx.GraphModule`` with the saved outputs.  Every problem
with a file is a one-line :class:`PortableFileError` (a ValueError).  The format is described
in docs/export.md.

    from cvsparse.export import save, load
    save(model.eval(), "model.cvsp", example_input=torch.randn(1, 3, 32, 32))
    model = load("model.cvsp")
"""

from __future__ import annotations

import hashlib
import importlib
import json
import keyword
import math
import operator
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from cvsparse import __version__

FORMAT = "cvsparse-portable"
FORMAT_VERSION = 1
_PLACEHOLDER_SHA = "0" * 64
#: Largest element count of one CSR-encoded tensor (row pointers are int32).
_MAX_CSR_NUMEL = 2**31 - 1
#: A file's CSR tensors may expand to at most this many times the file's size (plus
#: :data:`_EXPANSION_SLACK` bytes): a crafted header cannot make ``load`` allocate without bound.
MAX_EXPANSION = 10_000
_EXPANSION_SLACK = 2**26


# ---- errors -------------------------------------------------------------------------------------

class PortableFileError(ValueError):
    """A portable file cannot be loaded: the message (one line) names the problem."""


class CorruptFileError(PortableFileError):
    """The file is truncated, damaged, or not a cvsparse portable file."""


class UnsupportedVersionError(PortableFileError):
    """The file was written in a format version this cvsparse does not read."""


class RefusedContentError(PortableFileError):
    """The file names a module type, function or method outside the whitelist."""


class UnsupportedModelError(ValueError):
    """:func:`save` cannot describe this model with the whitelist (or cannot trace it)."""


# ---- the whitelist: module types ----------------------------------------------------------------

@dataclass(frozen=True)
class ModuleType:
    """One whitelisted module type.

    ``name`` is how the file names it; ``resolve`` returns the class (None if it is not
    available in this installation); ``args`` reads the constructor arguments off an instance;
    ``format`` describes a sparse layout, written into the spec for readers of the file.
    ``build(cls, args, tensors)`` constructs a layer that takes its tensors in the constructor
    (cvsparse's packed sparse layers); without it the layer is constructed on the meta device
    from ``args`` and its tensors are then taken from the file, each of the built shape.
    """

    name: str
    resolve: Callable[[], type | None]
    args: Callable[[nn.Module], dict[str, Any]]
    format: str | None = None
    build: Callable[[type, dict[str, Any], dict[str, torch.Tensor]], nn.Module] | None = None


def _attrs(*names: str, has: Iterable[str] = ()) -> Callable[[nn.Module], dict[str, Any]]:
    """Constructor arguments stored as attributes of the same name; each name in ``has`` is a
    bool argument telling whether that attribute (e.g. ``bias``) is not None."""
    flags = tuple(has)

    def read(module: nn.Module) -> dict[str, Any]:
        out = {name: getattr(module, name) for name in names}
        for name in flags:
            out[name] = getattr(module, name) is not None
        return out

    return read


def _torch_nn(cls: type) -> Callable[[], type]:
    return lambda: cls


def _optional(module: str, name: str) -> Callable[[], type | None]:
    """A class of cvsparse that may not exist yet in this installation, looked up by a name
    fixed here (never one read from a file)."""

    def resolve() -> type | None:
        try:
            return getattr(importlib.import_module(module), name, None)
        except ImportError:
            return None

    return resolve


_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
         "groups", "padding_mode")
_BN = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_INPLACE = _attrs("inplace")
_NONE = _attrs()


_PACKED = ("values", "col_deltas", "row_ptr", "bias")


def _build_packed(cls: type, args: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A cvsparse sparse layer: the packed weight (``values``, ``col_deltas``, ``row_ptr``) and
    the optional ``bias`` go to its constructor, which checks the packed format."""
    unknown = set(tensors) - set(_PACKED)
    missing = set(_PACKED[:3]) - set(tensors)
    if unknown or missing:
        raise CorruptFileError(f"a {cls.__name__} needs values, col_deltas, row_ptr and an "
                               f"optional bias; the file has {sorted(tensors)}")
    return cls(**args, **{k: tensors.get(k) for k in _PACKED})


def _standard_types() -> list[ModuleType]:
    t = _torch_nn
    return [
        ModuleType("Conv1d", t(nn.Conv1d), _attrs(*_CONV, has=("bias",))),
        ModuleType("Conv2d", t(nn.Conv2d), _attrs(*_CONV, has=("bias",))),
        ModuleType("ConvTranspose2d", t(nn.ConvTranspose2d),
                   _attrs(*_CONV, "output_padding", has=("bias",))),
        ModuleType("Linear", t(nn.Linear), _attrs("in_features", "out_features", has=("bias",))),
        ModuleType("BatchNorm1d", t(nn.BatchNorm1d), _attrs(*_BN)),
        ModuleType("BatchNorm2d", t(nn.BatchNorm2d), _attrs(*_BN)),
        ModuleType("LayerNorm", t(nn.LayerNorm),
                   _attrs("normalized_shape", "eps", "elementwise_affine", has=("bias",))),
        ModuleType("GroupNorm", t(nn.GroupNorm),
                   _attrs("num_groups", "num_channels", "eps", "affine")),
        ModuleType("ReLU", t(nn.ReLU), _INPLACE),
        ModuleType("ReLU6", t(nn.ReLU6), _INPLACE),
        ModuleType("LeakyReLU", t(nn.LeakyReLU), _attrs("negative_slope", "inplace")),
        ModuleType("ELU", t(nn.ELU), _attrs("alpha", "inplace")),
        ModuleType("GELU", t(nn.GELU), _attrs("approximate")),
        ModuleType("SiLU", t(nn.SiLU), _INPLACE),
        ModuleType("Hardswish", t(nn.Hardswish), _INPLACE),
        ModuleType("Hardsigmoid", t(nn.Hardsigmoid), _INPLACE),
        ModuleType("Sigmoid", t(nn.Sigmoid), _NONE),
        ModuleType("Tanh", t(nn.Tanh), _NONE),
        ModuleType("Softmax", t(nn.Softmax), _attrs("dim")),
        ModuleType("LogSoftmax", t(nn.LogSoftmax), _attrs("dim")),
        ModuleType("Identity", t(nn.Identity), _NONE),
        ModuleType("Flatten", t(nn.Flatten), _attrs("start_dim", "end_dim")),
        ModuleType("Dropout", t(nn.Dropout), _attrs("p", "inplace")),
        ModuleType("MaxPool2d", t(nn.MaxPool2d),
                   _attrs("kernel_size", "stride", "padding", "dilation", "return_indices",
                          "ceil_mode")),
        ModuleType("AvgPool2d", t(nn.AvgPool2d),
                   _attrs("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                          "divisor_override")),
        ModuleType("AdaptiveAvgPool2d", t(nn.AdaptiveAvgPool2d), _attrs("output_size")),
        ModuleType("AdaptiveMaxPool2d", t(nn.AdaptiveMaxPool2d),
                   _attrs("output_size", "return_indices")),
    ]


def _cvsparse_types() -> list[ModuleType]:
    """cvsparse's sparse inference layers (packed nonzeros whose count the constructor
    arguments do not fix)."""
    layout = ("rows of nonzeros: values, col_deltas (int32 column steps), row_ptr (int32), "
              "see cvsparse.ops.sparse_format")
    return [
        ModuleType("cvsparse.SparseLinear", _optional("cvsparse.nn", "SparseLinear"),
                   _attrs("in_features", "out_features", "relu"), layout,
                   _build_packed),
        ModuleType("cvsparse.SparseConv2d", _optional("cvsparse.nn", "SparseConv2d"),
                   _attrs("in_channels", "out_channels", "kernel_size", "stride", "padding",
                          "relu", "pool"), layout, _build_packed),
    ]


@lru_cache(maxsize=1)
def module_types() -> dict[str, tuple[ModuleType, type]]:
    """The whitelisted module types available here: file name → (entry, class)."""
    out: dict[str, tuple[ModuleType, type]] = {}
    for entry in _standard_types() + _cvsparse_types():
        cls = entry.resolve()
        if cls is not None:
            out[entry.name] = (entry, cls)
    return out


def _type_name(module: nn.Module) -> str | None:
    """The whitelist name of ``module``'s exact type (subclasses are not the same layer)."""
    for name, (_, cls) in module_types().items():
        if type(module) is cls:
            return name
    return None


# ---- the whitelist: functions and tensor methods -------------------------------------------------

def _function_table() -> dict[str, Callable[..., Any]]:
    table: dict[str, Callable[..., Any]] = {}
    for name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "neg", "pos", "getitem",
                 "matmul", "eq", "ne", "lt", "le", "gt", "ge"):
        table[f"operator.{name}"] = getattr(operator, name)
    table["builtins.getattr"] = getattr
    for name in ("add", "sub", "mul", "div", "cat", "stack", "flatten", "reshape", "relu",
                 "sigmoid", "tanh", "mean", "sum", "amax", "matmul", "transpose", "permute",
                 "squeeze", "unsqueeze", "chunk", "split", "softmax", "log_softmax", "clamp",
                 "exp", "sqrt", "abs", "neg", "narrow", "conv2d", "addmm", "t", "where",
                 "zeros_like", "ones_like"):
        table[f"torch.{name}"] = getattr(torch, name)
    for name in ("relu", "relu6", "leaky_relu", "elu", "gelu", "silu", "hardswish",
                 "hardsigmoid", "sigmoid", "tanh", "softmax", "log_softmax", "dropout",
                 "avg_pool2d", "max_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
                 "pad", "linear", "conv2d", "batch_norm", "layer_norm", "group_norm",
                 "interpolate", "normalize"):
        table[f"torch.nn.functional.{name}"] = getattr(F, name)
    return table


@lru_cache(maxsize=1)
def function_table() -> dict[str, Callable[..., Any]]:
    """Whitelisted ``call_function`` targets: file name → callable."""
    return _function_table()


#: Whitelisted ``call_method`` names (methods of the tensor flowing in as first argument).
TENSOR_METHODS = frozenset({
    "add", "sub", "mul", "div", "neg", "view", "reshape", "flatten", "size", "dim",
    "contiguous", "mean", "sum", "amax", "relu", "sigmoid", "tanh", "permute", "transpose",
    "unsqueeze", "squeeze", "chunk", "split", "expand", "expand_as", "view_as", "reshape_as",
    "softmax", "log_softmax", "clamp", "narrow", "float", "t", "matmul", "exp", "pow", "sqrt",
    "abs", "max", "min",
})
#: Attributes ``builtins.getattr`` may read off a tensor.
TENSOR_ATTRIBUTES = frozenset({"shape", "dtype", "ndim"})

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "uint16": torch.uint16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PATH_PART = re.compile(r"^[A-Za-z0-9_]+$")


# ---- values in JSON -----------------------------------------------------------------------------

def _encode_value(value: Any, where: str) -> Any:
    """A graph argument or constructor argument as JSON (tagged objects for what JSON lacks)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode_value(v, where) for v in value]}
    if isinstance(value, list):
        return {"list": [_encode_value(v, where) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise UnsupportedModelError(f"{where}: a dict with non-string keys cannot be saved")
        return {"dict": [[k, _encode_value(v, where)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [_encode_value(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": None}
    if isinstance(value, torch.dtype) and value in _DTYPE_NAMES:
        return {"dtype": _DTYPE_NAMES[value]}
    if isinstance(value, torch.Size):
        return {"tuple": [int(v) for v in value]}
    raise UnsupportedModelError(
        f"{where}: a value of type {type(value).__name__} cannot be saved in a portable file")


def _decode_value(value: Any, nodes: Mapping[str, fx.Node], where: str) -> Any:
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    if isinstance(value, list):
        raise CorruptFileError(f"{where}: an untagged list in the spec")
    if not isinstance(value, dict) or len(value) != 1:
        raise CorruptFileError(f"{where}: an unreadable value in the spec")
    (tag, body), = value.items()
    if tag == "node":
        if not isinstance(body, str) or body not in nodes:
            raise CorruptFileError(f"{where}: refers to node {body!r} before it is defined")
        return nodes[body]
    if tag in ("tuple", "list", "slice"):
        if not isinstance(body, list):
            raise CorruptFileError(f"{where}: {tag} is not a list")
        items = [_decode_value(v, nodes, where) for v in body]
        if tag == "tuple":
            return tuple(items)
        if tag == "list":
            return items
        if len(items) != 3:
            raise CorruptFileError(f"{where}: a slice needs 3 items")
        return slice(*items)
    if tag == "dict":
        if not isinstance(body, list) or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in body):
            raise CorruptFileError(f"{where}: a dict is not a list of [key, value] pairs")
        return {k: _decode_value(v, nodes, where) for k, v in body}
    if tag == "float" and body in ("inf", "-inf", "nan"):
        return float(body)
    if tag == "ellipsis":
        return Ellipsis
    if tag == "dtype" and body in _DTYPES:
        return _DTYPES[body]
    raise CorruptFileError(f"{where}: unknown value tag {tag!r}")


# ---- tensors ------------------------------------------------------------------------------------

def _csr_layout(shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows and columns of the 2-D view a CSR encoding uses: dim 0 by the rest."""
    numel = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (numel // rows if rows else 0)


def _encode_tensor(name: str, tensor: torch.Tensor) -> tuple[dict[str, Any],
                                                             dict[str, torch.Tensor]]:
    """The spec entry and payload tensors of one tensor: dense, or CSR (values, int32 row
    pointers, uint16 or int32 column indices) when that is smaller."""
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype not in _DTYPE_NAMES:
        raise UnsupportedModelError(f"tensor {name!r} has dtype {t.dtype}, not storable")
    entry: dict[str, Any] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
    if t.is_floating_point() and t.dim() >= 1 and 0 < t.numel() <= _MAX_CSR_NUMEL:
        rows, cols = _csr_layout(tuple(t.shape))
        grid = t.reshape(rows, cols)
        keep = grid != 0
        nnz = int(keep.sum())
        col_dtype = torch.uint16 if cols <= 2**16 else torch.int32
        col_size = 2 if col_dtype == torch.uint16 else 4
        sparse_bytes = nnz * (t.element_size() + col_size) + 4 * (rows + 1)
        if sparse_bytes < t.numel() * t.element_size():
            row_ptr = torch.zeros(rows + 1, dtype=torch.int64)
            row_ptr[1:] = keep.sum(1).cumsum(0)
            col_index = keep.nonzero()[:, 1]
            entry.update(encoding="csr", values=f"{name}/values", row_ptr=f"{name}/row_ptr",
                         cols=f"{name}/cols")
            return entry, {f"{name}/values": grid[keep].contiguous(),
                           f"{name}/row_ptr": row_ptr.to(torch.int32),
                           f"{name}/cols": col_index.to(torch.int32).to(col_dtype)}
    entry.update(encoding="dense", data=name)
    narrow = _narrow_dtype(t)
    if narrow is not None:
        entry["stored_dtype"] = _DTYPE_NAMES[narrow]
        return entry, {name: t.to(narrow)}
    return entry, {name: t.clone()}


def _narrow_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The smallest integer dtype holding every value of an int32 / int64 tensor (e.g. the
    column steps of a packed sparse layer), or None if there is none smaller."""
    if t.dtype not in (torch.int32, torch.int64) or t.numel() == 0:
        return None
    low, high = int(t.min()), int(t.max())
    for dtype in (torch.uint8, torch.int8, torch.uint16, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.bits < torch.iinfo(t.dtype).bits and info.min <= low and high <= info.max:
            return dtype
    return None


def _decode_tensor(name: str, entry: Any, payload: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The tensor ``entry`` describes, checked against its declared dtype and shape."""
    if not isinstance(entry, dict):
        raise CorruptFileError(f"tensor {name!r}: its entry is not an object")
    dtype_name = entry.get("dtype")
    dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    shape = entry.get("shape")
    if dtype is None or not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise CorruptFileError(f"tensor {name!r}: bad dtype or shape in the spec")

    def part(key: str) -> torch.Tensor:
        ref = entry.get(key)
        if not isinstance(ref, str) or ref not in payload:
            raise CorruptFileError(f"tensor {name!r}: its {key} is missing from the payload")
        return payload[ref]

    encoding = entry.get("encoding")
    if encoding == "dense":
        data = part("data")
        stored_name = entry.get("stored_dtype", entry["dtype"])
        stored = _DTYPES.get(stored_name) if isinstance(stored_name, str) else None
        integers = (torch.uint8, torch.int8, torch.uint16, torch.int16, torch.int32)
        if data.dtype != stored or list(data.shape) != shape or (
                stored != dtype and not (stored in integers and dtype in integers + (torch.int64,)
                                         and torch.iinfo(stored).bits < torch.iinfo(dtype).bits)):
            raise CorruptFileError(f"tensor {name!r}: payload dtype/shape differ from the spec")
        return data if stored == dtype else data.to(dtype)
    if encoding != "csr":
        raise CorruptFileError(f"tensor {name!r}: unknown encoding {encoding!r}")
    values, row_ptr, cols = part("values"), part("row_ptr"), part("cols")
    numel = math.prod(shape)
    if not shape or numel > _MAX_CSR_NUMEL:
        raise CorruptFileError(f"tensor {name!r}: a CSR tensor needs 1 to 2**31-1 elements")
    rows, ncols = _csr_layout(tuple(shape))
    nnz = values.numel()
    bad = (values.dtype != dtype or values.dim() != 1 or row_ptr.dtype != torch.int32
           or tuple(row_ptr.shape) != (rows + 1,) or cols.dtype not in (torch.uint16, torch.int32)
           or tuple(cols.shape) != (nnz,))
    if not bad:
        ptr = row_ptr.to(torch.int64)
        col = cols.to(torch.int64)
        counts = ptr.diff()
        bad = (int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((counts < 0).any())
               or (nnz > 0 and (int(col.min()) < 0 or int(col.max()) >= ncols)))
    if bad:
        raise CorruptFileError(f"tensor {name!r}: inconsistent CSR arrays")
    out = torch.zeros(numel, dtype=dtype)
    row_of = torch.repeat_interleave(torch.arange(rows), counts)
    out[row_of * ncols + col] = values
    return out.reshape(shape)


# ---- tracing and the spec -----------------------------------------------------------------------

class _Tracer(fx.Tracer):
    """Whitelisted module types are leaves; everything else is traced through, except what
    ``torch.fx`` itself keeps as a leaf (refused later with its name)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _type_name(m) is not None or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        graph = model.graph
        root: nn.Module = model
    else:
        try:
            graph = _Tracer().trace(model)
        except Exception as exc:
            raise UnsupportedModelError(
                f"torch.fx cannot trace {type(model).__name__}: {_first_line(exc)}") from None
        root = model
    return fx.GraphModule(root, graph, class_name="PortableModel")


def _function_name(target: Any) -> str | None:
    for name, fn in function_table().items():
        if fn is target:
            return name
    return None


def _build_spec(gm: fx.GraphModule) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON spec (modules, graph, tensors) and the payload tensors of a traced model."""
    modules: dict[str, Any] = {}
    attributes: dict[str, str] = {}
    graph: list[dict[str, Any]] = []
    state: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        where = f"node {node.name!r}"
        item: dict[str, Any] = {"op": node.op, "name": node.name}
        if node.op == "call_module":
            target = str(node.target)
            if target not in modules:
                sub = gm.get_submodule(target)
                type_name = _type_name(sub)
                if type_name is None:
                    raise UnsupportedModelError(
                        f"module {target!r} of type {type(sub).__module__}."
                        f"{type(sub).__qualname__} is not in the portable whitelist")
                entry, _ = module_types()[type_name]
                args = {k: _encode_value(v, f"module {target!r}")
                        for k, v in entry.args(sub).items()}
                modules[target] = {"type": type_name, "args": args, "training": sub.training}
                if entry.format:
                    modules[target]["format"] = entry.format
                for name, tensor in _module_tensors(sub).items():
                    state[f"{target}.{name}"] = tensor
            item["target"] = target
        elif node.op == "call_function":
            name = _function_name(node.target)
            if name is None:
                raise UnsupportedModelError(
                    f"{where} calls {getattr(node.target, '__module__', '?')}."
                    f"{getattr(node.target, '__name__', node.target)}, which is not in the "
                    "portable whitelist")
            item["target"] = name
        elif node.op == "call_method":
            if node.target not in TENSOR_METHODS:
                raise UnsupportedModelError(
                    f"{where} calls the method {node.target!r}, not in the portable whitelist")
            item["target"] = node.target
        elif node.op == "get_attr":
            target = str(node.target)
            value = _get_path(gm, target)
            if not isinstance(value, torch.Tensor):
                raise UnsupportedModelError(f"{where} reads {target!r}, which is not a tensor")
            owner, _, leaf = target.rpartition(".")
            holder = gm.get_submodule(owner) if owner else gm
            kind = ("parameter" if isinstance(value, nn.Parameter)
                    else "buffer" if leaf in holder._buffers else "constant")
            attributes[target] = kind
            state[target] = value
            item["target"] = target
        elif node.op in ("placeholder", "output"):
            item["target"] = str(node.target)
        else:
            raise UnsupportedModelError(f"{where} has the unknown op {node.op!r}")
        item["args"] = _encode_value(tuple(node.args), where)
        item["kwargs"] = _encode_value(dict(node.kwargs), where)
        graph.append(item)
    tensors: dict[str, Any] = {}
    payload: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensors[name], parts = _encode_tensor(name, tensor)
        payload.update(parts)
    spec = {"modules": modules, "attributes": attributes, "graph": graph, "tensors": tensors,
            "training": gm.training}
    return spec, payload


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) of a leaf module, by relative name."""
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters(recurse=True):
        out[name] = p
    for name, b in module.named_buffers(recurse=True):
        if b is not None:
            out[name] = b
    return out


def _get_path(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


# ---- the file -----------------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _serialize(model: nn.Module, example_input: Any | None,
               metadata: Mapping[str, Any] | None = None) -> bytes:
    from safetensors.torch import save as st_save

    gm = _trace(model)
    spec, payload = _build_spec(gm)
    if metadata is not None:
        try:
            spec["metadata"] = json.loads(json.dumps(dict(metadata), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise UnsupportedModelError(f"metadata must be plain JSON data: {exc}") from None
    if example_input is not None:
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        spec["example_inputs"] = [
            {"shape": list(x.shape), "dtype": _DTYPE_NAMES.get(x.dtype, str(x.dtype))}
            for x in inputs if isinstance(x, torch.Tensor)]
    spec["producer"] = f"cvsparse {__version__}, torch {torch.__version__}"
    fields = {"format": FORMAT, "version": str(FORMAT_VERSION),
              "spec": json.dumps(spec, separators=(",", ":"), allow_nan=False),
              "sha256": _PLACEHOLDER_SHA}
    blob = bytearray(st_save(payload, metadata=fields))
    header_end = 8 + struct.unpack("<Q", bytes(blob[:8]))[0]
    marker = f'"sha256":"{_PLACEHOLDER_SHA}"'.encode()
    at = bytes(blob[:header_end]).find(marker)
    if at < 0 or bytes(blob[:header_end]).count(marker) != 1:
        raise RuntimeError("cannot place the checksum in the safetensors header")
    digest = hashlib.sha256(bytes(blob)).hexdigest().encode()
    start = at + len(b'"sha256":"')
    blob[start:start + 64] = digest
    return bytes(blob)


def save(model: nn.Module, path: str | os.PathLike[str], example_input: Any = None, *,
         metadata: Mapping[str, Any] | None = None) -> int:
    """Write ``model`` to ``path`` as a portable file (see the module docstring); returns the
    file size in bytes.  ``metadata`` (JSON data, e.g. the input normalization) is stored in
    the spec and returned by :func:`read_spec`.

    The model is traced with ``torch.fx`` (control flow that depends on tensor values cannot be
    saved); every leaf module must be of a whitelisted type and every function of the graph in
    the whitelist, or UnsupportedModelError names the first one that is not.  Branches on
    ``self.training`` are fixed at their current value, so save an inference model in eval
    mode.  Given ``example_input`` (a tensor or a tuple of tensors) and a model in eval mode,
    the written bytes are loaded back and must reproduce the model's outputs exactly, and the
    input shapes are recorded in the file.  Zeros of tensors stored sparse come back as +0.0.
    The file is written to a temporary name beside ``path`` and renamed into place.
    """
    blob = _serialize(model, example_input, metadata)
    if example_input is not None and not any(m.training for m in model.modules()):
        _check_round_trip(model, _deserialize(blob, "the written file"), example_input)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(blob)


def _check_round_trip(model: nn.Module, rebuilt: nn.Module, example_input: Any) -> None:
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(model(*inputs))
        got = torch.utils._pytree.tree_leaves(rebuilt(*inputs))
    same = len(want) == len(got) and all(
        (torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
         else a == b) for a, b in zip(want, got, strict=True))
    if not same:
        raise UnsupportedModelError("the model rebuilt from the file does not reproduce the "
                                    "model's outputs on example_input (its forward is not "
                                    "captured by torch.fx tracing)")


def load(path: str | os.PathLike[str]) -> fx.GraphModule:
    """The model stored in ``path`` by :func:`save`, on the CPU, in the train/eval mode it was
    saved in.

    Raises :class:`CorruptFileError` (truncated, damaged, checksum mismatch, not a portable
    file), :class:`UnsupportedVersionError` or :class:`RefusedContentError` (a type, function
    or method outside the whitelist) — ValueErrors with a one-line message naming the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"no portable model file at {path}")
    blob = path.read_bytes()
    return _deserialize(blob, str(path))


def read_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified metadata of a portable file: ``version`` (int), ``spec`` (the decoded JSON
    architecture spec) and ``header_bytes`` (size of the safetensors header)."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"no portable model file at {path}")
    blob = path.read_bytes()
    metadata, header_end = _verified_metadata(blob, str(path))
    return {"version": int(metadata["version"]), "spec": _parse_spec(metadata, str(path)),
            "header_bytes": header_end}


def _verified_metadata(blob: bytes, where: str) -> tuple[dict[str, str], int]:
    """The header metadata after the frame, version and checksum checks; also the header end."""
    if len(blob) < 8:
        raise CorruptFileError(f"{where} is truncated: {len(blob)} bytes, too short for a "
                               "portable file")
    header_len = struct.unpack("<Q", blob[:8])[0]
    header_end = 8 + header_len
    if header_end > len(blob):
        raise CorruptFileError(f"{where} is truncated or corrupt: its header runs past the end "
                               "of the file")
    try:
        header = json.loads(blob[8:header_end].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CorruptFileError(f"{where} is corrupt: its header is not valid JSON") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CorruptFileError(f"{where} is not a cvsparse portable model file (or its header "
                               "is damaged)")
    version = metadata.get("version")
    if version != str(FORMAT_VERSION):
        raise UnsupportedVersionError(f"{where} has format version {version!r}; this cvsparse "
                                      f"reads version {FORMAT_VERSION}")
    stored = metadata.get("sha256")
    marker = f'"sha256":"{stored}"'.encode()
    head = blob[:header_end]
    if not isinstance(stored, str) or not re.fullmatch(r"[0-9a-f]{64}", stored) \
            or head.count(marker) != 1:
        raise CorruptFileError(f"{where} is corrupt: its checksum field is damaged")
    at = head.find(marker) + len(b'"sha256":"')
    canonical = blob[:at] + _PLACEHOLDER_SHA.encode() + blob[at + 64:]
    if hashlib.sha256(canonical).hexdigest() != stored:
        raise CorruptFileError(f"{where} is corrupt or truncated: its content does not match "
                               "its SHA-256")
    return metadata, header_end


def _parse_spec(metadata: Mapping[str, str], where: str) -> dict[str, Any]:
    try:
        spec = json.loads(metadata.get("spec", ""))
    except (TypeError, json.JSONDecodeError, RecursionError):
        raise CorruptFileError(f"{where}: the architecture spec is not valid JSON") from None
    if not isinstance(spec, dict) or not all(
            isinstance(spec.get(k), t) for k, t in (("modules", dict), ("attributes", dict),
                                                   ("graph", list), ("tensors", dict))):
        raise CorruptFileError(f"{where}: the architecture spec lacks modules, attributes, "
                               "graph or tensors")
    return spec


def _deserialize(blob: bytes, where: str) -> fx.GraphModule:
    metadata, _ = _verified_metadata(blob, where)
    spec = _parse_spec(metadata, where)
    from safetensors.torch import load as st_load

    try:
        payload = st_load(blob)
    except Exception as exc:
        raise CorruptFileError(f"{where}: the tensor payload is unreadable: "
                               f"{_first_line(exc)}") from None
    try:
        _check_expansion(spec["tensors"], len(blob))
        return _rebuild(spec, payload)
    except PortableFileError as exc:
        raise type(exc)(f"{where}: {exc}") from None
    except Exception as exc:   # a spec that passed every check but still does not fit together
        raise CorruptFileError(f"{where}: the architecture spec is inconsistent: "
                               f"{type(exc).__name__}: {_first_line(exc)}") from None


def _check_path(path: Any, what: str) -> str:
    if not isinstance(path, str) or not path or not all(
            _PATH_PART.match(p) for p in path.split(".")):
        raise CorruptFileError(f"bad {what} path {path!r}")
    return path


def _install(root: nn.Module, path: str, value: nn.Module | torch.Tensor, kind: str) -> None:
    """Put ``value`` at dotted ``path`` under ``root``, creating empty container modules."""
    *owners, leaf = path.split(".")
    holder = root
    for part in owners:
        child = holder._modules.get(part)
        if child is None:
            if part in holder.__dict__ or part in holder._parameters or part in holder._buffers:
                raise CorruptFileError(f"{path!r} collides with another entry")
            child = nn.Module()
            holder.add_module(part, child)
        holder = child
    if leaf in holder._modules or leaf in holder._parameters or leaf in holder._buffers:
        raise CorruptFileError(f"{path!r} is defined twice")
    if kind == "module":
        holder.add_module(leaf, value)  # type: ignore[arg-type]
    elif kind == "parameter":
        holder.register_parameter(leaf, nn.Parameter(value))  # type: ignore[arg-type]
    elif kind == "buffer":
        holder.register_buffer(leaf, value)  # type: ignore[arg-type]
    else:
        setattr(holder, leaf, value)


def _build_module(target: str, entry: Any, tensors: Mapping[str, Any],
                  payload: Mapping[str, torch.Tensor]) -> nn.Module:
    """One whitelisted module, built on the meta device from its constructor arguments, with
    its tensors taken from the file (each present, of the built shape)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str) \
            or not isinstance(entry.get("args"), dict):
        raise CorruptFileError(f"module {target!r}: its entry lacks type or args")
    type_name = entry["type"]
    if type_name not in module_types():
        raise RefusedContentError(f"module {target!r} has type {type_name!r}, which is not in "
                                  "the portable whitelist (refused)")
    spec_entry, cls = module_types()[type_name]
    args = {k: _decode_value(v, {}, f"module {target!r}") for k, v in entry["args"].items()}
    prefix = f"{target}."
    stored = {k[len(prefix):] for k in tensors if k.startswith(prefix)}
    if spec_entry.build is not None:
        decoded = {name: _decode_tensor(prefix + name, tensors[prefix + name], payload)
                   for name in stored}
        try:
            module = spec_entry.build(cls, args, decoded)
        except PortableFileError:
            raise
        except Exception as exc:
            raise CorruptFileError(f"module {target!r} ({type_name}) cannot be built from the "
                                   f"file: {_first_line(exc)}") from None
        if set(_module_tensors(module)) != stored:
            raise CorruptFileError(f"module {target!r} ({type_name}): the file's tensors "
                                   f"{sorted(stored)} are not the module's")
        module.train(_flag(entry, f"module {target!r}"))
        return module
    try:
        with torch.device("meta"):
            module = cls(**args)
    except Exception as exc:
        raise CorruptFileError(f"module {target!r} ({type_name}) cannot be built from its "
                               f"arguments: {_first_line(exc)}") from None
    have = _module_tensors(module)
    if stored != set(have):
        raise CorruptFileError(f"module {target!r} ({type_name}): the file's tensors "
                               f"{sorted(stored)} differ from the module's {sorted(have)}")
    for name, meta in have.items():
        value = _decode_tensor(prefix + name, tensors[prefix + name], payload)
        if value.shape != meta.shape:
            raise CorruptFileError(f"tensor {prefix + name!r} has shape {tuple(value.shape)}; "
                                   f"the module built from its arguments needs "
                                   f"{tuple(meta.shape)}")
        if value.is_floating_point() != meta.is_floating_point():
            raise CorruptFileError(f"tensor {prefix + name!r} has dtype {value.dtype}, the "
                                   f"module needs {meta.dtype}")
        owner, _, leaf = name.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        if leaf in holder._parameters:
            holder._parameters[leaf] = nn.Parameter(value, meta.requires_grad)
        else:
            holder._buffers[leaf] = value
    module.train(_flag(entry, f"module {target!r}"))
    return module


def _flag(entry: Mapping[str, Any], where: str) -> bool:
    """The ``training`` flag of a spec entry, which must be a JSON boolean."""
    value = entry.get("training")
    if not isinstance(value, bool):
        raise CorruptFileError(f"{where}: training must be true or false, got {value!r}")
    return value


def _check_expansion(tensors: Mapping[str, Any], file_bytes: int) -> None:
    """Refuse a file whose CSR tensors would expand beyond :data:`MAX_EXPANSION` times its
    size (checked before anything is allocated)."""
    total = 0
    for entry in tensors.values():
        if isinstance(entry, dict) and entry.get("encoding") == "csr":
            shape, dtype = entry.get("shape"), entry.get("dtype")
            if isinstance(shape, list) and all(isinstance(n, int) for n in shape) \
                    and isinstance(dtype, str) and dtype in _DTYPES:
                total += math.prod(shape) * _DTYPES[dtype].itemsize
    limit = MAX_EXPANSION * file_bytes + _EXPANSION_SLACK
    if total > limit:
        raise RefusedContentError(f"its sparse tensors would expand to {total:,} bytes, more "
                                  f"than {MAX_EXPANSION:,} times the file (refused)")


def _rebuild(spec: dict[str, Any], payload: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """An ``fx.GraphModule`` from a verified spec and its payload, using the whitelist only."""
    tensors: dict[str, Any] = spec["tensors"]
    root = nn.Module()
    for target, entry in spec["modules"].items():
        _check_path(target, "module")
        _install(root, target, _build_module(target, entry, tensors, payload), "module")
    owned = {k for k in tensors if any(k.startswith(m + ".") for m in spec["modules"])}
    for target, kind in spec["attributes"].items():
        _check_path(target, "attribute")
        if kind not in ("parameter", "buffer", "constant") or target not in tensors:
            raise CorruptFileError(f"attribute {target!r}: bad kind or missing tensor")
        _install(root, target, _decode_tensor(target, tensors[target], payload), kind)
    extra = set(tensors) - owned - set(spec["attributes"])
    if extra:
        raise CorruptFileError(f"tensors {sorted(extra)[:3]} belong to no module or attribute")

    functions = function_table()
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    outputs = 0
    for i, item in enumerate(spec["graph"]):
        if not isinstance(item, dict):
            raise CorruptFileError(f"graph entry {i} is not an object")
        op, name, target = item.get("op"), item.get("name"), item.get("target")
        if not isinstance(name, str) or not _IDENT.match(name) or keyword.iskeyword(name) \
                or name in nodes:
            raise CorruptFileError(f"graph entry {i}: bad or repeated node name {name!r}")
        where = f"node {name!r}"
        args = _decode_value(item.get("args"), nodes, where)
        kwargs = _decode_value(item.get("kwargs"), nodes, where)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise CorruptFileError(f"{where}: args must be a tuple and kwargs a dict")
        if op == "placeholder":
            if not isinstance(target, str) or not _IDENT.match(target) \
                    or keyword.iskeyword(target):
                raise CorruptFileError(f"{where}: bad input name {target!r}")
            fx_target: Any = target
        elif op == "output":
            outputs += 1
            fx_target = "output"
        elif op == "call_module":
            if target not in spec["modules"]:
                raise CorruptFileError(f"{where} calls module {target!r}, which the file "
                                       "does not define")
            fx_target = target
        elif op == "get_attr":
            if target not in spec["attributes"]:
                raise CorruptFileError(f"{where} reads {target!r}, which the file does not "
                                       "define")
            fx_target = target
        elif op == "call_function":
            if target not in functions:
                raise RefusedContentError(f"{where} calls {target!r}, which is not in the "
                                          "portable whitelist (refused)")
            fx_target = functions[target]
            if target == "builtins.getattr" and (
                    len(args) != 2 or not isinstance(args[0], fx.Node)
                    or args[1] not in TENSOR_ATTRIBUTES or kwargs):
                raise RefusedContentError(f"{where}: getattr may read only "
                                          f"{sorted(TENSOR_ATTRIBUTES)} of a tensor (refused)")
        elif op == "call_method":
            if target not in TENSOR_METHODS:
                raise RefusedContentError(f"{where} calls the method {target!r}, which is not "
                                          "in the portable whitelist (refused)")
            if not args or not isinstance(args[0], fx.Node):
                raise CorruptFileError(f"{where}: a method call needs a node as its object")
            fx_target = target
        else:
            raise RefusedContentError(f"{where} has the unknown op {op!r} (refused)")
        nodes[name] = graph.create_node(op, fx_target, args, kwargs, name=name)
    if outputs != 1 or spec["graph"][-1].get("op") != "output":
        raise CorruptFileError("the graph must end in exactly one output node")
    try:
        graph.lint()
        gm = fx.GraphModule(root, graph, class_name="PortableModel")
    except Exception as exc:
        raise CorruptFileError(f"the graph is inconsistent: {_first_line(exc)}") from None
    gm.train(_flag(spec, "the model"))
    for target, entry in spec["modules"].items():   # train() above reset every module's flag
        gm.get_submodule(target).train(entry["training"])
    return gm


__all__ = [
    "FORMAT", "FORMAT_VERSION", "PortableFileError", "CorruptFileError",
    "UnsupportedVersionError", "RefusedContentError", "UnsupportedModelError", "ModuleType",
    "module_types", "function_table", "TENSOR_METHODS", "save", "load", "read_spec",
]
