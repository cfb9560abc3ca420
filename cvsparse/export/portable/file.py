"""The file on disk: a traced model written as safetensors with its spec and checksum, and a
file verified (frame, version, SHA-256) before its model is rebuilt (see
:mod:`cvsparse.export.portable` for the format)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from cvsparse import __version__

from .encoding import DTYPE_NAMES
from .errors import (
    CorruptFileError,
    PortableFileError,
    UnsupportedModelError,
    UnsupportedVersionError,
    first_line,
)
from .rebuild import check_expansion, rebuild
from .spec import build_spec, trace

FORMAT = "cvsparse-portable"
FORMAT_VERSION = 1
_PLACEHOLDER_SHA = "0" * 64


def _serialize(model: nn.Module, example_input: Any | None,
               metadata: Mapping[str, Any] | None = None) -> bytes:
    from safetensors.torch import save as st_save

    gm = trace(model)
    spec, payload = build_spec(gm)
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
                               f"{first_line(exc)}") from None
    try:
        check_expansion(spec["tensors"], len(blob))
        return rebuild(spec, payload)
    except PortableFileError as exc:
        raise type(exc)(f"{where}: {exc}") from None
    except Exception as exc:   # a spec that passed every check but still does not fit together
        raise CorruptFileError(f"{where}: the architecture spec is inconsistent: "
                               f"{type(exc).__name__}: {first_line(exc)}") from None
