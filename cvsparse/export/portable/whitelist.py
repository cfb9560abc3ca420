"""What a portable file may name: the module types (with how their constructor arguments are
read off an instance), the functions, and the tensor methods and attributes.  Loading refuses
anything else, and resolves every name through these tables, never through an import of a
name found in a file."""

from __future__ import annotations

import importlib
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CorruptFileError

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


def whitelist_name(module: nn.Module) -> str | None:
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
