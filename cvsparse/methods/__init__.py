"""Compression methods, each behind :class:`cvsparse.methods.base.CompressionMethod`."""

from .autoprune import AutoPruneMethod
from .base import CompressionMethod, RunData
from .cvgrad import CVGradMethod
from .magnitude import MagnitudeMethod
from .schedules import LRPhase

METHOD_CLASSES: dict[str, type[CompressionMethod]] = {
    "cvgrad": CVGradMethod,
    "autoprune": AutoPruneMethod,
    "magnitude": MagnitudeMethod,
}

__all__ = ["METHOD_CLASSES", "AutoPruneMethod", "CompressionMethod", "CVGradMethod", "LRPhase",
           "MagnitudeMethod", "RunData"]
