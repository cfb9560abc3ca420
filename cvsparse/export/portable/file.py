"""The file itself: a model traced into the spec, written with its checksum, and a model
rebuilt from a verified file (see :mod:`cvsparse.export.portable` for the format)."""

from __future__ import annotations

import hashlib
import json
import keyword
import math
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from cvsparse import __version__

from .encoding import DTYPE_NAMES, DTYPES, decode_tensor, decode_value, encode_tensor, encode_value
from .errors import (
    CorruptFileError,
    PortableFileError,
    RefusedContentError,
    UnsupportedModelError,
    UnsupportedVersionError,
)
from .whitelist import (
    TENSOR_ATTRIBUTES,
    TENSOR_METHODS,
    function_table,
    module_types,
    whitelist_name,
)

FORMAT = "cvsparse-portable"
FORMAT_VERSION = 1
_PLACEHOLDER_SHA = "0" * 64
#: A file's CSR tensors may expand to at most this many times the file's size (plus
#: :data:`_EXPANSION_SLACK` bytes): a crafted header cannot make ``load`` allocate without bound.
MAX_EXPANSION = 10_000
_EXPANSION_SLACK = 2**26
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PATH_PART = re.compile(r"^[A-Za-z0-9_]+$")


# ---- tracing and the spec -----------------------------------------------------------------------

class _Tracer(fx.Tracer):
    """Whitelisted module types are leaves; everything else is traced through, except what
    ``torch.fx`` itself keeps as a leaf (refused later with its name)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return whitelist_name(m) is not None or super().is_leaf_module(m, module_qualified_name)


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
            {"shape": list(x.shape), "dtype": DTYPE_NAMES.get(x.dtype, str(x.dtype))}
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


def _check_expansion(tensors: Mapping[str, Any], file_bytes: int) -> None:
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
        raise CorruptFileError(f"the graph is inconsistent: {_first_line(exc)}") from None
    gm.train(_flag(spec, "the model"))
    for target, entry in spec["modules"].items():   # train() above reset every module's flag
        gm.get_submodule(target).train(entry["training"])
    return gm
