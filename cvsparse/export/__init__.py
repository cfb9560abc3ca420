"""Deliver a compressed model that is really smaller and faster.

- :func:`shrink` — remove dead output channels / neurons (and the matching inputs of their
  consumers) by following the traced graph of the model.
- :func:`summary` — parameters, MACs, file size and measured latency, before and after.
- :func:`sparsify` — swap sparse-enough Conv2d / Linear layers for :mod:`cvsparse.nn`'s
  sparse inference layers where they measure faster on this machine.
- :func:`save` / :func:`load` — a portable, pickle-free file that rebuilds the model without
  its class; :func:`to_onnx` — standard ONNX.

The submodules load on first use, so ``import cvsparse.export`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "shrink": "shrink", "summary": "summary", "sparsify": "sparsify",
    "save": "portable", "load": "portable", "to_onnx": "onnx_export",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'cvsparse.export' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
