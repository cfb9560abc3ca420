"""Deliver a compressed model that is really smaller and faster.

- :func:`shrink` — remove dead output channels / neurons (and the matching inputs of their
  consumers) by following the traced graph of the model.
- :func:`summary` — parameters, MACs, file size and measured latency, before and after.
- :func:`sparsify` — swap sparse-enough Conv2d / Linear layers for :mod:`cvsparse.nn`'s
  sparse inference layers where they measure faster on this machine.
- :func:`save` / :func:`load` — a portable, pickle-free file that rebuilds the model without
  its class; :func:`to_onnx` — standard ONNX.

The functions are imported here, after their submodules, so that ``cvsparse.export.shrink``
(and ``summary``, ``sparsify``) names the function whatever is imported later; the submodules
stay reachable with ``from cvsparse.export.<module> import …``.
"""

from __future__ import annotations

from .onnx_export import to_onnx
from .portable import load, save
from .shrink import shrink
from .sparsify import sparsify
from .summary import summary

__all__ = ["load", "save", "shrink", "sparsify", "summary", "to_onnx"]
