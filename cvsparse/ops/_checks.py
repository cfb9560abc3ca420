"""Argument validation for the public operators: the one place bad input is rejected.

Every check runs before any backend touches memory, so a rejected call modifies nothing.
Errors name the argument and the list index: ``TypeError`` for wrong types/dtypes,
``ValueError`` for wrong lengths, shapes, devices, layouts and values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def tensor_list(name: str, value: object, *, allow_none: bool = False) -> list[Tensor]:
    """``value`` as a list of tensors (``None`` → ``[]`` when allowed)."""
    if value is None and allow_none:
        return []
    if isinstance(value, Tensor) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(value).__name__}")
    out = list(value)
    for i, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a Tensor, got {type(t).__name__}")
    return out


def params_list(name: str, params: list[Tensor]) -> None:
    """Floating dtype shared by all, one device, contiguous layout."""
    for i, p in enumerate(params):
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}[{i}] has dtype {p.dtype}; supported: float32, float64, "
                            "float16, bfloat16")
        if p.dtype != params[0].dtype:
            raise TypeError(f"{name}[{i}] has dtype {p.dtype} but {name}[0] has "
                            f"{params[0].dtype}; one call takes one dtype")
        if p.device != params[0].device:
            raise ValueError(f"{name}[{i}] is on {p.device} but {name}[0] is on "
                             f"{params[0].device}")
        if not p.is_contiguous():
            raise ValueError(f"{name}[{i}] is not contiguous; call .contiguous() first")


def companion_list(
    name: str, tensors: list[Tensor], params: list[Tensor], *, dtype: torch.dtype | None = None
) -> None:
    """``tensors`` pairs one-to-one with ``params``: same length, shape, device, layout, and
    ``dtype`` (the param's own when ``dtype`` is None)."""
    if len(tensors) != len(params):
        raise ValueError(f"{name} has {len(tensors)} tensors but params has {len(params)}")
    for i, (t, p) in enumerate(zip(tensors, params, strict=True)):
        want = p.dtype if dtype is None else dtype
        if t.dtype != want:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}, expected {want}")
        if t.shape != p.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but params[{i}] has "
                             f"{tuple(p.shape)}")
        if t.device != p.device:
            raise ValueError(f"{name}[{i}] is on {t.device} but params[{i}] is on {p.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}] is not contiguous; call .contiguous() first")


def no_aliasing(groups: dict[str, list[Tensor]]) -> None:
    """Tensors written in place must not share storage with any other argument.

    Storage addresses are not traceable: under torch.compile this check is skipped."""
    if not checking_values():
        return
    seen: dict[int, str] = {}
    for name, tensors in groups.items():
        for i, t in enumerate(tensors):
            if t.numel() == 0:
                continue
            key = t.untyped_storage().data_ptr()
            if key in seen:
                raise ValueError(f"{name}[{i}] shares memory with {seen[key]}")
            seen[key] = f"{name}[{i}]"


def nonnegative_scalar(name: str, value: object) -> float:
    """A finite float ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def per_tensor_lambda(name: str, value: object, n: int, device: torch.device,
                      check_values: bool) -> Tensor:
    """A float or a 1-D tensor of ``n`` values ≥ 0, as float64 of shape ``(n,)`` on ``device``."""
    if isinstance(value, Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(n)
        if value.dim() != 1 or value.numel() != n:
            raise ValueError(f"{name} must be a float or a 1-D tensor of {n} values (one per "
                             f"tensor), got shape {tuple(value.shape)}")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        if check_values and not bool(torch.isfinite(value).all() and (value >= 0).all()):
            raise ValueError(f"{name} must be finite and >= 0, got {value.tolist()}")
        return value.detach().to(device=device, dtype=torch.float64).contiguous()
    scalar = nonnegative_scalar(name, value)
    return torch.full((n,), scalar, dtype=torch.float64, device=device)


def checking_values() -> bool:
    """False while torch.compile traces: checks that read tensor values or storage are skipped."""
    return not torch.compiler.is_compiling()


# ---- sparse inference operators: every problem is a ValueError naming the argument -----------

def _tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a Tensor, got {type(value).__name__}")
    return value


def transposed_rows(input: Tensor) -> bool:
    """Whether a 2-D ``input`` is the transpose of a contiguous matrix (strides ``(1, K)``)."""
    return input.dim() == 2 and input.stride() == (1, input.shape[0])


def sparse_input(input: Tensor, values: Tensor, *, transposed_ok: bool = False) -> None:
    """The input of a sparse operator whose packed weight was checked before (a module's own
    buffers): a contiguous tensor of the weight's dtype and device (or, with
    ``transposed_ok``, the transpose of a contiguous matrix)."""
    if not isinstance(input, Tensor):
        raise ValueError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dtype != values.dtype:
        raise ValueError(f"input has dtype {input.dtype} but the weight has {values.dtype}")
    if input.device != values.device:
        raise ValueError(f"input is on {input.device} but the weight is on {values.device}")
    if not input.is_contiguous() and not (transposed_ok and transposed_rows(input)):
        raise ValueError("input is not contiguous; call .contiguous() first")


def sparse_weight(input: Tensor, values: Tensor, col_deltas: Tensor, row_ptr: Tensor,
                  bias: Tensor | None, num_columns: int, *, check_format: bool = True,
                  transposed_ok: bool = False) -> int:
    """Checks a packed weight (``cvsparse/ops/sparse_format.py``) of ``num_columns`` columns
    against ``input`` (dtype, device; contiguous, or with ``transposed_ok`` the transpose of
    a contiguous matrix) and returns its number of rows M.

    Metadata (types, dtypes, devices, shapes, layouts) is always checked; with ``check_format``
    the index values too (row_ptr starts at 0, never decreases and ends at nnz; the first delta
    of a row is ≥ 0, later ones ≥ 1; every column < ``num_columns``) — that reads the tensors
    (a device sync on GPU).
    """
    input = _tensor("input", input)
    if input.dtype not in FLOAT_DTYPES:
        raise ValueError(f"input has dtype {input.dtype}; supported: float32, float64, "
                         "float16, bfloat16")
    if not input.is_contiguous() and not (transposed_ok and transposed_rows(input)):
        raise ValueError("input is not contiguous; call .contiguous() first")
    values = _tensor("values", values)
    col_deltas = _tensor("col_deltas", col_deltas)
    row_ptr = _tensor("row_ptr", row_ptr)
    if values.dtype != input.dtype:
        raise ValueError(f"values has dtype {values.dtype} but input has {input.dtype}")
    for name, t in (("col_deltas", col_deltas), ("row_ptr", row_ptr)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} has dtype {t.dtype}, expected torch.int32")
    for name, t in (("values", values), ("col_deltas", col_deltas), ("row_ptr", row_ptr)):
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} is not contiguous; call .contiguous() first")
    if row_ptr.numel() < 1:
        raise ValueError("row_ptr must have M + 1 >= 1 entries, got 0")
    if col_deltas.numel() != values.numel():
        raise ValueError(f"col_deltas has {col_deltas.numel()} entries but values has "
                         f"{values.numel()}")
    rows = row_ptr.numel() - 1
    if bias is not None:
        bias = _tensor("bias", bias)
        if bias.dtype != input.dtype:
            raise ValueError(f"bias has dtype {bias.dtype} but input has {input.dtype}")
        if bias.device != input.device:
            raise ValueError(f"bias is on {bias.device} but input is on {input.device}")
        if tuple(bias.shape) != (rows,):
            raise ValueError(f"bias must have shape ({rows},) (one per row of the weight), got "
                             f"{tuple(bias.shape)}")
        if not bias.is_contiguous():
            raise ValueError("bias is not contiguous; call .contiguous() first")
    if check_format and checking_values():
        sparse_format_values(col_deltas, row_ptr, values.numel(), num_columns)
    return rows


def sparse_format_values(col_deltas: Tensor, row_ptr: Tensor, nnz: int, num_columns: int) -> None:
    """The index values of a packed weight are consistent (see :func:`sparse_weight`)."""
    ptr = row_ptr.to(torch.int64)
    if int(ptr[0]) != 0:
        raise ValueError(f"row_ptr[0] must be 0, got {int(ptr[0])}")
    if int(ptr[-1]) != nnz:
        raise ValueError(f"row_ptr[-1] must equal the number of values ({nnz}), got "
                         f"{int(ptr[-1])}")
    steps = ptr[1:] - ptr[:-1]
    if bool((steps < 0).any()):
        m = int((steps < 0).nonzero()[0])
        raise ValueError(f"row_ptr decreases at row {m}: row_ptr[{m}] = {int(ptr[m])} > "
                         f"row_ptr[{m + 1}] = {int(ptr[m + 1])}")
    if nnz == 0:
        return
    deltas = col_deltas.to(torch.int64)
    first = torch.zeros(nnz, dtype=torch.bool, device=deltas.device)
    first[ptr[:-1][steps > 0]] = True
    bad = torch.where(first, deltas < 0, deltas < 1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        kind = "a row's first column must be >= 0" if bool(first[i]) else (
            "later deltas must be >= 1 (columns strictly increasing)")
        raise ValueError(f"col_deltas[{i}] = {int(deltas[i])} is invalid: {kind}")
    from .sparse_format import columns

    cols = columns(col_deltas, row_ptr)
    if int(cols.max()) >= num_columns:
        i = int((cols >= num_columns).nonzero()[0])
        raise ValueError(f"col_deltas put nonzero {i} at column {int(cols[i])}, out of range for "
                         f"{num_columns} columns")


def int_pair(name: str, value: object, minimum: int) -> list[int]:
    """Two ints ≥ ``minimum`` (an int means the same for both dimensions)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, Sequence) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    return [int(value[0]), int(value[1])]
