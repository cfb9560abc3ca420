"""Compression methods, each behind :class:`cvsparse.methods.base.CompressionMethod`."""

from .autoprune import AutoPruneMethod
from .base import CompressionMethod, RunData
from .cvgrad import CVGradMethod

METHOD_CLASSES: dict[str, type[CompressionMethod]] = {
    "cvgrad": CVGradMethod,
    "autoprune": AutoPruneMethod,
}

__all__ = ["METHOD_CLASSES", "AutoPruneMethod", "CompressionMethod", "CVGradMethod", "RunData"]
