"""Compiling Triton kernels for a GPU without one, for the tests of ``cvsparse.kernels``.

Triton's interpreter (``TRITON_INTERPRET=1``, which the tests run under) accepts programs its
compiler refuses, so each kernel test file also compiles its kernels for an sm_80 target.  That
runs in a child process without ``TRITON_INTERPRET``: the variable is read when ``triton`` is
imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_PREAMBLE = """
import torch
torch.cuda.is_available = lambda: True  # compiling needs no GPU, but importing the kernels does

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

C = "constexpr"
"""

_COMPILE = """
for kernel, signature, constexprs in CASES:
    signature.update({name: C for name in constexprs})
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    assert triton.compile(src, target=GPUTarget("cuda", 80, 32)).asm["cubin"]
print("compiled", len(CASES))
"""


def compiled_for_gpu(cases: str) -> int:
    """Run ``cases`` — Python that imports kernels and builds ``CASES``, a list of (kernel,
    signature, constexprs), with ``tl`` and ``C = "constexpr"`` defined — then compile every
    case to a cubin; the number compiled (an AssertionError with the child's stderr if any
    failed)."""
    script = _PREAMBLE + textwrap.dedent(cases) + _COMPILE
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return int(run.stdout.split("compiled", 1)[1])
