// prox_sgd_ on CPU: fused proximal SGD step with momentum over a whole list of tensors
// (docs/method.md §2).  One pass per element: read w, g, v (if bufs), mask (if masks); write w, v;
// count the nonzeros of the stored w on the way.
#include <torch/library.h>

#include "common.h"

CVSPARSE_SIMD_BEGIN
namespace cvsparse::cpu {
namespace {

// Updates elements [0, len) of one segment; returns the nonzeros of w as stored.
template <typename scalar_t, bool kBufs, bool kMasks>
int64_t prox_segment(scalar_t* __restrict w, const scalar_t* __restrict g,
                     scalar_t* __restrict v, const uint8_t* __restrict mask, int64_t len,
                     double lambda1, double lambda2, double lr, double momentum) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using OVec = typename L::OVec;
  constexpr int kParts = L::kParts;
  constexpr int64_t kStep = L::kStep;
  // Same rounding as the reference: every coefficient in the math type, lr·λ1 formed there.
  const OVec l2(static_cast<opmath_t>(lambda2));
  const OVec mu(static_cast<opmath_t>(momentum));
  const OVec eta(static_cast<opmath_t>(lr));
  const OVec shrink(static_cast<opmath_t>(lr) * static_cast<opmath_t>(lambda1));
  const OVec zero(opmath_t(0));
  const OVec sign_bit(opmath_t(-0.0));
  // Per-lane counts stay exact in opmath_t if flushed every kBlock elements.
  constexpr int64_t kBlock = 1 << 12;
  int64_t count = 0;
  for (int64_t block = 0; block < len; block += kBlock) {
    const int64_t stop = std::min(len, block + kBlock);
    OVec nz(opmath_t(0));
    const auto ahead = [&](int64_t j) {
      prefetch_for_write(w + j);
      prefetch(g + j);
      if constexpr (kBufs) {
        prefetch_for_write(v + j);
      }
      if constexpr (kMasks) {
        prefetch(mask + j);
      }
    };
    for_each_step<scalar_t, kStep>(block, stop, ahead, [&](int64_t i, int64_t n) {
      OVec wv[kParts], gv[kParts], vv[kParts], keep[kParts];
      L::load(w + i, wv, n);
      L::load(g + i, gv, n);
      if constexpr (kBufs) {
        L::load(v + i, vv, n);
      }
      if constexpr (kMasks) {
        L::load_mask(mask + i, keep, n);
      }
      for (int p = 0; p < kParts; ++p) {
        const OVec d = gv[p] + l2 * wv[p];
        OVec m = d;
        if constexpr (kBufs) {
          m = mu * vv[p] + d;
        }
        const OVec z = wv[p] - eta * m;
        // sign(z)·max(|z| − lr·λ1, 0): the max is >= 0 (or NaN), so OR-ing in z's sign bit
        // is copysign.
        OVec out = at::vec::maximum(z.abs() - shrink, zero) | (z & sign_bit);
        if constexpr (kMasks) {
          out = out & keep[p];
          m = m & keep[p];
        }
        wv[p] = out;
        vv[p] = m;
      }
      L::template store<true>(w + i, wv, n);
      if constexpr (kBufs) {
        L::store(v + i, vv, n);
      }
      for (int p = 0; p < kParts; ++p) {
        nz = nz + wv[p].ne(zero);
      }
    });
    count += lane_count(nz);
  }
  return count;
}

template <typename scalar_t, bool kBufs, bool kMasks>
void prox_list(at::TensorList params, at::TensorList grads, at::TensorList bufs,
               at::TensorList masks, const double* lambda1, const double* lambda2, double lr,
               double momentum, const Plan& plan, std::vector<int64_t>& partial) {
  const size_t n = params.size();
  std::vector<scalar_t*> w(n), v(n, nullptr);
  std::vector<const scalar_t*> g(n);
  std::vector<const uint8_t*> m(n, nullptr);
  for (size_t t = 0; t < n; ++t) {
    w[t] = params[t].data_ptr<scalar_t>();
    g[t] = grads[t].const_data_ptr<scalar_t>();
    if constexpr (kBufs) {
      v[t] = bufs[t].data_ptr<scalar_t>();
    }
    if constexpr (kMasks) {
      m[t] = reinterpret_cast<const uint8_t*>(masks[t].const_data_ptr<bool>());
    }
  }
  plan.run([&](int64_t s, const Segment& seg) {
    const int64_t t = seg.tensor;
    scalar_t* __restrict ws = w[t] + seg.begin;
    const scalar_t* __restrict gs = g[t] + seg.begin;
    scalar_t* __restrict vs = kBufs ? v[t] + seg.begin : nullptr;
    const uint8_t* __restrict ms = kMasks ? m[t] + seg.begin : nullptr;
    partial[s] = prox_segment<scalar_t, kBufs, kMasks>(ws, gs, vs, ms, seg.end - seg.begin,
                                                       lambda1[t], lambda2[t], lr, momentum);
  });
}

at::Tensor prox_sgd_cpu(at::TensorList params, at::TensorList grads,
                        at::TensorList momentum_bufs, at::TensorList masks,
                        const at::Tensor& lambda1, const at::Tensor& lambda2, double lr,
                        double momentum) {
  const int64_t n = static_cast<int64_t>(params.size());
  check_params(params);
  check_companions("grads", grads, params);
  const bool has_bufs = !momentum_bufs.empty();
  const bool has_masks = !masks.empty();
  if (has_bufs) {
    check_companions("momentum_bufs", momentum_bufs, params);
  }
  if (has_masks) {
    check_companions("masks", masks, params, at::kBool);
  }
  for (const at::Tensor* lam : {&lambda1, &lambda2}) {
    TORCH_CHECK(lam->scalar_type() == at::kDouble && lam->dim() == 1 && lam->numel() == n &&
                    lam->device().is_cpu() && lam->is_contiguous(),
                "lambda1/lambda2 must be contiguous float64 CPU tensors of shape (", n, ",)");
  }
  const Plan plan(numels(params));
  std::vector<int64_t> partial(plan.num_segments(), 0);
  if (n > 0) {
    const double* l1 = lambda1.const_data_ptr<double>();
    const double* l2 = lambda2.const_data_ptr<double>();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, params[0].scalar_type(), "prox_sgd_", [&] {
          if (has_bufs && has_masks) {
            prox_list<scalar_t, true, true>(params, grads, momentum_bufs, masks, l1, l2, lr,
                                            momentum, plan, partial);
          } else if (has_bufs) {
            prox_list<scalar_t, true, false>(params, grads, momentum_bufs, masks, l1, l2, lr,
                                             momentum, plan, partial);
          } else if (has_masks) {
            prox_list<scalar_t, false, true>(params, grads, momentum_bufs, masks, l1, l2, lr,
                                             momentum, plan, partial);
          } else {
            prox_list<scalar_t, false, false>(params, grads, momentum_bufs, masks, l1, l2, lr,
                                              momentum, plan, partial);
          }
        });
  }
  return sum_counts(plan, partial, n);
}

}  // namespace
}  // namespace cvsparse::cpu
CVSPARSE_SIMD_END

TORCH_LIBRARY_IMPL(cvsparse, CPU, m) {
  if (cvsparse::cpu::simd_supported()) {
    m.impl("prox_sgd_", &cvsparse::cpu::prox_sgd_cpu);
  }
}
