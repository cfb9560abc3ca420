// CPU kernels of AutoPrune's gated weight (docs/method.md §6):
//   gated_weight:           out = w · h(m),  h(m) = 1[m > 0]
//   gated_weight_backward:  grad_w = g · h(m)
//                           grad_m = [Σ over non-output dims of] g · (sgn(w) | w) · s'(m)
// with s' the straight-through estimator: linear 1, leaky_relu (1 if m > 0 else slope),
// softplus sigmoid(m).  `aux` (m) is shaped like `weight` (one gate per weight) or is
// (weight.size(0),) (one gate per output unit, broadcast over the other dims; its gradient is
// reduced per row, rows in parallel).
//
// The kernels are built for AVX2 on the Lanes machinery of common.h (registered only where the
// CPU has it; the reference runs elsewhere).  Arithmetic is done in opmath (float32 for
// float16 / bfloat16, else the tensor dtype); results are stored in the input dtypes.  The gate
// is applied by multiplying with 0/1, so inf/NaN weights and the signs of zeros come out exactly
// as in the reference `weight * gate`.  Arguments are validated in Python; the TORCH_CHECKs
// below only guard the invariants the loops rely on.
#include <torch/library.h>

#include <tuple>

#include "common.h"

namespace cvsparse::cpu {
namespace {

constexpr int64_t kLinear = 0;
constexpr int64_t kLeakyRelu = 1;
constexpr int64_t kSoftplus = 2;
// Elements per parallel task (ATen's GRAIN_SIZE).
constexpr int64_t kGrain = 32768;
// Row sums are flushed from vector lanes into a double accumulator every this many elements.
constexpr int64_t kFlushEvery = 1024;

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

}  // namespace
}  // namespace cvsparse::cpu

CVSPARSE_SIMD_BEGIN
namespace cvsparse::cpu {
namespace {

// The per-element formulas on opmath vectors.
template <typename opmath_t>
struct GateMath {
  using OVec = Vectorized<opmath_t>;
  opmath_t slope;

  // h(m) = 1[m > 0] as 0/1 values (0 for NaN).
  static OVec gate(const OVec& m) { return m.gt(OVec(opmath_t(0))); }

  // s'(m), the straight-through surrogate of h'(m).
  template <int64_t kSte>
  OVec ste_grad(const OVec& m) const {
    const OVec one(opmath_t(1));
    if constexpr (kSte == kLeakyRelu) {
      return OVec::blendv(OVec(slope), one, m > OVec(opmath_t(0)));
    } else if constexpr (kSte == kSoftplus) {
      return one / (one + m.neg().exp());
    } else {
      return one;
    }
  }

  // sgn(w) for the proposed rule (0 for NaN, like torch.sign on CPU), w for the BNN rule.
  template <bool kSignRule>
  static OVec coef(const OVec& w) {
    if constexpr (kSignRule) {
      const OVec zero(opmath_t(0));
      return w.gt(zero) - w.lt(zero);
    } else {
      return w;
    }
  }
};

template <typename scalar_t>
void forward_kernel(const at::Tensor& weight, const at::Tensor& aux, const Layout& layout,
                    const at::Tensor& out) {
  using L = Lanes<scalar_t>;
  using Math = GateMath<typename L::opmath_t>;
  using OVec = typename L::OVec;
  constexpr int kParts = L::kParts;
  constexpr int64_t kStep = L::kStep;
  const scalar_t* __restrict w = weight.const_data_ptr<scalar_t>();
  const scalar_t* __restrict m = aux.const_data_ptr<scalar_t>();
  scalar_t* __restrict o = out.mutable_data_ptr<scalar_t>();

  if (layout.per_weight) {
    at::parallel_for(0, weight.numel(), kGrain, [&](int64_t begin, int64_t end) {
      const auto ahead = [&](int64_t j) {
        prefetch(w + j);
        prefetch(m + j);
      };
      for_each_step<scalar_t, kStep>(begin, end, ahead, [&](int64_t i, int64_t n) {
        OVec wv[kParts], mv[kParts];
        L::load(w + i, wv, n);
        L::load(m + i, mv, n);
        for (int p = 0; p < kParts; ++p) {
          wv[p] = wv[p] * Math::gate(mv[p]);
        }
        L::store(o + i, wv, n);
      });
    });
    return;
  }
  const int64_t cols = layout.cols;
  at::parallel_for(0, layout.rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      // the row's gate, broadcast
      const OVec h = Math::gate(OVec(static_cast<typename L::opmath_t>(m[r])));
      const scalar_t* __restrict wr = w + r * cols;
      scalar_t* __restrict orow = o + r * cols;
      for_each_step<scalar_t, kStep>(0, cols, [&](int64_t j) { prefetch(wr + j); },
                                     [&](int64_t i, int64_t n) {
                                       OVec wv[kParts];
                                       L::load(wr + i, wv, n);
                                       for (int p = 0; p < kParts; ++p) {
                                         wv[p] = wv[p] * h;
                                       }
                                       L::store(orow + i, wv, n);
                                     });
    }
  });
}

template <typename scalar_t, int64_t kSte, bool kSignRule>
void backward_kernel(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& aux,
                     const Layout& layout, double slope, const at::Tensor& grad_weight,
                     const at::Tensor& grad_aux) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using Math = GateMath<opmath_t>;
  using OVec = typename L::OVec;
  constexpr int kParts = L::kParts;
  constexpr int64_t kStep = L::kStep;
  const Math math{static_cast<opmath_t>(slope)};
  const scalar_t* __restrict g = grad.const_data_ptr<scalar_t>();
  const scalar_t* __restrict w = weight.const_data_ptr<scalar_t>();
  const scalar_t* __restrict m = aux.const_data_ptr<scalar_t>();
  scalar_t* __restrict gw = grad_weight.mutable_data_ptr<scalar_t>();
  scalar_t* __restrict gm = grad_aux.mutable_data_ptr<scalar_t>();

  if (layout.per_weight) {
    at::parallel_for(0, weight.numel(), kGrain, [&](int64_t begin, int64_t end) {
      const auto ahead = [&](int64_t j) {
        prefetch(g + j);
        prefetch(w + j);
        prefetch(m + j);
      };
      for_each_step<scalar_t, kStep>(begin, end, ahead, [&](int64_t i, int64_t n) {
        OVec gv[kParts], wv[kParts], mv[kParts], gwv[kParts], gmv[kParts];
        L::load(g + i, gv, n);
        L::load(w + i, wv, n);
        L::load(m + i, mv, n);
        for (int p = 0; p < kParts; ++p) {
          gwv[p] = gv[p] * Math::gate(mv[p]);
          gmv[p] = gv[p] * Math::template coef<kSignRule>(wv[p]) *
                   math.template ste_grad<kSte>(mv[p]);
        }
        L::store(gw + i, gwv, n);
        L::store(gm + i, gmv, n);
      });
    });
    return;
  }
  const int64_t cols = layout.cols;
  at::parallel_for(0, layout.rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const OVec mv(static_cast<opmath_t>(m[r]));  // the row's gate parameter, broadcast
      const OVec h = Math::gate(mv);
      const scalar_t* __restrict gr = g + r * cols;
      const scalar_t* __restrict wr = w + r * cols;
      scalar_t* __restrict gwr = gw + r * cols;
      double row_sum = 0;
      for (int64_t block = 0; block < cols; block += kFlushEvery) {
        const int64_t block_end = std::min(cols, block + kFlushEvery);
        OVec partial(opmath_t(0));
        const auto ahead = [&](int64_t j) {
          prefetch(gr + j);
          prefetch(wr + j);
        };
        for_each_step<scalar_t, kStep>(block, block_end, ahead, [&](int64_t i, int64_t n) {
          OVec gv[kParts], wv[kParts];
          L::load(gr + i, gv, n);  // lanes past n are 0 and add 0 to the sum
          L::load(wr + i, wv, n);
          for (int p = 0; p < kParts; ++p) {
            partial = partial + gv[p] * Math::template coef<kSignRule>(wv[p]);
            gv[p] = gv[p] * h;
          }
          L::store(gwr + i, gv, n);
        });
        row_sum += lane_sum(partial);
      }
      OVec out[kParts] = {};
      out[0] = OVec(static_cast<opmath_t>(row_sum)) * math.template ste_grad<kSte>(mv);
      L::store(gm + r, out, 1);
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
        auto run = [&](auto ste_tag, auto sign_tag) {
          backward_kernel<scalar_t, decltype(ste_tag)::value, decltype(sign_tag)::value>(
              grad, weight, aux, layout, slope, grad_weight, grad_aux);
        };
        auto with_ste = [&](auto sign_tag) {
          if (ste == kLeakyRelu) {
            run(std::integral_constant<int64_t, kLeakyRelu>{}, sign_tag);
          } else if (ste == kSoftplus) {
            run(std::integral_constant<int64_t, kSoftplus>{}, sign_tag);
          } else {
            run(std::integral_constant<int64_t, kLinear>{}, sign_tag);
          }
        };
        if (sign_rule) {
          with_ste(std::true_type{});
        } else {
          with_ste(std::false_type{});
        }
      });
  return {grad_weight, grad_aux};
}

}  // namespace
}  // namespace cvsparse::cpu
CVSPARSE_SIMD_END

TORCH_LIBRARY_IMPL(cvsparse, CPU, m) {
  if (cvsparse::cpu::simd_supported()) {
    m.impl("gated_weight", &cvsparse::cpu::gated_weight_cpu);
    m.impl("gated_weight_backward", &cvsparse::cpu::gated_weight_backward_cpu);
  }
}
