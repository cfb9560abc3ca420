// mixed_partial_dot on CPU: per tensor [Σ c·v·sign(w), Σ c·v·w] over a whole list
// (docs/method.md §3).
// One read-only pass over w, v (and c).  Products are formed in the math type (float for
// float32 / float16 / bfloat16), summed per lane over blocks of kBlock elements, and every block
// sum is added into double: the error stays within ~(kBlock / lanes)·ε·Σ|terms of a block| per
// block instead of growing with the tensor size (the tests hold 1M float32 elements to
// 1e-6·Σ|terms| of the float64 reference).  Segment sums are reduced in a fixed order, so the
// results are deterministic.
#include <torch/library.h>

#include "common.h"

CVSPARSE_SIMD_BEGIN
namespace cvsparse::cpu {
namespace {

struct Sums {
  double sign = 0;    // Σ c·v·sign(w)
  double linear = 0;  // Σ c·v·w
};

// Both sums over elements [0, len) of one segment.
template <typename scalar_t, bool kPrecond>
Sums dot_segment(const scalar_t* __restrict w, const scalar_t* __restrict v,
                 const scalar_t* __restrict c, int64_t len) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using OVec = typename L::OVec;
  constexpr int kParts = L::kParts;
  constexpr int64_t kStep = L::kStep;
  constexpr int64_t kBlock = 1 << 9;
  const OVec zero(opmath_t(0));
  const OVec sign_bit(opmath_t(-0.0));
  Sums out;
  for (int64_t block = 0; block < len; block += kBlock) {
    const int64_t stop = std::min(len, block + kBlock);
    OVec acc_sign[kParts], acc_linear[kParts];
    for (int p = 0; p < kParts; ++p) {
      acc_sign[p] = zero;
      acc_linear[p] = zero;
    }
    const auto ahead = [&](int64_t j) {
      prefetch(w + j);
      prefetch(v + j);
      if constexpr (kPrecond) {
        prefetch(c + j);
      }
    };
    for_each_step<scalar_t, kStep>(block, stop, ahead, [&](int64_t i, int64_t n) {
      OVec wv[kParts], q[kParts], cv[kParts];
      L::load(w + i, wv, n);
      L::load(v + i, q, n);
      if constexpr (kPrecond) {
        L::load(c + i, cv, n);
      }
      for (int p = 0; p < kParts; ++p) {
        if constexpr (kPrecond) {
          q[p] = q[p] * cv[p];
        }
        // q·sign(w): q with w's sign flipped in, zeroed where w == 0 (±0).
        const OVec signed_q = (q[p] ^ (wv[p] & sign_bit)) & (wv[p] != zero);
        acc_sign[p] = acc_sign[p] + signed_q;
        acc_linear[p] = acc_linear[p] + q[p] * wv[p];
      }
    });
    for (int p = 0; p < kParts; ++p) {
      out.sign += lane_sum(acc_sign[p]);
      out.linear += lane_sum(acc_linear[p]);
    }
  }
  return out;
}

template <typename scalar_t, bool kPrecond>
void dot_list(at::TensorList params, at::TensorList vectors, at::TensorList precond,
              const Plan& plan, std::vector<Sums>& partial) {
  const size_t n = params.size();
  std::vector<const scalar_t*> w(n), v(n), c(n, nullptr);
  for (size_t t = 0; t < n; ++t) {
    w[t] = params[t].const_data_ptr<scalar_t>();
    v[t] = vectors[t].const_data_ptr<scalar_t>();
    if constexpr (kPrecond) {
      c[t] = precond[t].const_data_ptr<scalar_t>();
    }
  }
  plan.run([&](int64_t s, const Segment& seg) {
    const int64_t t = seg.tensor;
    const scalar_t* __restrict ws = w[t] + seg.begin;
    const scalar_t* __restrict vs = v[t] + seg.begin;
    const scalar_t* __restrict cs = kPrecond ? c[t] + seg.begin : nullptr;
    partial[s] = dot_segment<scalar_t, kPrecond>(ws, vs, cs, seg.end - seg.begin);
  });
}

at::Tensor mixed_partial_dot_cpu(at::TensorList params, at::TensorList vectors,
                                 at::TensorList precond) {
  const int64_t n = static_cast<int64_t>(params.size());
  check_params(params);
  check_companions("vectors", vectors, params);
  const bool has_precond = !precond.empty();
  if (has_precond) {
    check_companions("precond", precond, params);
  }
  const Plan plan(numels(params));
  std::vector<Sums> partial(plan.num_segments());
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, params[0].scalar_type(), "mixed_partial_dot", [&] {
          if (has_precond) {
            dot_list<scalar_t, true>(params, vectors, precond, plan, partial);
          } else {
            dot_list<scalar_t, false>(params, vectors, precond, plan, partial);
          }
        });
  }
  auto sums = at::zeros({n, 2}, at::TensorOptions().dtype(at::kDouble));
  double* o = sums.data_ptr<double>();
  for (int64_t s = 0; s < plan.num_segments(); ++s) {
    const int64_t t = plan.segment(s).tensor;
    o[2 * t] += partial[s].sign;
    o[2 * t + 1] += partial[s].linear;
  }
  const bool is_double = n > 0 && params[0].scalar_type() == at::kDouble;
  return is_double ? sums : sums.to(at::kFloat);
}

}  // namespace
}  // namespace cvsparse::cpu
CVSPARSE_SIMD_END

TORCH_LIBRARY_IMPL(cvsparse, CPU, m) {
  if (cvsparse::cpu::simd_supported()) {
    m.impl("mixed_partial_dot", &cvsparse::cpu::mixed_partial_dot_cpu);
  }
}
