// CPU kernels of AutoPrune's gated weight (docs/method.md §6):
//   gated_weight:           out = w · h(m),  h(m) = 1[m > 0]
//   gated_weight_backward:  grad_w = g · h(m)
//                           grad_m = [Σ over non-output dims of] g · (sgn(w) | w) · s'(m)
// with s' the straight-through estimator: linear 1, leaky_relu (1 if m > 0 else slope),
// softplus sigmoid(m).  `aux` (m) is shaped like `weight` (one gate per weight) or is
// (weight.size(0),) (one gate per output unit, broadcast over the other dims; its gradient is
// reduced per row, rows in parallel).
//
// Arithmetic is done in opmath (float32 for half/bfloat16, else the tensor dtype) on at::vec
// vectors; results are stored in the input dtypes.  The gate is applied by multiplying with
// 0/1, so inf/NaN weights behave exactly like the reference `weight * gate`.  Arguments are
// validated in Python; the TORCH_CHECKs below only guard the invariants the loops rely on.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

namespace cvsparse {
namespace {

using at::vec::Vectorized;

constexpr int64_t kLinear = 0;
constexpr int64_t kLeakyRelu = 1;
constexpr int64_t kSoftplus = 2;
// Elements per parallel task (ATen's GRAIN_SIZE).
constexpr int64_t kGrain = 32768;
// Row sums are flushed from vector lanes into a double accumulator every this many elements.
constexpr int64_t kFlushEvery = 1024;

// Loads / stores up to one opmath vector of `scalar_t` elements (lanes past `n` read as 0).
template <typename scalar_t>
struct OpmathIo {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  static constexpr int64_t kWidth = Vec::size();

  static Vec load(const scalar_t* p, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      return n == kWidth ? Vec::loadu(p) : Vec::loadu(p, n);
    } else {
      if (n == kWidth) {
        Vec out;
        at::vec::load_to_float(p, out);
        return out;
      }
      opmath_t buf[kWidth] = {};
      for (int64_t i = 0; i < n; ++i) {
        buf[i] = static_cast<opmath_t>(p[i]);
      }
      return Vec::loadu(buf);
    }
  }

  static void store(scalar_t* p, const Vec& v, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      v.store(p, n);
    } else {
      opmath_t buf[kWidth];
      v.store(buf);
      for (int64_t i = 0; i < n; ++i) {
        p[i] = static_cast<scalar_t>(buf[i]);
      }
    }
  }

  static double sum_lanes(const Vec& v) {
    opmath_t buf[kWidth];
    v.store(buf);
    double total = 0;
    for (int64_t i = 0; i < kWidth; ++i) {
      total += static_cast<double>(buf[i]);
    }
    return total;
  }
};

// The per-element formulas, on opmath vectors.
template <typename opmath_t>
struct GateMath {
  using Vec = Vectorized<opmath_t>;
  int64_t ste;
  bool sign_rule;
  Vec slope;
  Vec zero = Vec(opmath_t(0));
  Vec one = Vec(opmath_t(1));

  GateMath(int64_t ste_code, double slope_value, bool sign_rule_flag)
      : ste(ste_code), sign_rule(sign_rule_flag), slope(static_cast<opmath_t>(slope_value)) {}

  // h(m) = 1[m > 0] as 0/1 values.
  Vec gate(const Vec& m) const {
    return m.gt(zero);
  }

  // s'(m), the straight-through surrogate of h'(m).
  Vec ste_grad(const Vec& m) const {
    if (ste == kLeakyRelu) {
      return Vec::blendv(slope, one, m > zero);
    }
    if (ste == kSoftplus) {
      return one / (one + m.neg().exp());
    }
    return one;
  }

  // sgn(w) for the proposed rule (0 for NaN, like torch.sign on CPU), w for the BNN rule.
  Vec coef(const Vec& w) const {
    return sign_rule ? w.gt(zero) - w.lt(zero) : w;
  }
};

// How `aux` maps onto `weight`: one gate per element, or one per row of a (rows, cols) view.
struct Layout {
  bool per_weight;
  int64_t rows;
  int64_t cols;
};

Layout check_and_layout(const at::Tensor& weight, const at::Tensor& aux, int64_t ste) {
  TORCH_CHECK(weight.device().is_cpu() && aux.device().is_cpu(),
              "cvsparse::gated_weight (CPU): weight and aux must be CPU tensors");
  TORCH_CHECK(aux.scalar_type() == weight.scalar_type(), "cvsparse::gated_weight: aux dtype ",
              aux.scalar_type(), " differs from weight dtype ", weight.scalar_type());
  TORCH_CHECK(weight.is_contiguous() && aux.is_contiguous(),
              "cvsparse::gated_weight: weight and aux must be contiguous");
  TORCH_CHECK(ste == kLinear || ste == kLeakyRelu || ste == kSoftplus,
              "cvsparse::gated_weight: unknown straight-through estimator code ", ste);
  if (aux.sizes() == weight.sizes()) {
    return {true, 0, 0};
  }
  TORCH_CHECK(weight.dim() >= 1 && aux.dim() == 1 && aux.size(0) == weight.size(0),
              "cvsparse::gated_weight: aux must have weight's shape ", weight.sizes(),
              " or (weight.size(0),), got ", aux.sizes());
  const int64_t rows = weight.size(0);
  return {false, rows, rows == 0 ? 0 : weight.numel() / rows};
}

// Rows per parallel task so that each task touches about kGrain elements.
int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& weight, const at::Tensor& aux, const Layout& layout,
                    const at::Tensor& out) {
  using Io = OpmathIo<scalar_t>;
  using opmath_t = typename Io::opmath_t;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  const GateMath<opmath_t> math(kLinear, 0.0, true);
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  const scalar_t* m = aux.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();

  if (layout.per_weight) {
    at::parallel_for(0, weight.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; i += W) {
        const int64_t n = std::min(W, end - i);
        Io::store(o + i, Io::load(w + i, n) * math.gate(Io::load(m + i, n)), n);
      }
    });
    return;
  }
  const int64_t cols = layout.cols;
  at::parallel_for(0, layout.rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const Vec h = math.gate(Vec(static_cast<opmath_t>(m[r])));  // broadcast row gate
      const int64_t base = r * cols;
      for (int64_t j = 0; j < cols; j += W) {
        const int64_t n = std::min(W, cols - j);
        Io::store(o + base + j, Io::load(w + base + j, n) * h, n);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& aux,
                     const Layout& layout, const GateMath<at::opmath_type<scalar_t>>& math,
                     const at::Tensor& grad_weight, const at::Tensor& grad_aux) {
  using Io = OpmathIo<scalar_t>;
  using opmath_t = typename Io::opmath_t;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  const scalar_t* m = aux.const_data_ptr<scalar_t>();
  scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
  scalar_t* gm = grad_aux.mutable_data_ptr<scalar_t>();

  if (layout.per_weight) {
    at::parallel_for(0, weight.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; i += W) {
        const int64_t n = std::min(W, end - i);
        const Vec gv = Io::load(g + i, n);
        const Vec mv = Io::load(m + i, n);
        Io::store(gw + i, gv * math.gate(mv), n);
        Io::store(gm + i, gv * math.coef(Io::load(w + i, n)) * math.ste_grad(mv), n);
      }
    });
    return;
  }
  const int64_t cols = layout.cols;
  at::parallel_for(0, layout.rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const Vec mv = Vec(static_cast<opmath_t>(m[r]));  // broadcast row gate parameter
      const Vec h = math.gate(mv);
      const int64_t base = r * cols;
      double row_sum = 0;
      for (int64_t block = 0; block < cols; block += kFlushEvery) {
        const int64_t block_end = std::min(cols, block + kFlushEvery);
        Vec partial = Vec(opmath_t(0));
        for (int64_t j = block; j < block_end; j += W) {
          const int64_t n = std::min(W, block_end - j);
          const Vec gv = Io::load(g + base + j, n);
          Io::store(gw + base + j, gv * h, n);
          partial = partial + gv * math.coef(Io::load(w + base + j, n));  // padded lanes: +0
        }
        row_sum += Io::sum_lanes(partial);
      }
      Io::store(gm + r, Vec(static_cast<opmath_t>(row_sum)) * math.ste_grad(mv), 1);
    }
  });
}

// `slope` and `sign_rule` only shape the backward.
at::Tensor gated_weight_cpu(const at::Tensor& weight, const at::Tensor& aux, int64_t ste,
                            double /*slope*/, bool /*sign_rule*/) {
  const Layout layout = check_and_layout(weight, aux, ste);
  at::Tensor out = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "cvsparse::gated_weight", [&] {
                                    forward_kernel<scalar_t>(weight, aux, layout, out);
                                  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_weight_backward_cpu(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& aux, int64_t ste,
    double slope, bool sign_rule) {
  const Layout layout = check_and_layout(weight, aux, ste);
  TORCH_CHECK(grad.sizes() == weight.sizes() && grad.scalar_type() == weight.scalar_type() &&
                  grad.is_contiguous() && grad.device().is_cpu(),
              "cvsparse::gated_weight_backward: grad must be a contiguous CPU tensor with "
              "weight's shape and dtype");
  at::Tensor grad_weight = at::empty_like(weight);
  at::Tensor grad_aux = at::empty_like(aux);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "cvsparse::gated_weight_backward", [&] {
        const GateMath<at::opmath_type<scalar_t>> math(ste, slope, sign_rule);
        backward_kernel<scalar_t>(grad, weight, aux, layout, math, grad_weight, grad_aux);
      });
  return {grad_weight, grad_aux};
}

}  // namespace
}  // namespace cvsparse

TORCH_LIBRARY_IMPL(cvsparse, CPU, m) {
  m.impl("gated_weight", &cvsparse::gated_weight_cpu);
  m.impl("gated_weight_backward", &cvsparse::gated_weight_backward_cpu);
}
