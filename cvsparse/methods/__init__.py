"""Compression methods, each behind :class:`cvsparse.methods.base.CompressionMethod`."""

from .base import CompressionMethod, RunData
from .cvgrad import CVGradMethod

METHOD_CLASSES: dict[str, type[CompressionMethod]] = {"cvgrad": CVGradMethod}

__all__ = ["METHOD_CLASSES", "CompressionMethod", "CVGradMethod", "RunData"]
