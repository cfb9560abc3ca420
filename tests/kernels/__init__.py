"""Tests of the Triton kernels (``cvsparse.kernels``).

Without a GPU they run in Triton's interpreter, which must be selected before triton is first
imported; importing this package (pytest does so before the test modules) selects it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
