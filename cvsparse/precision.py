"""Mixed precision and memory layout of a run's training steps (docs/precision.md).

A :class:`Precision` is built once per run from the settings ``precision`` (``"fp32"``,
``"bf16"`` or ``"fp16"``) and ``channels_last``, for the device the model trains on.  It gives

* :meth:`Precision.autocast` — the context a forward pass runs in: ``torch.autocast`` to bfloat16
  or float16 (matrix products and convolutions in the reduced dtype, everything autocast keeps
  in float32 in float32), nothing for fp32;
* :attr:`Precision.scaler` — for fp16, a ``torch.amp.GradScaler`` (float16 gradients underflow
  without loss scaling); None otherwise;
* :meth:`Precision.prepare` and :meth:`Precision.input` — the model's 4-D parameters and the
  4-D input batches in ``torch.channels_last`` when ``channels_last`` is set.

The parameters stay float32 (the master weights): autocast casts them per operation, so the
optimizer, the fused operators and the hypergradient see float32 tensors.  fp32 without
``channels_last`` changes nothing a step computes.  Leaf module: imports only torch.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

#: The accepted ``precision`` settings and the dtype autocast computes in (None: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """How a run's forward and backward passes compute (see the module docstring).

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        channels_last: put 4-D parameters and inputs in ``torch.channels_last``.
        device: the device the model trains on (``"cpu"``, ``"cuda:0"``, a ``torch.device``).

    Raises:
        ValueError: an unknown ``precision``, a non-bool ``channels_last``, or a reduced
            dtype that this PyTorch's autocast does not support on ``device``'s type.
    """

    def __init__(self, precision: str = "fp32", channels_last: bool = False,
                 device: torch.device | str = "cpu") -> None:
        if not isinstance(precision, str) or precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {precision!r}")
        if not isinstance(channels_last, bool):
            raise ValueError(f"channels_last must be true or false, got {channels_last!r}")
        self.name = precision
        self.dtype = PRECISIONS[precision]
        self.channels_last = channels_last
        self.device_type = torch.device(device).type
        if self.dtype is not None and not autocast_supported(self.device_type, self.dtype):
            raise ValueError(f"precision {precision} is not supported on {self.device_type} "
                             f"by this PyTorch's autocast ({torch.__version__}); use fp32"
                             + ("" if precision == "bf16" else " or bf16"))
        if precision == "bf16" and self.device_type == "cpu" and not cpu_has_bf16_kernels():
            warnings.warn("bf16 on this CPU runs convolutions far more slowly than fp32 (a "
                          "ResNet-56 training step 11x): oneDNN has no bfloat16 kernels "
                          "without AVX-512, so PyTorch falls back to its reference kernels "
                          "(docs/precision.md); use fp32 here", stacklevel=2)
        if precision == "fp16" and self.device_type == "cpu":
            warnings.warn("fp16 on the CPU runs convolutions far more slowly than fp32 (a "
                          "ResNet-56 training step 200x, docs/precision.md); bf16 is the CPU's "
                          "reduced precision", stacklevel=2)
        self.scaler = (torch.amp.GradScaler(self.device_type) if precision == "fp16"
                       else None)

    def autocast(self) -> AbstractContextManager[Any]:
        """The context of a forward pass: ``torch.autocast`` to the reduced dtype, or nothing
        for fp32.  Run the backward pass outside it."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` with its 4-D parameters and buffers in ``torch.channels_last`` (in place:
        the Parameter objects stay those an optimizer holds), when ``channels_last`` is set;
        else ``model`` untouched."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def input(self, x: Tensor) -> Tensor:
        """A batch ``x`` as the model should receive it: a 4-D ``(N, C, H, W)`` batch in
        ``torch.channels_last`` when ``channels_last`` is set (same values and shape), any
        other ``x`` as it is."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def state_dict(self) -> dict[str, Any]:
        """The loss scaler's state (scale, growth tracker; plain numbers), for checkpoints."""
        return {"scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a state without a scaler leaves a fresh one as it is)."""
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])

    def __repr__(self) -> str:
        return f"Precision({self.name!r}, channels_last={self.channels_last}, " \
               f"device_type={self.device_type!r})"


#: fp32, contiguous: what a step computes without any precision setting.
FP32 = Precision()


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN, which PyTorch's CPU convolutions and matrix products run on, has bfloat16
    kernels for this CPU (AVX-512, native with AVX512-BF16 or AMX): PyTorch's own test for
    routing a bf16 convolution there.  Without them the convolution runs in PyTorch's
    reference kernel."""
    return (torch.backends.mkldnn.is_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def autocast_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.autocast(device_type, dtype=dtype)`` really autocasts to ``dtype`` (an
    unsupported pair is disabled by PyTorch with a warning, or refused)."""
    if not torch.amp.is_autocast_available(device_type):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device_type, dtype=dtype):
                return (torch.is_autocast_enabled(device_type)
                        and torch.get_autocast_dtype(device_type) == dtype)
        except (RuntimeError, ValueError):
            return False
