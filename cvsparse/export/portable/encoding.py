"""How the spec and the payload hold values and tensors: graph and constructor arguments as
tagged JSON; tensors dense (integer tensors narrowed to the smallest dtype holding them) or in
CSR when that is smaller.  Decoding checks every entry against its declared dtype and shape."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from .errors import CorruptFileError, UnsupportedModelError

#: Largest element count of one CSR-encoded tensor (row pointers are int32).
MAX_CSR_NUMEL = 2**31 - 1

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "uint16": torch.uint16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ---- values in JSON -----------------------------------------------------------------------------

def encode_value(value: Any, where: str) -> Any:
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
        return {"tuple": [encode_value(v, where) for v in value]}
    if isinstance(value, list):
        return {"list": [encode_value(v, where) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise UnsupportedModelError(f"{where}: a dict with non-string keys cannot be saved")
        return {"dict": [[k, encode_value(v, where)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [encode_value(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": None}
    if isinstance(value, torch.dtype) and value in DTYPE_NAMES:
        return {"dtype": DTYPE_NAMES[value]}
    if isinstance(value, torch.Size):
        return {"tuple": [int(v) for v in value]}
    raise UnsupportedModelError(
        f"{where}: a value of type {type(value).__name__} cannot be saved in a portable file")


def decode_value(value: Any, nodes: Mapping[str, fx.Node], where: str) -> Any:
    """The value :func:`encode_value` wrote, its graph references resolved through ``nodes``
    (name → the node already rebuilt); anything else is a :class:`CorruptFileError`."""
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
        items = [decode_value(v, nodes, where) for v in body]
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
        return {k: decode_value(v, nodes, where) for k, v in body}
    if tag == "float" and body in ("inf", "-inf", "nan"):
        return float(body)
    if tag == "ellipsis":
        return Ellipsis
    if tag == "dtype" and body in DTYPES:
        return DTYPES[body]
    raise CorruptFileError(f"{where}: unknown value tag {tag!r}")


# ---- tensors ------------------------------------------------------------------------------------

def csr_layout(shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows and columns of the 2-D view a CSR encoding uses: dim 0 by the rest."""
    numel = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (numel // rows if rows else 0)


def encode_tensor(name: str, tensor: torch.Tensor) -> tuple[dict[str, Any],
                                                             dict[str, torch.Tensor]]:
    """The spec entry and payload tensors of one tensor: dense, or CSR (values, int32 row
    pointers, uint16 or int32 column indices) when that is smaller."""
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype not in DTYPE_NAMES:
        raise UnsupportedModelError(f"tensor {name!r} has dtype {t.dtype}, not storable")
    entry: dict[str, Any] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
    if t.is_floating_point() and t.dim() >= 1 and 0 < t.numel() <= MAX_CSR_NUMEL:
        rows, cols = csr_layout(tuple(t.shape))
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
        entry["stored_dtype"] = DTYPE_NAMES[narrow]
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


def decode_tensor(name: str, entry: Any, payload: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The tensor ``entry`` describes, checked against its declared dtype and shape."""
    if not isinstance(entry, dict):
        raise CorruptFileError(f"tensor {name!r}: its entry is not an object")
    dtype_name = entry.get("dtype")
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
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
        stored = DTYPES.get(stored_name) if isinstance(stored_name, str) else None
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
    if not shape or numel > MAX_CSR_NUMEL:
        raise CorruptFileError(f"tensor {name!r}: a CSR tensor needs 1 to 2**31-1 elements")
    rows, ncols = csr_layout(tuple(shape))
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
