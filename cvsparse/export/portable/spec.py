"""A model traced into the portable file's JSON architecture spec and its tensors: every
leaf module a whitelisted type with its constructor arguments, every graph node a whitelisted
function or tensor method (see :mod:`cvsparse.export.portable` for the format)."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .encoding import encode_tensor, encode_value
from .errors import UnsupportedModelError, first_line
from .whitelist import TENSOR_METHODS, function_table, module_types, whitelist_name


class _Tracer(fx.Tracer):
    """Whitelisted module types are leaves; everything else is traced through, except what
    ``torch.fx`` itself keeps as a leaf (refused later with its name)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return whitelist_name(m) is not None or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as a ``GraphModule`` whose leaves are whitelisted modules (a GraphModule is
    taken as it is); UnsupportedModelError if ``torch.fx`` cannot trace it."""
    if isinstance(model, fx.GraphModule):
        graph = model.graph
        root: nn.Module = model
    else:
        try:
            graph = _Tracer().trace(model)
        except Exception as exc:
            raise UnsupportedModelError(
                f"torch.fx cannot trace {type(model).__name__}: {first_line(exc)}") from None
        root = model
    return fx.GraphModule(root, graph, class_name="PortableModel")


def _function_name(target: Any) -> str | None:
    for name, fn in function_table().items():
        if fn is target:
            return name
    return None


def build_spec(gm: fx.GraphModule) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
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
                type_name = whitelist_name(sub)
                if type_name is None:
                    raise UnsupportedModelError(
                        f"module {target!r} of type {type(sub).__module__}."
                        f"{type(sub).__qualname__} is not in the portable whitelist")
                entry, _ = module_types()[type_name]
                args = {k: encode_value(v, f"module {target!r}")
                        for k, v in entry.args(sub).items()}
                modules[target] = {"type": type_name, "args": args, "training": sub.training}
                if entry.format:
                    modules[target]["format"] = entry.format
                for name, tensor in module_tensors(sub).items():
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
        item["args"] = encode_value(tuple(node.args), where)
        item["kwargs"] = encode_value(dict(node.kwargs), where)
        graph.append(item)
    tensors: dict[str, Any] = {}
    payload: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensors[name], parts = encode_tensor(name, tensor)
        payload.update(parts)
    spec = {"modules": modules, "attributes": attributes, "graph": graph, "tensors": tensors,
            "training": gm.training}
    return spec, payload


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
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
