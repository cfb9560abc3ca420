"""Session-wide test setup.

Without a GPU the Triton kernels can only run in Triton's interpreter, on CPU tensors, and the
interpreter is chosen when triton is first imported (``cvsparse.ops`` imports it indirectly).
This file is loaded before any test module, so it selects the interpreter here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
