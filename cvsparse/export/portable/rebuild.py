"""A model rebuilt from a verified spec and its payload tensors, from the whitelist alone: no
name found in a file is imported or resolved, and every entry is checked before it is used."""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from .encoding import DTYPES, decode_tensor, decode_value
from .errors import CorruptFileError, PortableFileError, RefusedContentError, first_line
from .spec import module_tensors
from .whitelist import TENSOR_ATTRIBUTES, TENSOR_METHODS, function_table, module_types

#: A file's CSR tensors may expand to at most this many times the file's size (plus
#: :data:`_EXPANSION_SLACK` bytes): a crafted header cannot make ``load`` allocate without bound.
MAX_EXPANSION = 10_000
_EXPANSION_SLACK = 2**26
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PATH_PART = re.compile(r"^[A-Za-z0-9_]+$")


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
    args = {k: decode_value(v, {}, f"module {target!r}") for k, v in entry["args"].items()}
    prefix = f"{target}."
    stored = {k[len(prefix):] for k in tensors if k.startswith(prefix)}
    if spec_entry.build is not None:
        decoded = {name: decode_tensor(prefix + name, tensors[prefix + name], payload)
                   for name in stored}
        try:
            module = spec_entry.build(cls, args, decoded)
        except PortableFileError:
            raise
        except Exception as exc:
            raise CorruptFileError(f"module {target!r} ({type_name}) cannot be built from the "
                                   f"file: {first_line(exc)}") from None
        if set(module_tensors(module)) != stored:
            raise CorruptFileError(f"module {target!r} ({type_name}): the file's tensors "
                                   f"{sorted(stored)} are not the module's")
        module.train(_flag(entry, f"module {target!r}"))
        return module
    try:
        with torch.device("meta"):
            module = cls(**args)
    except Exception as exc:
        raise CorruptFileError(f"module {target!r} ({type_name}) cannot be built from its "
                               f"arguments: {first_line(exc)}") from None
    have = module_tensors(module)
    if stored != set(have):
        raise CorruptFileError(f"module {target!r} ({type_name}): the file's tensors "
                               f"{sorted(stored)} differ from the module's {sorted(have)}")
    for name, meta in have.items():
        value = decode_tensor(prefix + name, tensors[prefix + name], payload)
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


def check_expansion(tensors: Mapping[str, Any], file_bytes: int) -> None:
    """Refuse a file whose CSR tensors would expand beyond :data:`MAX_EXPANSION` times its
    size (checked before anything is allocated)."""
    total = 0
    for entry in tensors.values():
        if isinstance(entry, dict) and entry.get("encoding") == "csr":
            shape, dtype = entry.get("shape"), entry.get("dtype")
            if isinstance(shape, list) and all(isinstance(n, int) for n in shape) \
                    and isinstance(dtype, str) and dtype in DTYPES:
                total += math.prod(shape) * DTYPES[dtype].itemsize
    limit = MAX_EXPANSION * file_bytes + _EXPANSION_SLACK
    if total > limit:
        raise RefusedContentError(f"its sparse tensors would expand to {total:,} bytes, more "
                                  f"than {MAX_EXPANSION:,} times the file (refused)")


def rebuild(spec: dict[str, Any], payload: Mapping[str, torch.Tensor]) -> fx.GraphModule:
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
        _install(root, target, decode_tensor(target, tensors[target], payload), kind)
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
        args = decode_value(item.get("args"), nodes, where)
        kwargs = decode_value(item.get("kwargs"), nodes, where)
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
        raise CorruptFileError(f"the graph is inconsistent: {first_line(exc)}") from None
    gm.train(_flag(spec, "the model"))
    for target, entry in spec["modules"].items():   # train() above reset every module's flag
        gm.get_submodule(target).train(entry["training"])
    return gm
