"""Triton implementations of the cvsparse operators, as ``torch.ops.cvsparse_triton.<name>``.

Importing this package registers ``prox_sgd_``, ``mixed_partial_dot``, ``threshold_``, ``max_abs``,
``gated_weight`` (differentiable), ``gated_weight_backward`` and the sparse inference operators
``sparse_matmul`` and ``sparse_conv2d``, with the normalized signatures
of ``cvsparse.ops.reference`` and fake implementations for ``torch.compile``.  Select them with
``cvsparse.ops.set_backend("triton")``.  They run on CUDA tensors, or on CPU tensors in Triton's
interpreter when ``TRITON_INTERPRET=1`` is set before triton is first imported (slow; tests).
Importing raises ``ImportError`` (which ``cvsparse.ops`` reports as "backend 'triton' is
unavailable") when triton is missing, or when neither a GPU nor the interpreter is available.
"""

try:
    import triton
    import triton.language  # noqa: F401
except Exception as exc:  # ImportError, or a broken install failing while it initializes
    raise ImportError(
        f"cvsparse.kernels needs the 'triton' package (pip install 'cvsparse[triton]'): "
        f"{type(exc).__name__}: {exc}"
    ) from exc

import torch  # noqa: E402

# Checked before any submodule is imported, so a failed import leaves nothing half-initialized
# (the interpreter is chosen per kernel when its module is imported).
if not (triton.knobs.runtime.interpret or torch.cuda.is_available()):
    raise ImportError(
        "cvsparse.kernels needs a CUDA GPU, or Triton's interpreter for CPU tensors; this process "
        "has no GPU and TRITON_INTERPRET is not set (set TRITON_INTERPRET=1 before triton is "
        "imported)"
    )

from . import (  # noqa: E402, F401
    gated_weight,
    max_abs,
    mixed_partial_dot,
    prox_sgd,
    sparse_conv2d,
    sparse_matmul,
    threshold,
)
