"""Drop-in layers: AutoPrune's gated Conv2d / Linear (docs/method.md §6) and model conversion;
sparse inference layers (``SparseLinear``, ``SparseConv2d``).

    from cvsparse.nn import GatedConv2d, convert, strip, aux_parameters
    from cvsparse.nn import SparseLinear, SparseConv2d
"""

from .convert import aux_parameters, convert, convertible_layers, gated_layers, strip
from .gated import GATED_LAYERS, GatedConv2d, GatedLinear
from .sparse import SPARSE_LAYERS, SparseConv2d, SparseLinear

__all__ = [
    "GatedConv2d", "GatedLinear", "GATED_LAYERS",
    "convert", "convertible_layers", "strip", "gated_layers", "aux_parameters",
    "SparseLinear", "SparseConv2d", "SPARSE_LAYERS",
]
