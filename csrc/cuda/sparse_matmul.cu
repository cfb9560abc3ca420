// CUDA kernel of cvsparse::sparse_matmul: out (M, N) = W @ input (K, N) + bias[m], optional
// ReLU, for Linear layers (N = batch) and 1×1 convolutions (N = pixels).  W is sparse, stored
// per output row with delta-encoded columns; see sparse_rows.cuh for the tiling, the shared
// memory decoding of the deltas, the register accumulators and the row order.
//
// Split rows (N ≤ kILP: a Linear layer at batch 1 to 4).  One tile of columns covers N, so
// instead of one thread walking a whole row, the warp of a row splits its nonzeros (lane l takes
// entries l, l + 32, ... of every staged chunk), each lane accumulating all N columns, and a
// fixed shuffle tree adds the 32 partial sums before lane 0 applies bias and ReLU and stores.
#include "sparse_rows.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

namespace cvsparse::cuda {
namespace {

using sparse::kChunk;
using sparse::kThreads;
using sparse::kWarps;

template <typename scalar_t, int kThreadsPerRow, bool kSplit>
__global__ void __launch_bounds__(kThreads)
    sparse_matmul_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ values,
                         const int32_t* __restrict__ col_deltas,
                         const int32_t* __restrict__ row_ptr, const int32_t* __restrict__ order,
                         const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                         int64_t rows, int64_t n, bool relu, bool vector) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kRows = kThreads / kThreadsPerRow;
  __shared__ int32_t s_col[kRows][kChunk];
  __shared__ opmath_t s_val[kRows][kChunk];
  __shared__ int32_t s_carry[kRows];

  static_assert(!kSplit || kThreadsPerRow == kWarpSize, "a split row is one warp");
  const int group = threadIdx.x / kThreadsPerRow;
  const int lane = threadIdx.x % kThreadsPerRow;
  const int warp = threadIdx.x / kWarpSize;
  // Split rows: every lane of the row covers the same (only) column tile.
  const int64_t col0 = kSplit ? 0
                              : (static_cast<int64_t>(blockIdx.x) * kThreadsPerRow + lane) * kILP;
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
                               s_col[r][slot] = column;
                               s_val[r][slot] = static_cast<opmath_t>(value);
                             });
      }
      __syncthreads();
      const int32_t left = mine.end - mine.begin - done;
      const int count = left < kChunk ? left : kChunk;
#pragma unroll 4
      for (int e = kSplit ? lane : 0; e < count; e += kSplit ? kThreadsPerRow : 1) {
        const opmath_t w = s_val[group][e];
        scalar_t x[kILP];
        load_group(x, input + static_cast<int64_t>(s_col[group][e]) * n, col0, n, vector);
#pragma unroll
        for (int k = 0; k < kILP; ++k) {
          acc[k] += w * static_cast<opmath_t>(x[k]);
        }
      }
      done += kChunk;
      // Barrier (the chunk buffers are rewritten next round) and loop condition in one.
      more = __syncthreads_or(mine.end - mine.begin > done) != 0;
    }
    if (kSplit) {
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        acc[k] = warp_sum(acc[k]);  // fixed shuffle tree: lane 0 holds the row's sums
      }
    }
    if (mine.row >= 0 && col0 < n && (!kSplit || lane == 0)) {
      const opmath_t b = bias == nullptr ? opmath_t(0) : static_cast<opmath_t>(bias[mine.row]);
      scalar_t y[kILP];
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        y[k] = static_cast<scalar_t>(sparse::epilogue(acc[k], b, relu));
      }
      store_group(out + static_cast<int64_t>(mine.row) * n, y, col0, n, vector);
    }
  }
}

template <typename scalar_t, int kThreadsPerRow, bool kSplit = false>
void launch(const at::Tensor& input, const at::Tensor& values, const at::Tensor& col_deltas,
            const at::Tensor& row_ptr, const std::optional<at::Tensor>& bias, bool relu,
            at::Tensor& out) {
  constexpr int kRows = kThreads / kThreadsPerRow;
  const int64_t rows = out.size(0);
  const int64_t n = out.size(1);
  const at::Tensor order = sparse::row_order(row_ptr, kRows);
  const int64_t col_tiles = (n + kThreadsPerRow * kILP - 1) / (kThreadsPerRow * kILP);
  TORCH_CHECK(col_tiles <= std::numeric_limits<int32_t>::max(), "sparse_matmul: N too large");
  const int64_t row_blocks = (rows + kRows - 1) / kRows;
  const dim3 grid(static_cast<unsigned>(col_tiles),
                  static_cast<unsigned>(std::min(row_blocks, sparse::kMaxGridY)));
  const auto* x = input.const_data_ptr<scalar_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  // Whole groups of kILP columns move as one vector access when every row starts aligned.
  const bool vector = n % kILP == 0 && group_aligned(x) && group_aligned(y);
  sparse_matmul_kernel<scalar_t, kThreadsPerRow, kSplit>
      <<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x, values.const_data_ptr<scalar_t>(), col_deltas.const_data_ptr<int32_t>(),
          row_ptr.const_data_ptr<int32_t>(),
          order.defined() ? order.const_data_ptr<int32_t>() : nullptr,
          bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr, y, rows, n, relu,
          vector);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sparse_matmul_cuda(const at::Tensor& input, const at::Tensor& values,
                              const at::Tensor& col_deltas, const at::Tensor& row_ptr,
                              const std::optional<at::Tensor>& bias, bool relu) {
  sparse::check_weight("sparse_matmul", input, values, col_deltas, row_ptr, bias);
  TORCH_CHECK(input.dim() == 2, "sparse_matmul: input must be (K, N), got ", input.dim(),
              " dimensions");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t rows = row_ptr.numel() - 1;
  const int64_t n = input.size(1);
  at::Tensor out = at::empty({rows, n}, input.options());
  if (rows == 0 || n == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "sparse_matmul_cuda", [&] {
        if (n <= kILP) {
          launch<scalar_t, kWarpSize, true>(input, values, col_deltas, row_ptr, bias, relu, out);
          return;
        }
        switch (sparse::threads_per_row(n)) {
          case 4:
            launch<scalar_t, 4>(input, values, col_deltas, row_ptr, bias, relu, out);
            break;
          case kWarpSize:
            launch<scalar_t, kWarpSize>(input, values, col_deltas, row_ptr, bias, relu, out);
            break;
          default:
            launch<scalar_t, kThreads>(input, values, col_deltas, row_ptr, bias, relu, out);
        }
      });
  return out;
}

}  // namespace
}  // namespace cvsparse::cuda

TORCH_LIBRARY_IMPL(cvsparse, CUDA, m) {
  m.impl("sparse_matmul", &cvsparse::cuda::sparse_matmul_cuda);
}
