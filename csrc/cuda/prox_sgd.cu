// CUDA kernel of cvsparse::prox_sgd_ (docs/method.md §2): one fused proximal SGD step with
// momentum on a whole list of tensors, in place, counting the nonzeros of every updated tensor.
//
// Per element, in opmath (float32 for half / bfloat16, the dtype itself otherwise), with each
// product and sum rounded separately like the eager reference:
//   d = g + λ2·w ; v = μ·v + d (v = d without buffers) ; z = w − lr·v ;
//   w = sign(z)·max(|z| − lr·λ1, 0) ; w, v = 0 where the mask is False.
#include "multi_tensor.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace cvsparse::cuda {
namespace {

template <typename scalar_t>
struct ProxSgdOp {
  using opmath_t = at::opmath_type<scalar_t>;
  const double* lambda1;  // (n,) on the device
  const double* lambda2;  // (n,)
  int64_t* nonzeros;      // (n,), zero-initialized
  double lr;
  double momentum;

  // Lists: 0 params, 1 grads, 2 momentum buffers (may be absent), 3 bool masks (may be absent).
  __device__ void operator()(const ChunkMetadata<4>& meta) const {
    const ChunkRange range = block_chunk(meta);
    scalar_t* w_ptr = chunk_pointer<scalar_t>(meta, 0, range);
    const scalar_t* g_ptr = chunk_pointer<scalar_t>(meta, 1, range);
    scalar_t* v_ptr = chunk_pointer<scalar_t>(meta, 2, range);
    const uint8_t* mask_ptr = chunk_pointer<uint8_t>(meta, 3, range);
    const bool vector = group_aligned(w_ptr) && group_aligned(g_ptr) && group_aligned(v_ptr) &&
                        group_aligned(mask_ptr);
    const opmath_t step = static_cast<opmath_t>(lr);
    const opmath_t mu = static_cast<opmath_t>(momentum);
    const opmath_t l2 = static_cast<opmath_t>(lambda2[range.list_index]);
    const opmath_t shrink = mul_rn(step, static_cast<opmath_t>(lambda1[range.list_index]));

    unsigned long long count = 0;
    for (int64_t i = threadIdx.x * kILP; i < range.count; i += kBlockSize * kILP) {
      scalar_t w[kILP];
      scalar_t g[kILP];
      scalar_t v[kILP];
      uint8_t keep[kILP];
      load_group(w, w_ptr, i, range.count, vector);
      load_group(g, g_ptr, i, range.count, vector);
      if (v_ptr != nullptr) {
        load_group(v, v_ptr, i, range.count, vector);
      }
      if (mask_ptr != nullptr) {
        load_group(keep, mask_ptr, i, range.count, vector);
      }
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const opmath_t wk = static_cast<opmath_t>(w[k]);
        const opmath_t d = add_rn(static_cast<opmath_t>(g[k]), mul_rn(l2, wk));
        opmath_t vk = v_ptr != nullptr ? add_rn(mul_rn(mu, static_cast<opmath_t>(v[k])), d) : d;
        const opmath_t z = add_rn(wk, -mul_rn(step, vk));
        const opmath_t excess = add_rn(magnitude(z), -shrink);
        // max(excess, 0) keeping NaN, like torch.clamp(min=0).
        opmath_t updated = mul_rn(sign_of(z), excess < opmath_t(0) ? opmath_t(0) : excess);
        if (mask_ptr != nullptr && keep[k] == 0) {
          updated = opmath_t(0);
          vk = opmath_t(0);
        }
        w[k] = static_cast<scalar_t>(updated);
        v[k] = static_cast<scalar_t>(vk);
        // Count what is stored: rounding to scalar_t may turn a tiny value into zero.
        count += (i + k < range.count && static_cast<opmath_t>(w[k]) != opmath_t(0)) ? 1 : 0;
      }
      store_group(w_ptr, w, i, range.count, vector);
      if (v_ptr != nullptr) {
        store_group(v_ptr, v, i, range.count, vector);
      }
    }
    add_block_count(count, nonzeros + range.list_index);
  }
};

void check_lambda(const char* name, const at::Tensor& lambda, at::TensorList params) {
  TORCH_CHECK(lambda.scalar_type() == at::kDouble, "prox_sgd_: ", name,
              " must be a float64 tensor, got ", lambda.scalar_type());
  TORCH_CHECK(lambda.dim() == 1 && lambda.numel() == static_cast<int64_t>(params.size()),
              "prox_sgd_: ", name, " must have shape (", params.size(), "), got ",
              lambda.sizes());
  TORCH_CHECK(lambda.is_contiguous(), "prox_sgd_: ", name, " must be contiguous");
  TORCH_CHECK(params.empty() || lambda.device() == params[0].device(), "prox_sgd_: ", name,
              " is on ", lambda.device(), " but params are on ", params[0].device());
}

at::Tensor prox_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_bufs,
                         at::TensorList masks, const at::Tensor& lambda1,
                         const at::Tensor& lambda2, double lr, double momentum) {
  check_params("prox_sgd_", params);
  check_companion("prox_sgd_", "grads", grads, params, /*optional=*/false);
  check_companion("prox_sgd_", "momentum_bufs", momentum_bufs, params, /*optional=*/true);
  check_companion("prox_sgd_", "masks", masks, params, /*optional=*/true, at::kBool);
  check_lambda("lambda1", lambda1, params);
  check_lambda("lambda2", lambda2, params);
  if (params.empty()) {
    return at::zeros({0}, lambda1.options().dtype(at::kLong));
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor nonzeros =
      at::zeros({static_cast<int64_t>(params.size())}, params[0].options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "prox_sgd_cuda", [&] {
        const ProxSgdOp<scalar_t> op{lambda1.data_ptr<double>(), lambda2.data_ptr<double>(),
                                     nonzeros.data_ptr<int64_t>(), lr, momentum};
        multi_tensor_apply<4>({params, grads, momentum_bufs, masks}, op);
      });
  return nonzeros;
}

}  // namespace
}  // namespace cvsparse::cuda

TORCH_LIBRARY_IMPL(cvsparse, CUDA, m) { m.impl("prox_sgd_", &cvsparse::cuda::prox_sgd_cuda); }
