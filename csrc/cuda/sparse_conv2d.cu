// CUDA kernel of cvsparse::sparse_conv2d: direct sparse convolution (groups = 1, zero padding,
// stride), bias and ReLU fused.  Input (B, C, H, W) and output (B, M, Ho, Wo) are contiguous
// NCHW; the sparse weight has one row per output channel over the K = C·kh·kw columns (c, i, j),
// delta-encoded (see sparse_rows.cuh for the tiling, decoding, accumulators and row order).
//
// The output pixels of one image play the role of the matrix product's N columns: a thread owns
// kILP consecutive output pixels (flattened oh·Wo + ow) and keeps their top-left input
// coordinates (oh·sh − ph, ow·sw − pw) in registers.  Decoding turns each column into the input
// offset of its tap, c·H·W + i·W + j, and the tap (i, j) itself, stored in shared memory; per
// nonzero, a thread then reads input[b, c, ih, iw] for its pixels, zero where (ih, iw) falls in
// the padding.  No im2col buffer is ever built.
#include "sparse_rows.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>

namespace cvsparse::cuda {
namespace {

using sparse::kChunk;
using sparse::kThreads;
using sparse::kWarps;

// Geometry of one call (all int32: the host checks that C·H·W and Ho·Wo fit).
struct ConvShape {
  int32_t height, width;          // input H, W
  int32_t out_width;              // Wo
  int32_t pixels;                 // Ho · Wo
  int32_t kernel_w;               // kw
  int32_t taps;                   // kh · kw
  int32_t stride_h, stride_w;
  int32_t pad_h, pad_w;
  int64_t image;                  // C · H · W elements per input image
  int64_t tiles;                  // pixel tiles per image
};

template <typename scalar_t, int kThreadsPerRow>
__global__ void __launch_bounds__(kThreads)
    sparse_conv2d_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ values,
                         const int32_t* __restrict__ col_deltas,
                         const int32_t* __restrict__ row_ptr, const int32_t* __restrict__ order,
                         const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                         int64_t rows, const ConvShape shape, bool relu, bool vector) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kRows = kThreads / kThreadsPerRow;
  __shared__ int32_t s_offset[kRows][kChunk];  // c·H·W + i·W + j
  __shared__ int32_t s_tap[kRows][kChunk];     // i << 16 | j
  __shared__ opmath_t s_val[kRows][kChunk];
  __shared__ int32_t s_carry[kRows];

  const int group = threadIdx.x / kThreadsPerRow;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t batch = blockIdx.x / shape.tiles;
  const int64_t pixel0 = ((blockIdx.x % shape.tiles) * kThreadsPerRow +
                          threadIdx.x % kThreadsPerRow) * kILP;
  const scalar_t* image = input + batch * shape.image;

  // Top-left input coordinate of each owned pixel's window (padding subtracted) and its offset
  // in the image.  A pixel past the end gets a window far outside the image: every tap reads 0.
  int32_t top[kILP];
  int32_t left[kILP];
  int32_t base[kILP];
#pragma unroll
  for (int k = 0; k < kILP; ++k) {
    const int64_t p = pixel0 + k;
    const bool live = p < shape.pixels;
    const int32_t oh = live ? static_cast<int32_t>(p / shape.out_width) : 0;
    const int32_t ow = live ? static_cast<int32_t>(p % shape.out_width) : 0;
    top[k] = live ? oh * shape.stride_h - shape.pad_h : -(1 << 30);
    left[k] = ow * shape.stride_w - shape.pad_w;
    base[k] = live ? top[k] * shape.width + left[k] : 0;
  }

  const int64_t row_blocks = (rows + kRows - 1) / kRows;
  for (int64_t rb = blockIdx.y; rb < row_blocks; rb += gridDim.y) {
    const sparse::RowSpan mine = sparse::row_span(row_ptr, order, rb * kRows + group, rows);
    if (threadIdx.x < kRows) {
      s_carry[threadIdx.x] = 0;
    }
    __syncthreads();
    opmath_t acc[kILP] = {};
    int32_t done = 0;
    bool more = true;
    while (more) {
      for (int r = warp; r < kRows; r += kWarps) {
        const sparse::RowSpan span = sparse::row_span(row_ptr, order, rb * kRows + r, rows);
        sparse::decode_chunk(span, done, values, col_deltas, &s_carry[r],
                             [&](int slot, int32_t column, scalar_t value) {
                               const int32_t c = column / shape.taps;
                               const int32_t tap = column - c * shape.taps;
                               const int32_t i = tap / shape.kernel_w;
                               const int32_t j = tap - i * shape.kernel_w;
                               s_offset[r][slot] = c * shape.height * shape.width +
                                                   i * shape.width + j;
                               s_tap[r][slot] = (i << 16) | j;
                               s_val[r][slot] = static_cast<opmath_t>(value);
                             });
      }
      __syncthreads();
      const int32_t remaining = mine.end - mine.begin - done;
      const int count = remaining < kChunk ? remaining : kChunk;
#pragma unroll 2
      for (int e = 0; e < count; ++e) {
        const opmath_t w = s_val[group][e];
        const int32_t offset = s_offset[group][e];
        const int32_t i = s_tap[group][e] >> 16;
        const int32_t j = s_tap[group][e] & 0xffff;
#pragma unroll
        for (int k = 0; k < kILP; ++k) {
          const int32_t ih = top[k] + i;
          const int32_t iw = left[k] + j;
          const bool inside = static_cast<uint32_t>(ih) < static_cast<uint32_t>(shape.height) &&
                              static_cast<uint32_t>(iw) < static_cast<uint32_t>(shape.width);
          const opmath_t x =
              inside ? static_cast<opmath_t>(image[offset + base[k]]) : opmath_t(0);
          acc[k] += w * x;
        }
      }
      done += kChunk;
      more = __syncthreads_or(mine.end - mine.begin > done) != 0;
    }
    if (mine.row >= 0 && pixel0 < shape.pixels) {
      const opmath_t b = bias == nullptr ? opmath_t(0) : static_cast<opmath_t>(bias[mine.row]);
      scalar_t y[kILP];
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        y[k] = static_cast<scalar_t>(sparse::epilogue(acc[k], b, relu));
      }
      store_group(out + (batch * rows + mine.row) * shape.pixels, y, pixel0, shape.pixels,
                  vector);
    }
  }
}

template <typename scalar_t, int kThreadsPerRow>
void launch(const at::Tensor& input, const at::Tensor& values, const at::Tensor& col_deltas,
            const at::Tensor& row_ptr, const std::optional<at::Tensor>& bias, bool relu,
            ConvShape shape, at::Tensor& out) {
  constexpr int kRows = kThreads / kThreadsPerRow;
  const int64_t rows = out.size(1);
  const at::Tensor order = sparse::row_order(row_ptr, kRows);
  shape.tiles = (shape.pixels + kThreadsPerRow * kILP - 1) / (kThreadsPerRow * kILP);
  const int64_t blocks_x = out.size(0) * shape.tiles;
  TORCH_CHECK(blocks_x <= std::numeric_limits<int32_t>::max(),
              "sparse_conv2d: batch × output pixels too large");
  const int64_t row_blocks = (rows + kRows - 1) / kRows;
  const dim3 grid(static_cast<unsigned>(blocks_x),
                  static_cast<unsigned>(std::min(row_blocks, sparse::kMaxGridY)));
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  const bool vector = shape.pixels % kILP == 0 && group_aligned(y);
  sparse_conv2d_kernel<scalar_t, kThreadsPerRow>
      <<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          input.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(),
          col_deltas.const_data_ptr<int32_t>(), row_ptr.const_data_ptr<int32_t>(),
          order.defined() ? order.const_data_ptr<int32_t>() : nullptr,
          bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr, y, rows, shape, relu,
          vector);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sparse_conv2d_cuda(const at::Tensor& input, const at::Tensor& values,
                              const at::Tensor& col_deltas, const at::Tensor& row_ptr,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, bool relu) {
  sparse::check_weight("sparse_conv2d", input, values, col_deltas, row_ptr, bias);
  TORCH_CHECK(input.dim() == 4, "sparse_conv2d: input must be (B, C, H, W), got ", input.dim(),
              " dimensions");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2,
              "sparse_conv2d: kernel_size, stride and padding take two values each");
  TORCH_CHECK(kernel_size[0] >= 1 && kernel_size[1] >= 1 && stride[0] >= 1 && stride[1] >= 1 &&
                  padding[0] >= 0 && padding[1] >= 0,
              "sparse_conv2d: kernel_size and stride must be >= 1 and padding >= 0, got ",
              kernel_size, ", ", stride, ", ", padding);
  const int64_t batch = input.size(0), channels = input.size(1);
  const int64_t height = input.size(2), width = input.size(3);
  const int64_t out_h = (height + 2 * padding[0] - kernel_size[0]) / stride[0] + 1;
  const int64_t out_w = (width + 2 * padding[1] - kernel_size[1]) / stride[1] + 1;
  TORCH_CHECK(height + 2 * padding[0] >= kernel_size[0] && width + 2 * padding[1] >= kernel_size[1],
              "sparse_conv2d: the kernel ", kernel_size, " is larger than the padded input (",
              height, ", ", width, ") + 2 × ", padding);
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(channels * height * width <= kInt32Max && out_h * out_w <= kInt32Max &&
                  kernel_size[0] < (1 << 15) && kernel_size[1] < (1 << 15) &&
                  (height + padding[0]) * width + width + padding[1] <= kInt32Max,
              "sparse_conv2d: an image or kernel too large for the kernel's 32-bit offsets (C·H·W = ",
              channels * height * width, ")");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t rows = row_ptr.numel() - 1;
  at::Tensor out = at::empty({batch, rows, out_h, out_w}, input.options());
  if (out.numel() == 0) {
    return out;
  }
  ConvShape shape{};
  shape.height = static_cast<int32_t>(height);
  shape.width = static_cast<int32_t>(width);
  shape.out_width = static_cast<int32_t>(out_w);
  shape.pixels = static_cast<int32_t>(out_h * out_w);
  shape.kernel_w = static_cast<int32_t>(kernel_size[1]);
  shape.taps = static_cast<int32_t>(kernel_size[0] * kernel_size[1]);
  shape.stride_h = static_cast<int32_t>(stride[0]);
  shape.stride_w = static_cast<int32_t>(stride[1]);
  shape.pad_h = static_cast<int32_t>(padding[0]);
  shape.pad_w = static_cast<int32_t>(padding[1]);
  shape.image = channels * height * width;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "sparse_conv2d_cuda", [&] {
        switch (sparse::threads_per_row(shape.pixels)) {
          case 4:
            launch<scalar_t, 4>(input, values, col_deltas, row_ptr, bias, relu, shape, out);
            break;
          case kWarpSize:
            launch<scalar_t, kWarpSize>(input, values, col_deltas, row_ptr, bias, relu, shape,
                                        out);
            break;
          default:
            launch<scalar_t, kThreads>(input, values, col_deltas, row_ptr, bias, relu, shape,
                                       out);
        }
      });
  return out;
}

}  // namespace
}  // namespace cvsparse::cuda

TORCH_LIBRARY_IMPL(cvsparse, CUDA, m) {
  m.impl("sparse_conv2d", &cvsparse::cuda::sparse_conv2d_cuda);
}
