// CUDA kernel of cvsparse::mixed_partial_dot (docs/method.md §3): for every tensor l of a list,
// row l of the (n, 2) result is [Σ c·v·sign(w), Σ c·v·w] (c = precond, or 1).
//
// Deterministic two-pass reduction, no floating-point atomics:
//   1. the chunked kernel reduces each (tensor, chunk) block in opmath (float32, or float64 for
//      float64 inputs) with warp shuffles and writes its two partials to a buffer, at the
//      block's global number;
//   2. a small kernel with one block per tensor sums that tensor's partials (a contiguous range
//      of the buffer) in float64, in a fixed order, and writes the row.
// The result is float64 for float64 inputs, float32 otherwise, and bitwise reproducible.
#include "multi_tensor.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace cvsparse::cuda {
namespace {

constexpr int kFinishThreads = 128;
constexpr int kFinishTensors = 256;  // tensors per launch of the second pass

template <typename scalar_t>
struct PartialDotOp {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* partials;  // (number of blocks, 2)

  // Lists: 0 params, 1 vectors, 2 preconditioner (may be absent).
  __device__ void operator()(const ChunkMetadata<3>& meta) const {
    const ChunkRange range = block_chunk(meta);
    const scalar_t* w_ptr = chunk_pointer<scalar_t>(meta, 0, range);
    const scalar_t* q_ptr = chunk_pointer<scalar_t>(meta, 1, range);
    const scalar_t* c_ptr = chunk_pointer<scalar_t>(meta, 2, range);
    const bool vector = group_aligned(w_ptr) && group_aligned(q_ptr) && group_aligned(c_ptr);

    // Elements past the chunk load as zeros and add exact zeros.
    acc_t sums[2] = {acc_t(0), acc_t(0)};
    for (int64_t i = threadIdx.x * kILP; i < range.count; i += kBlockSize * kILP) {
      scalar_t w[kILP];
      scalar_t q[kILP];
      scalar_t c[kILP];
      load_group(w, w_ptr, i, range.count, vector);
      load_group(q, q_ptr, i, range.count, vector);
      if (c_ptr != nullptr) {
        load_group(c, c_ptr, i, range.count, vector);
      }
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const acc_t wk = static_cast<acc_t>(w[k]);
        acc_t pk = static_cast<acc_t>(q[k]);
        if (c_ptr != nullptr) {
          pk *= static_cast<acc_t>(c[k]);
        }
        sums[0] += pk * sign_of(wk);
        sums[1] += pk * wk;
      }
    }
    block_sum(sums);
    if (threadIdx.x == 0) {
      const int64_t b = meta.first_block + blockIdx.x;
      partials[2 * b] = sums[0];
      partials[2 * b + 1] = sums[1];
    }
  }
};

// Tensor first_tensor + j owns partial rows [offsets[j], offsets[j + 1]).
struct FinishBatch {
  int64_t offsets[kFinishTensors + 1];
  int64_t first_tensor;
};

template <typename acc_t>
__global__ void __launch_bounds__(kFinishThreads)
    finish_kernel(const __grid_constant__ FinishBatch batch, const acc_t* partials, acc_t* out) {
  double sums[2] = {0.0, 0.0};
  for (int64_t b = batch.offsets[blockIdx.x] + threadIdx.x; b < batch.offsets[blockIdx.x + 1];
       b += kFinishThreads) {
    sums[0] += static_cast<double>(partials[2 * b]);
    sums[1] += static_cast<double>(partials[2 * b + 1]);
  }
  block_sum(sums);
  if (threadIdx.x == 0) {
    const int64_t l = batch.first_tensor + blockIdx.x;
    out[2 * l] = static_cast<acc_t>(sums[0]);
    out[2 * l + 1] = static_cast<acc_t>(sums[1]);
  }
}

template <typename acc_t>
void finish(const std::vector<int64_t>& offsets, const at::Tensor& partials, at::Tensor& out) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = static_cast<int64_t>(offsets.size()) - 1;
  for (int64_t first = 0; first < n; first += kFinishTensors) {
    const int64_t count = std::min<int64_t>(kFinishTensors, n - first);
    FinishBatch batch{};
    std::copy(offsets.begin() + first, offsets.begin() + first + count + 1, batch.offsets);
    batch.first_tensor = first;
    finish_kernel<acc_t><<<static_cast<unsigned int>(count), kFinishThreads, 0, stream>>>(
        batch, partials.data_ptr<acc_t>(), out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor mixed_partial_dot_cuda(at::TensorList params, at::TensorList vectors,
                                  at::TensorList precond) {
  check_params("mixed_partial_dot", params);
  check_companion("mixed_partial_dot", "vectors", vectors, params, /*optional=*/false);
  check_companion("mixed_partial_dot", "precond", precond, params, /*optional=*/true);
  if (params.empty()) {
    return at::zeros({0, 2}, at::TensorOptions()
                                 .dtype(at::kFloat)
                                 .device(at::kCUDA, c10::cuda::current_device()));
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const at::ScalarType acc_type =
      params[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> offsets = chunk_offsets(params);
  const at::TensorOptions options = params[0].options().dtype(acc_type);
  const at::Tensor partials = at::empty({offsets.back(), 2}, options);
  at::Tensor out = at::empty({static_cast<int64_t>(params.size()), 2}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "mixed_partial_dot_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        multi_tensor_apply<3>({params, vectors, precond},
                              PartialDotOp<scalar_t>{partials.data_ptr<acc_t>()});
        finish<acc_t>(offsets, partials, out);
      });
  return out;
}

}  // namespace
}  // namespace cvsparse::cuda

TORCH_LIBRARY_IMPL(cvsparse, CUDA, m) {
  m.impl("mixed_partial_dot", &cvsparse::cuda::mixed_partial_dot_cuda);
}
