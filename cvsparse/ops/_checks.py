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
