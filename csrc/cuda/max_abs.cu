// CUDA kernel of cvsparse::max_abs: the largest |x| of every tensor of a list (NaN for a tensor
// holding a NaN, 0 for an empty one), float64 for float64 inputs, float32 otherwise.
//
// PyTorch's own multi-tensor infinity norm (_foreach_norm, ord = inf) already reads the whole
// list in one multi_tensor_apply launch plus one per-tensor finishing launch, propagating NaN;
// this kernel is that reduction with cvsparse's result dtype.  (The CPU kernel exists because
// _foreach_norm on CPU is one parallel region, one allocation and one abs copy per tensor.)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

namespace cvsparse::cuda {
namespace {

at::Tensor max_abs_cuda(at::TensorList tensors) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  TORCH_CHECK(n > 0, "cvsparse::max_abs on CUDA needs at least one tensor");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto dtype = tensors[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(tensors[i].is_cuda() && tensors[i].device() == tensors[0].device(), "tensors[",
                i, "] must be on ", tensors[0].device());
    TORCH_CHECK(tensors[i].scalar_type() == tensors[0].scalar_type(), "tensors[", i,
                "] has dtype ", tensors[i].scalar_type(), " but tensors[0] has ",
                tensors[0].scalar_type());
  }
  const auto norms = at::_foreach_norm(tensors, std::numeric_limits<double>::infinity());
  return at::stack(norms).to(dtype);
}

}  // namespace
}  // namespace cvsparse::cuda

TORCH_LIBRARY_IMPL(cvsparse, CUDA, m) {
  m.impl("max_abs", &cvsparse::cuda::max_abs_cuda);
}
