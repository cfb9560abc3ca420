// Pieces shared by the sparse inference kernels (sparse_matmul.cu, sparse_conv2d.cu).
//
// The sparse weight W (M output rows × K columns) is stored per output row: `values` (nnz,),
// `row_ptr` (M + 1,) int32 and `col_deltas` (nnz,) int32, the columns of a row delta-encoded
// (first entry = the first column, every later entry = the distance to the previous column).
//
// Tiling.  A block of kThreads threads covers kRows = kThreads / ThreadsPerRow output rows and
// ThreadsPerRow · kILP output columns: the threads of row group g share row g of the tile, and
// each of them owns kILP consecutive output columns, so a warp reads kILP · 32 consecutive
// elements of an input row per nonzero (coalesced; one vector load per thread when aligned).
// The host picks ThreadsPerRow from N (small N: many rows per block, few threads per row);
// sparse_matmul with N ≤ kILP instead gives each row a warp that splits the row's nonzeros.
//
// Decoding.  The nonzeros of the tile's rows are staged in shared memory kChunk at a time per
// row.  One warp decodes a row's chunk: each lane loads kPerLane consecutive deltas, a warp
// inclusive scan (shuffles) turns them into absolute columns, and the running column of the row
// (the "carry") is kept in shared memory between chunks.  The whole block then multiplies: row
// group g walks the chunk of its row, reading each (column, value) pair from shared memory (a
// broadcast) and the input row at that column from global memory, accumulating kILP values per
// thread in registers (opmath: float32 for half / bfloat16, float64 for double).  Bias and ReLU
// are applied to the registers before the single store of each output element.
//
// Balance.  Rows of one block take as many chunk rounds as its longest row; with more than one
// row block the rows are visited in order of decreasing length (a permutation computed on the
// device, no host synchronization), so rows of similar length share a block and the longest
// rows start first (row swizzle, Gale et al. 2020).
#pragma once

#include "multi_tensor.cuh"

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/sub.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <limits>
#include <optional>

namespace cvsparse::cuda::sparse {

constexpr int kThreads = 128;   // threads per block
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kChunk = 64;      // nonzeros of one row staged per round
constexpr int kPerLane = kChunk / kWarpSize;
constexpr int64_t kMaxGridY = 65535;
static_assert(kChunk % kWarpSize == 0, "a chunk is decoded by one warp");

// ---- host ----------------------------------------------------------------------------------

// Checks of what the kernels' memory accesses depend on, apart from the index values
// themselves (row_ptr monotone within [0, nnz], columns below K), which are validated in
// Python before any backend runs (reading them here would need a device synchronization).
inline void check_weight(const char* op, const at::Tensor& input, const at::Tensor& values,
                         const at::Tensor& col_deltas, const at::Tensor& row_ptr,
                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.is_cuda(), op, ": input must be a CUDA tensor, got ", input.device());
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": input has dtype ", dtype, "; supported: float32, float64, float16, bfloat16");
  TORCH_CHECK(input.is_contiguous(), op, ": input must be contiguous");
  const auto same_device = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(),
                " but input is on ", input.device());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
    TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got ", t.dim(), " dimensions");
  };
  same_device("values", values);
  same_device("col_deltas", col_deltas);
  same_device("row_ptr", row_ptr);
  TORCH_CHECK(values.scalar_type() == dtype, op, ": values has dtype ", values.scalar_type(),
              " but input has ", dtype);
  TORCH_CHECK(col_deltas.scalar_type() == at::kInt, op, ": col_deltas must be int32, got ",
              col_deltas.scalar_type());
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt, op, ": row_ptr must be int32, got ",
              row_ptr.scalar_type());
  TORCH_CHECK(row_ptr.numel() >= 1, op, ": row_ptr must have M + 1 >= 1 entries");
  TORCH_CHECK(col_deltas.numel() == values.numel(), op, ": col_deltas has ", col_deltas.numel(),
              " entries but values has ", values.numel());
  TORCH_CHECK(values.numel() <= std::numeric_limits<int32_t>::max(), op,
              ": more than 2^31 - 1 nonzeros");
  if (bias.has_value()) {
    same_device("bias", *bias);
    TORCH_CHECK(bias->scalar_type() == dtype, op, ": bias has dtype ", bias->scalar_type(),
                " but input has ", dtype);
    TORCH_CHECK(bias->numel() == row_ptr.numel() - 1, op, ": bias has ", bias->numel(),
                " entries but the weight has ", row_ptr.numel() - 1, " rows");
  }
}

// Threads per output row for an output row of n columns: enough to cover n with kILP columns
// each, at most a whole block.
inline int threads_per_row(int64_t n) {
  if (n <= 4 * kILP) {
    return 4;
  }
  if (n <= kWarpSize * kILP) {
    return kWarpSize;
  }
  return kThreads;
}

// The visiting order of the rows (int32, longest first) when there is more than one row block,
// else an undefined tensor (rows in their own order).  Computed on the device.
inline at::Tensor row_order(const at::Tensor& row_ptr, int rows_per_block) {
  const int64_t m = row_ptr.numel() - 1;
  if (m <= rows_per_block) {
    return at::Tensor();
  }
  const at::Tensor lengths = at::sub(row_ptr.slice(0, 1), row_ptr.slice(0, 0, m));
  return at::argsort(lengths, /*stable=*/true, /*dim=*/0, /*descending=*/true)
      .to(at::kInt);
}

// ---- device --------------------------------------------------------------------------------

// Nonzero range of a row; an index past the last row is an empty row.
struct RowSpan {
  int32_t row;  // -1 for a padding row of the last tile
  int32_t begin;
  int32_t end;
};

__device__ __forceinline__ RowSpan row_span(const int32_t* row_ptr, const int32_t* order,
                                            int64_t logical, int64_t rows) {
  if (logical >= rows) {
    return {-1, 0, 0};
  }
  const int32_t row = order == nullptr ? static_cast<int32_t>(logical) : order[logical];
  return {row, row_ptr[row], row_ptr[row + 1]};
}

// Decodes nonzeros [span.begin + done, +kChunk) of one row into shared memory, by one warp.
// `emit(slot, column, value)` stores the decoded entry `slot` of the chunk (entries past the row
// are not emitted).  `carry` holds the row's last decoded column (0 before the first chunk) and
// is updated for the next chunk.
template <typename scalar_t, typename Emit>
__device__ __forceinline__ void decode_chunk(const RowSpan& span, int32_t done,
                                             const scalar_t* values, const int32_t* col_deltas,
                                             int32_t* carry, const Emit& emit) {
  const int lane = threadIdx.x % kWarpSize;
  const int32_t first = span.begin + done + lane * kPerLane;
  int32_t delta[kPerLane];
  int32_t local = 0;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    delta[e] = first + e < span.end ? col_deltas[first + e] : 0;
    local += delta[e];
  }
  int32_t inclusive = local;  // warp-inclusive scan of the per-lane sums
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int32_t up = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) {
      inclusive += up;
    }
  }
  const int32_t base = *carry;
  int32_t column = base + inclusive - local;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    column += delta[e];
    if (first + e < span.end) {
      emit(lane * kPerLane + e, column, values[first + e]);
    }
  }
  const int32_t total = __shfl_sync(0xffffffffu, inclusive, kWarpSize - 1);
  __syncwarp();
  if (lane == 0) {
    *carry = base + total;
  }
}

// y = acc (+ bias) (ReLU), with ReLU as `y < 0 ? 0 : y` so that NaN propagates like torch.relu.
template <typename opmath_t>
__device__ __forceinline__ opmath_t epilogue(opmath_t acc, opmath_t bias, bool relu) {
  const opmath_t y = acc + bias;
  return relu && y < opmath_t(0) ? opmath_t(0) : y;
}

}  // namespace cvsparse::cuda::sparse
