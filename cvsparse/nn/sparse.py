"""Sparse inference layers: drop-in replacements for ``nn.Linear`` and ``nn.Conv2d`` whose weight
is held packed (:mod:`cvsparse.ops.sparse_format`) and applied by the sparse operators.

    layer = SparseLinear.from_dense(linear)      # same outputs, work ∝ nonzeros
    dense = layer.to_dense()

The packed weight, the bias and the shape are buffers (``state_dict`` holds them; ``.to(dtype)``
converts the values and the bias, never the int32 indices).  Optionally the layer applies the
ReLU that follows it (``relu=True``), fused into the kernel, and a convolution the
non-overlapping max pool after it (``pool=k``).  Inference only: the layers have no parameters
and no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cvsparse import ops
from cvsparse.ops import sparse_format
from cvsparse.ops._checks import sparse_format_values

__all__ = ["SparseLinear", "SparseConv2d", "SPARSE_LAYERS", "max_pool_tiles"]


class _Packed(nn.Module):
    """A packed weight ``(M, K)`` and an optional bias ``(M,)`` as buffers."""

    values: Tensor
    col_deltas: Tensor
    row_ptr: Tensor
    bias: Tensor | None

    def _set_packed(self, values: Tensor, col_deltas: Tensor, row_ptr: Tensor,
                    bias: Tensor | None, num_columns: int) -> None:
        if row_ptr.numel() < 1 or col_deltas.numel() != values.numel():
            raise ValueError("row_ptr must have M + 1 entries and col_deltas one per value")
        if col_deltas.dtype != torch.int32 or row_ptr.dtype != torch.int32:
            raise ValueError("col_deltas and row_ptr must be int32")
        sparse_format_values(col_deltas, row_ptr, values.numel(), num_columns)
        rows = row_ptr.numel() - 1
        if bias is not None and tuple(bias.shape) != (rows,):
            raise ValueError(f"bias must have shape ({rows},), got {tuple(bias.shape)}")
        self.register_buffer("values", values.detach().contiguous())
        self.register_buffer("col_deltas", col_deltas.detach().contiguous())
        self.register_buffer("row_ptr", row_ptr.detach().contiguous())
        self.register_buffer("bias", None if bias is None else
                             bias.detach().to(values.dtype).contiguous())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The number of nonzeros is data, not architecture: take the stored length, then check
        # that the loaded indices form a valid packed weight.
        for name in ("values", "col_deltas"):
            stored = state_dict.get(prefix + name)
            own = getattr(self, name)
            if isinstance(stored, Tensor) and stored.shape != own.shape:
                setattr(self, name, own.new_empty(stored.shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        try:
            sparse_format_values(self.col_deltas, self.row_ptr, self.values.numel(),
                                 self._num_columns())
        except ValueError as exc:
            error_msgs.append(f"{prefix or type(self).__name__}: invalid packed weight: {exc}")

    def _num_columns(self) -> int:
        raise NotImplementedError

    @property
    def nnz(self) -> int:
        """Stored nonzero weights."""
        return self.values.numel()

    def _dense_weight(self, num_columns: int) -> Tensor:
        return sparse_format.unpack(self.values, self.col_deltas, self.row_ptr, num_columns)


class SparseLinear(_Packed):
    """``y = x Wᵀ + b`` (then ReLU if ``relu``) with ``W`` packed: input ``(..., in_features)``,
    output ``(..., out_features)``, one ``sparse_matmul`` on the transposed batch ``(K, N)``."""

    def __init__(self, in_features: int, out_features: int, values: Tensor, col_deltas: Tensor,
                 row_ptr: Tensor, bias: Tensor | None = None, relu: bool = False) -> None:
        super().__init__()
        if row_ptr.numel() != out_features + 1:
            raise ValueError(f"row_ptr has {row_ptr.numel()} entries, expected out_features + 1 "
                             f"= {out_features + 1}")
        self.in_features, self.out_features, self.relu = in_features, out_features, relu
        self._set_packed(values, col_deltas, row_ptr, bias, in_features)

    @classmethod
    def from_dense(cls, linear: nn.Linear, relu: bool = False) -> SparseLinear:
        """The sparse equivalent of ``linear`` (its exact zeros dropped)."""
        values, col_deltas, row_ptr = sparse_format.pack(linear.weight)
        return cls(linear.in_features, linear.out_features, values, col_deltas, row_ptr,
                   None if linear.bias is None else linear.bias.detach(), relu)

    def _num_columns(self) -> int:
        return self.in_features

    def to_dense(self) -> nn.Module:
        """An ``nn.Linear`` with the same weight and bias (followed by ``nn.ReLU`` if fused)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self._dense_weight(self.in_features))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return nn.Sequential(linear, nn.ReLU()) if self.relu else linear

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, expected {self.in_features}")
        buffers = self._buffers  # direct: Module.__getattr__ costs ~0.3 µs per buffer
        if x.dim() == 2:  # x.t(): (K, N), contiguous after a sparse layer, else transposed
            xt = x.t() if x.is_contiguous() else x.t().contiguous()
            y = ops.sparse_matmul(xt, buffers["values"], buffers["col_deltas"],
                                  buffers["row_ptr"], buffers["bias"], self.relu,
                                  weight_checked=True)
            return y.t()  # (N, M), a view of the (M, N) result
        xt = x.reshape(-1, self.in_features).t().contiguous()  # (K, N): the batch in the lanes
        y = ops.sparse_matmul(xt, buffers["values"], buffers["col_deltas"], buffers["row_ptr"],
                              buffers["bias"], self.relu, weight_checked=True)
        return y.t().reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.nnz}, bias={self.bias is not None}, relu={self.relu}")


def max_pool_tiles(x: Tensor, k: int) -> Tensor:
    """``max_pool2d(x, k)`` (stride k, no padding, floor) as ``k² − 1`` elementwise maxima of
    the strided ``(…, H // k, W // k)`` views: equal to it bit for bit (NaN propagates the same
    way) and, on NCHW inputs, several times faster than ATen's CPU kernel, which vectorizes only
    channels-last."""
    if k == 1:
        return x
    height, width = x.shape[-2] // k * k, x.shape[-1] // k * k
    if height == 0 or width == 0:
        raise ValueError(f"input {x.shape[-2]}x{x.shape[-1]} is smaller than the {k}x{k} pool")
    views = [x[..., i:height:k, j:width:k] for i in range(k) for j in range(k)]
    out = torch.maximum(views[0], views[1])
    for view in views[2:]:
        torch.maximum(out, view, out=out)
    return out


class SparseConv2d(_Packed):
    """A groups-1 ``Conv2d`` (zero padding, dilation 1) with its weight packed per output
    channel: input ``(B, C, H, W)``, output ``(B, M, Ho, Wo)``, or ``(B, M, Ho // pool,
    Wo // pool)`` with a fused max pool.  1×1 convolutions with stride 1 and no padding run as
    one ``sparse_matmul`` over the pixels, the others as ``sparse_conv2d``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int], values: Tensor,
                 col_deltas: Tensor, row_ptr: Tensor, bias: Tensor | None = None,
                 relu: bool = False, pool: int = 1) -> None:
        super().__init__()
        if row_ptr.numel() != out_channels + 1:
            raise ValueError(f"row_ptr has {row_ptr.numel()} entries, expected out_channels + "
                             f"1 = {out_channels + 1}")
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f"pool must be a positive int (1: no pooling), got {pool!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.stride = tuple(int(s) for s in stride)
        self.padding = tuple(int(p) for p in padding)
        self.relu, self.pool = relu, pool
        self._set_packed(values, col_deltas, row_ptr, bias,
                         in_channels * self.kernel_size[0] * self.kernel_size[1])
        self._kernel, self._stride, self._padding = (list(self.kernel_size), list(self.stride),
                                                     list(self.padding))
        self.pointwise = (self.kernel_size == (1, 1) and self.stride == (1, 1)
                          and self.padding == (0, 0))

    @staticmethod
    def supports(conv: nn.Conv2d) -> str | None:
        """Why ``conv`` cannot be made sparse (``None`` when it can)."""
        if conv.groups != 1:
            return f"groups={conv.groups} (only 1 is supported)"
        if tuple(conv.dilation) != (1, 1):
            return f"dilation={tuple(conv.dilation)}"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r}"
        if isinstance(conv.padding, str):
            return f"padding={conv.padding!r} (give it in pixels)"
        return None

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, relu: bool = False, weight: Tensor | None = None,
                   bias: Tensor | None = None, pool: int = 1) -> SparseConv2d:
        """The sparse equivalent of ``conv`` (its exact zeros dropped); ``weight`` / ``bias``
        replace the layer's own (e.g. with a BatchNorm folded in); ``relu`` and ``pool`` fuse
        the ReLU and the ``pool × pool`` max pool (stride ``pool``) that follow it."""
        reason = cls.supports(conv)
        if reason is not None:
            raise ValueError(f"SparseConv2d cannot replace this Conv2d: {reason}")
        weight = conv.weight if weight is None else weight
        if bias is None and conv.bias is not None:
            bias = conv.bias
        values, col_deltas, row_ptr = sparse_format.pack(weight.detach().reshape(
            conv.out_channels, -1))
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                   conv.padding, values, col_deltas, row_ptr,
                   None if bias is None else bias.detach(), relu, pool)

    def _num_columns(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def to_dense(self) -> nn.Module:
        """An ``nn.Conv2d`` with the same weight and bias, followed by the fused ``nn.ReLU`` and
        ``nn.MaxPool2d`` if any."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, bias=self.bias is not None, device=self.values.device,
                         dtype=self.values.dtype)
        columns = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        with torch.no_grad():
            conv.weight.copy_(self._dense_weight(columns).reshape(conv.weight.shape))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        followers = ([nn.ReLU()] if self.relu else []) + ([nn.MaxPool2d(self.pool)]
                                                          if self.pool > 1 else [])
        return nn.Sequential(conv, *followers) if followers else conv

    def forward(self, x: Tensor) -> Tensor:
        return max_pool_tiles(self._convolve(x), self.pool)

    def _convolve(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"input must be (B, {self.in_channels}, H, W), got "
                             f"{tuple(x.shape)}")
        if not self.pointwise:
            for name, size, k, p in (("height", x.shape[2], self.kernel_size[0], self.padding[0]),
                                     ("width", x.shape[3], self.kernel_size[1], self.padding[1])):
                if size + 2 * p < k:
                    raise ValueError(f"input {name} {size} with padding {p} is smaller than "
                                     f"the kernel ({k})")
            b = self._buffers  # direct: Module.__getattr__ costs ~0.3 µs per buffer
            return ops.sparse_conv2d(x.contiguous(), b["values"], b["col_deltas"], b["row_ptr"],
                                     b["bias"], self._kernel, self._stride, self._padding,
                                     self.relu, weight_checked=True)
        batch, channels, height, width = x.shape
        if batch == 1:
            pixels = x.reshape(channels, height * width).contiguous()
        else:  # (C, B·H·W): every image's pixels in the lanes of one call
            pixels = x.transpose(0, 1).reshape(channels, batch * height * width)
        y = ops.sparse_matmul(pixels, self.values, self.col_deltas, self.row_ptr, self.bias,
                              self.relu, weight_checked=True)
        y = y.reshape(self.out_channels, batch, height, width)
        return y.transpose(0, 1).contiguous()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, nnz={self.nnz}, "
                f"bias={self.bias is not None}, relu={self.relu}"
                + (f", pool={self.pool}" if self.pool > 1 else ""))


SPARSE_LAYERS = (SparseLinear, SparseConv2d)
