"""Helpers shared by the Triton kernels: block sizes, argument invariants, multi-tensor tables.

Multi-tensor launch.  A list operator on n tensors is ONE kernel launch whose programs are the
blocks of all tensors, one after the other (tensor 0's blocks, then tensor 1's, ...).  An int64
*launch table* on the tensors' device tells each program what to do::

    table[b]                         (b < n_blocks) index l of the tensor program b works on
    table[n_blocks + l*ncols + 0]    numel of tensor l
    table[n_blocks + l*ncols + 1]    index of tensor l's first block
    table[n_blocks + l*ncols + 2+j]  data pointer of tensor l in argument list j (0 if absent)

Kernels read it through :func:`block_span` and :func:`column`.  Without a GPU the kernels run
in Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which executes
the same code on CPU tensors, so the pointers in the table must be host pointers: under the
interpreter only CPU tensors are accepted, and on a GPU only CUDA tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from cvsparse.ops import _checks
from cvsparse.ops.schemas import SCHEMAS

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
"""True when the kernels were defined for Triton's interpreter (decided at import time)."""

GPU_BLOCK = 1024
INTERPRETER_BLOCK = 4096  # the interpreter runs programs one by one: fewer, larger blocks

TL_DTYPES: dict[torch.dtype, tl.dtype] = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def schema(op: str) -> str:
    """The schema of ``cvsparse::op`` without its name, for ``torch.library.custom_op``: the
    Triton operators take exactly the normalized arguments of the other backends."""
    return SCHEMAS[op].removeprefix(op)


def block_size() -> int:
    """Elements handled by one program of an elementwise kernel."""
    return INTERPRETER_BLOCK if INTERPRETED else GPU_BLOCK


def tl_dtype(name: str, t: Tensor) -> tl.dtype:
    """Triton element type of a floating tensor ``t`` (argument ``name``)."""
    if t.dtype not in TL_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float64, float16, "
                        "bfloat16")
    return TL_DTYPES[t.dtype]


def opmath(dtype: torch.dtype) -> tl.dtype:
    """Arithmetic type for elements of ``dtype``: float64 stays, everything else is float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_device(device: torch.device) -> None:
    """Raise unless the kernels can run on tensors of ``device`` in this process."""
    if INTERPRETED and device.type != "cpu":
        raise RuntimeError(f"Triton's interpreter (TRITON_INTERPRET=1) runs the cvsparse kernels "
                           f"on CPU tensors only, got {device}")
    if not INTERPRETED and device.type != "cuda":
        raise RuntimeError(f"the cvsparse Triton kernels need CUDA tensors, got {device}; for CPU "
                           "tensors set TRITON_INTERPRET=1 before triton is imported")


def check_params(params: list[Tensor]) -> None:
    """The invariants the kernels rely on (one floating dtype, one device, contiguous): the
    public operators' own checks, plus the device this process can run Triton on."""
    _checks.params_list("params", params)
    if params:
        check_device(params[0].device)


def check_companions(name: str, tensors: list[Tensor], params: list[Tensor],
                     dtype: torch.dtype | None = None) -> None:
    """``tensors`` pair with ``params`` (see :func:`cvsparse.ops._checks.companion_list`)."""
    _checks.companion_list(name, tensors, params, dtype=dtype)


def check_lambda(name: str, lam: Tensor, params: list[Tensor]) -> None:
    """One floating value per tensor, on the params' device."""
    if not lam.is_floating_point() or lam.dim() != 1 or lam.numel() != len(params):
        raise ValueError(f"{name} must be a floating tensor of shape ({len(params)},), got "
                         f"{lam.dtype} {tuple(lam.shape)}")
    if params and lam.device != params[0].device:
        raise ValueError(f"{name} is on {lam.device} but params are on {params[0].device}")


def launch_table(columns: Sequence[list[Tensor]], block: int) -> tuple[Tensor, int]:
    """The launch table (module docstring) for the lists ``columns`` and the number of blocks.

    ``columns[0]`` are the params; every other list is empty (absent) or pairs with them.
    Returns ``(table, n_blocks)``, ``table`` an int64 tensor on the params' device.
    """
    params = columns[0]
    if not params:
        return torch.zeros(0, dtype=torch.int64), 0
    numels = [p.numel() for p in params]
    blocks = [triton.cdiv(m, block) for m in numels]
    rows: list[int] = []
    first = 0
    for i, (numel, count) in enumerate(zip(numels, blocks, strict=True)):
        rows += [numel, first] + [col[i].data_ptr() if col else 0 for col in columns]
        first += count
    owner = torch.repeat_interleave(torch.arange(len(params)),
                                    torch.tensor(blocks, dtype=torch.int64))
    table = torch.cat([owner, torch.tensor(rows, dtype=torch.int64)])
    device = params[0].device
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    return table, first


def counts_like(params: list[Tensor]) -> Tensor:
    """Zeroed int64 ``(n,)`` output for per-tensor counts, on the params' device."""
    device = params[0].device if params else torch.device("cpu")
    return torch.zeros(len(params), dtype=torch.int64, device=device)


@triton.jit
def block_span(table_ptr, n_blocks, NCOLS: tl.constexpr, BLOCK: tl.constexpr):
    """For the running program: (tensor index, pointer to its table row, int64 element offsets
    of the block ``[BLOCK]``, in-bounds mask ``[BLOCK]``)."""
    tensor = tl.load(table_ptr + tl.program_id(0))
    row = table_ptr + n_blocks + tensor * NCOLS
    offs = (tl.program_id(0) - tl.load(row + 1)) * BLOCK + tl.arange(0, BLOCK)
    return tensor, row, offs, offs < tl.load(row)


@triton.jit
def column(row, j: tl.constexpr, DTYPE: tl.constexpr):
    """Typed pointer to the tensor of argument list ``j`` in table row ``row``."""
    return tl.load(row + 2 + j).to(tl.pointer_type(DTYPE))


@triton.jit
def scalar(x, DTYPE: tl.constexpr):
    """The float64 kernel argument ``x`` as a ``DTYPE`` scalar.  (``x.to`` would fail in the
    interpreter, which passes float arguments as Python floats.)"""
    return tl.full([], x, DTYPE)
