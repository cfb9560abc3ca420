// CUDA kernel of cvsparse::threshold_ (docs/method.md §4): magnitude pruning of a whole list of
// tensors, in place, counting the kept elements of every tensor.
//
// Per element: keep = |w| >= τ (compared in opmath) and mask; w *= keep; v *= keep; mask = keep.
// `w *= keep` multiplies like the reference's `mul_` (so a NaN weight stays NaN).  An empty
// mask list means "no mask": every element passes the mask test and no mask is written.
#include "multi_tensor.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace cvsparse::cuda {
namespace {

template <typename scalar_t>
struct ThresholdOp {
  using opmath_t = at::opmath_type<scalar_t>;
  int64_t* kept;  // (n,), zero-initialized
  double tau;

  // Lists: 0 params, 1 momentum buffers (may be absent), 2 bool masks (may be absent).
  __device__ void operator()(const ChunkMetadata<3>& meta) const {
    const ChunkRange range = block_chunk(meta);
    scalar_t* w_ptr = chunk_pointer<scalar_t>(meta, 0, range);
    scalar_t* v_ptr = chunk_pointer<scalar_t>(meta, 1, range);
    uint8_t* mask_ptr = chunk_pointer<uint8_t>(meta, 2, range);
    const bool vector = group_aligned(w_ptr) && group_aligned(v_ptr) && group_aligned(mask_ptr);
    const opmath_t threshold = static_cast<opmath_t>(tau);

    unsigned long long count = 0;
    for (int64_t i = threadIdx.x * kILP; i < range.count; i += kBlockSize * kILP) {
      scalar_t w[kILP];
      scalar_t v[kILP];
      uint8_t mask[kILP];
      load_group(w, w_ptr, i, range.count, vector);
      if (v_ptr != nullptr) {
        load_group(v, v_ptr, i, range.count, vector);
      }
      if (mask_ptr != nullptr) {
        load_group(mask, mask_ptr, i, range.count, vector);
      }
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const opmath_t wk = static_cast<opmath_t>(w[k]);
        const bool keep = magnitude(wk) >= threshold && (mask_ptr == nullptr || mask[k] != 0);
        const opmath_t factor = keep ? opmath_t(1) : opmath_t(0);
        w[k] = static_cast<scalar_t>(wk * factor);
        if (v_ptr != nullptr) {
          v[k] = static_cast<scalar_t>(static_cast<opmath_t>(v[k]) * factor);
        }
        mask[k] = keep ? 1 : 0;
        count += (keep && i + k < range.count) ? 1 : 0;
      }
      store_group(w_ptr, w, i, range.count, vector);
      if (v_ptr != nullptr) {
        store_group(v_ptr, v, i, range.count, vector);
      }
      if (mask_ptr != nullptr) {
        store_group(mask_ptr, mask, i, range.count, vector);
      }
    }
    add_block_count(count, kept + range.list_index);
  }
};

at::Tensor threshold_cuda(at::TensorList params, at::TensorList momentum_bufs,
                          at::TensorList masks, double tau) {
  check_params("threshold_", params);
  check_companion("threshold_", "momentum_bufs", momentum_bufs, params, /*optional=*/true);
  check_companion("threshold_", "masks", masks, params, /*optional=*/true, at::kBool);
  if (params.empty()) {
    return at::zeros({0}, at::TensorOptions()
                              .dtype(at::kLong)
                              .device(at::kCUDA, c10::cuda::current_device()));
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor kept =
      at::zeros({static_cast<int64_t>(params.size())}, params[0].options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "threshold_cuda", [&] {
        multi_tensor_apply<3>({params, momentum_bufs, masks},
                              ThresholdOp<scalar_t>{kept.data_ptr<int64_t>(), tau});
      });
  return kept;
}

}  // namespace
}  // namespace cvsparse::cuda

TORCH_LIBRARY_IMPL(cvsparse, CUDA, m) { m.impl("threshold_", &cvsparse::cuda::threshold_cuda); }
