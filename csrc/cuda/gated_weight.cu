// CUDA kernels of cvsparse::gated_weight and cvsparse::gated_weight_backward (docs/method.md §6).
//
// Forward: ŵ = w · 1[m > 0].  `aux` (m) is shaped like the weight ("weight" granularity) or is
// (weight.shape[0],) ("neuron" granularity: one gate per output row, broadcast over the row).
// Backward: ∂w = g · 1[m > 0];  ∂m = [Σ over the row of] g · (sign(w) or w) · s'(m), where s' is
// the straight-through estimator (0 linear: 1, 1 leaky_relu: 1 if m > 0 else slope,
// 2 softplus: sigmoid(m)).  Arithmetic in opmath; outputs in the input dtype.
//
// Both granularities view the weight as rows × inner (one row for "weight" granularity).
// Elementwise work uses a 2-D grid (x over a row's elements, y over rows).  The neuron
// backward runs one block per row, which reduces its row deterministically (thread-ordered sums,
// then a fixed warp-shuffle tree) while writing ∂w.
#include "multi_tensor.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace cvsparse::cuda {
namespace {

constexpr int kGateThreads = 256;
constexpr int64_t kMaxGridX = 4096;   // blocks along a row (grid-stride beyond)
constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y (grid-stride beyond)
constexpr int64_t kMaxRowBlocks = 65535;

enum Ste : int64_t { kLinear = 0, kLeakyRelu = 1, kSoftplus = 2 };

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

// s'(m) of the straight-through estimator `ste`.
template <typename T>
__device__ __forceinline__ T ste_derivative(int64_t ste, T m, T slope) {
  if (ste == kLeakyRelu) {
    return m > T(0) ? T(1) : slope;
  }
  if (ste == kSoftplus) {
    return sigmoid(m);
  }
  return T(1);
}

template <typename T>
__device__ __forceinline__ T gate_of(T m) {
  return m > T(0) ? T(1) : T(0);
}

// Rows × inner elements; aux holds one value per row (kPerRow) or per element.
template <typename scalar_t, bool kPerRow>
__global__ void __launch_bounds__(kGateThreads)
    gated_forward_kernel(const scalar_t* weight, const scalar_t* aux, scalar_t* out, int64_t rows,
                         int64_t inner, bool vector) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t start = (static_cast<int64_t>(blockIdx.x) * kGateThreads + threadIdx.x) * kILP;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGateThreads * kILP;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const scalar_t* w_row = weight + r * inner;
    scalar_t* out_row = out + r * inner;
    const opmath_t row_gate = kPerRow ? gate_of(static_cast<opmath_t>(aux[r])) : opmath_t(0);
    for (int64_t i = start; i < inner; i += stride) {
      scalar_t w[kILP];
      scalar_t m[kILP];
      load_group(w, w_row, i, inner, vector);
      if (!kPerRow) {
        load_group(m, aux + r * inner, i, inner, vector);
      }
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const opmath_t gate = kPerRow ? row_gate : gate_of(static_cast<opmath_t>(m[k]));
        w[k] = static_cast<scalar_t>(static_cast<opmath_t>(w[k]) * gate);
      }
      store_group(out_row, w, i, inner, vector);
    }
  }
}

// "weight" granularity: every element has its own gate and its own ∂m.
template <typename scalar_t>
__global__ void __launch_bounds__(kGateThreads)
    gated_backward_elementwise_kernel(const scalar_t* grad, const scalar_t* weight,
                                      const scalar_t* aux, scalar_t* grad_weight,
                                      scalar_t* grad_aux, int64_t n, int64_t ste, double slope,
                                      bool sign_rule, bool vector) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t leak = static_cast<opmath_t>(slope);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGateThreads * kILP;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kGateThreads + threadIdx.x) * kILP; i < n;
       i += stride) {
    scalar_t g[kILP];
    scalar_t w[kILP];
    scalar_t m[kILP];
    load_group(g, grad, i, n, vector);
    load_group(w, weight, i, n, vector);
    load_group(m, aux, i, n, vector);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const opmath_t gk = static_cast<opmath_t>(g[k]);
      const opmath_t wk = static_cast<opmath_t>(w[k]);
      const opmath_t mk = static_cast<opmath_t>(m[k]);
      const opmath_t coef = sign_rule ? sign_of(wk) : wk;
      g[k] = static_cast<scalar_t>(gk * gate_of(mk));
      m[k] = static_cast<scalar_t>((gk * coef) * ste_derivative(ste, mk, leak));
    }
    store_group(grad_weight, g, i, n, vector);
    store_group(grad_aux, m, i, n, vector);
  }
}

// "neuron" granularity: one block per row writes the row of ∂w and reduces the row's ∂m.
template <typename scalar_t>
__global__ void __launch_bounds__(kGateThreads)
    gated_backward_rows_kernel(const scalar_t* grad, const scalar_t* weight, const scalar_t* aux,
                               scalar_t* grad_weight, scalar_t* grad_aux, int64_t rows,
                               int64_t inner, int64_t ste, double slope, bool sign_rule,
                               bool vector) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t leak = static_cast<opmath_t>(slope);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const opmath_t m = static_cast<opmath_t>(aux[r]);
    const opmath_t gate = gate_of(m);
    const scalar_t* g_row = grad + r * inner;
    const scalar_t* w_row = weight + r * inner;
    scalar_t* gw_row = grad_weight + r * inner;
    opmath_t sum[1] = {opmath_t(0)};  // elements past the row load as zeros and add zeros
    for (int64_t i = threadIdx.x * kILP; i < inner; i += kGateThreads * kILP) {
      scalar_t g[kILP];
      scalar_t w[kILP];
      load_group(g, g_row, i, inner, vector);
      load_group(w, w_row, i, inner, vector);
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const opmath_t gk = static_cast<opmath_t>(g[k]);
        const opmath_t wk = static_cast<opmath_t>(w[k]);
        sum[0] += gk * (sign_rule ? sign_of(wk) : wk);
        g[k] = static_cast<scalar_t>(gk * gate);
      }
      store_group(gw_row, g, i, inner, vector);
    }
    block_sum(sum);
    if (threadIdx.x == 0) {
      grad_aux[r] = static_cast<scalar_t>(sum[0] * ste_derivative(ste, m, leak));
    }
  }
}

template <typename T>
bool aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Group<T>) == 0;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// True for one gate per output row; checks the shapes either way.
bool per_row(const char* op, const at::Tensor& weight, const at::Tensor& aux) {
  if (aux.sizes() == weight.sizes()) {
    return false;
  }
  TORCH_CHECK(aux.dim() == 1 && weight.dim() >= 1 && aux.size(0) == weight.size(0), op,
              ": aux must have the weight's shape ", weight.sizes(), " or (weight.shape[0],), got ",
              aux.sizes());
  return true;
}

void check_tensor(const char* op, const char* name, const at::Tensor& t,
                  const at::Tensor& weight) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == weight.device(), op, ": ", name, " is on ", t.device(),
              " but weight is on ", weight.device());
  TORCH_CHECK(t.scalar_type() == weight.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but weight has ", weight.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

at::Tensor gated_weight_cuda(const at::Tensor& weight, const at::Tensor& aux, int64_t /*ste*/,
                             double /*slope*/, bool /*sign_rule*/) {
  check_tensor("gated_weight", "weight", weight, weight);
  check_tensor("gated_weight", "aux", aux, weight);
  const bool neuron = per_row("gated_weight", weight, aux);
  at::Tensor out = at::empty(weight.sizes(), weight.options());
  if (weight.numel() == 0) {
    return out;
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = neuron ? weight.size(0) : 1;
  const int64_t inner = weight.numel() / rows;
  const dim3 grid(static_cast<unsigned int>(
                      std::min(ceil_div(inner, int64_t{kGateThreads} * kILP), kMaxGridX)),
                  static_cast<unsigned int>(std::min(rows, kMaxGridY)));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "gated_weight_cuda", [&] {
        const scalar_t* w = weight.data_ptr<scalar_t>();
        const scalar_t* m = aux.data_ptr<scalar_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        // Every row starts aligned when the first does and inner is a whole number of groups.
        const bool vector = aligned(w) && aligned(o) && (rows == 1 || inner % kILP == 0) &&
                            (neuron || aligned(m));
        if (neuron) {
          gated_forward_kernel<scalar_t, true>
              <<<grid, kGateThreads, 0, stream>>>(w, m, o, rows, inner, vector);
        } else {
          gated_forward_kernel<scalar_t, false>
              <<<grid, kGateThreads, 0, stream>>>(w, m, o, rows, inner, vector);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_weight_backward_cuda(const at::Tensor& grad,
                                                              const at::Tensor& weight,
                                                              const at::Tensor& aux, int64_t ste,
                                                              double slope, bool sign_rule) {
  constexpr const char* kOp = "gated_weight_backward";
  check_tensor(kOp, "weight", weight, weight);
  check_tensor(kOp, "grad", grad, weight);
  check_tensor(kOp, "aux", aux, weight);
  TORCH_CHECK(grad.sizes() == weight.sizes(), kOp, ": grad has shape ", grad.sizes(),
              " but weight has ", weight.sizes());
  TORCH_CHECK(ste == kLinear || ste == kLeakyRelu || ste == kSoftplus, kOp,
              ": unknown straight-through estimator code ", ste, " (0 linear, 1 leaky_relu, ",
              "2 softplus)");
  const bool neuron = per_row(kOp, weight, aux);
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_aux = at::empty(aux.sizes(), aux.options());
  if (aux.numel() == 0) {  // no gate at all, hence no element either
    return {grad_weight, grad_aux};
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "gated_weight_backward_cuda", [&] {
        const scalar_t* g = grad.data_ptr<scalar_t>();
        const scalar_t* w = weight.data_ptr<scalar_t>();
        const scalar_t* m = aux.data_ptr<scalar_t>();
        scalar_t* gw = grad_weight.data_ptr<scalar_t>();
        scalar_t* gm = grad_aux.data_ptr<scalar_t>();
        if (neuron) {
          // Rows with no element (inner == 0) still get ∂m = 0.
          const int64_t rows = weight.size(0);
          const int64_t inner = weight.numel() / rows;
          const bool vector = aligned(g) && aligned(w) && aligned(gw) && inner % kILP == 0;
          const auto blocks = static_cast<unsigned int>(std::min(rows, kMaxRowBlocks));
          gated_backward_rows_kernel<scalar_t><<<blocks, kGateThreads, 0, stream>>>(
              g, w, m, gw, gm, rows, inner, ste, slope, sign_rule, vector);
        } else {
          const int64_t n = weight.numel();
          const bool vector = aligned(g) && aligned(w) && aligned(m) && aligned(gw) && aligned(gm);
          const auto blocks = static_cast<unsigned int>(
              std::min(ceil_div(n, int64_t{kGateThreads} * kILP), kMaxGridX));
          gated_backward_elementwise_kernel<scalar_t><<<blocks, kGateThreads, 0, stream>>>(
              g, w, m, gw, gm, n, ste, slope, sign_rule, vector);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_weight, grad_aux};
}

}  // namespace
}  // namespace cvsparse::cuda

TORCH_LIBRARY_IMPL(cvsparse, CUDA, m) {
  m.impl("gated_weight", &cvsparse::cuda::gated_weight_cuda);
  m.impl("gated_weight_backward", &cvsparse::cuda::gated_weight_backward_cuda);
}
