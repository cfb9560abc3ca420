// max_abs on CPU: the largest |x| of every tensor of a list, read-only, in one parallel region
// (the multi-tensor Plan of common.h).  A NaN anywhere in a tensor makes its result NaN
// (at::vec::maximum propagates NaN), an inf makes it inf, so one scan both tests finiteness and
// measures the largest entry.  The result is float64 for float64 inputs, float32 otherwise;
// an empty tensor gives 0.
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common.h"

CVSPARSE_SIMD_BEGIN
namespace cvsparse::cpu {
namespace {

// The largest |x| over [0, len) of one segment (NaN if any element is NaN).
template <typename scalar_t>
double max_abs_segment(const scalar_t* __restrict x, int64_t len) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using OVec = typename L::OVec;
  constexpr int kParts = L::kParts;
  constexpr int64_t kStep = L::kStep;
  // kAcc independent accumulators, indexed by constants: one chain of maximum() would be
  // bound by its latency (4 cycles per vector), well below the bandwidth of a cached read.
  constexpr int kAcc = 4;
  constexpr int64_t kBlock = kAcc * kStep;
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(scalar_t));
  constexpr int64_t kDistance = kPrefetchBytes / static_cast<int64_t>(sizeof(scalar_t));
  static_assert(kBlock % kLine == 0, "a block holds whole cache lines");
  OVec acc[kAcc][kParts];
  for (int a = 0; a < kAcc; ++a) {
    for (int p = 0; p < kParts; ++p) {
      acc[a][p] = OVec(opmath_t(0));
    }
  }
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    for (int64_t line = 0; line < kBlock; line += kLine) {
      prefetch(x + i + kDistance + line);
    }
    for (int a = 0; a < kAcc; ++a) {
      OVec xv[kParts];
      L::load(x + i + a * kStep, xv);
      for (int p = 0; p < kParts; ++p) {
        acc[a][p] = at::vec::maximum(acc[a][p], xv[p].abs());
      }
    }
  }
  for (; i < len; i += kStep) {  // the tail: lanes past len load as 0, leaving the max as is
    OVec xv[kParts];
    L::load(x + i, xv, std::min(kStep, len - i));
    for (int p = 0; p < kParts; ++p) {
      acc[0][p] = at::vec::maximum(acc[0][p], xv[p].abs());
    }
  }
  for (int a = 0; a < kAcc; ++a) {
    for (int p = 0; p < kParts; ++p) {
      if (a > 0 || p > 0) {
        acc[0][0] = at::vec::maximum(acc[0][0], acc[a][p]);
      }
    }
  }
  __at_align__ opmath_t lanes[OVec::size()];
  acc[0][0].store(lanes);
  double out = 0;
  for (int64_t j = 0; j < OVec::size(); ++j) {
    const double v = static_cast<double>(lanes[j]);
    out = std::isnan(v) || std::isnan(out) ? std::numeric_limits<double>::quiet_NaN()
                                           : std::max(out, v);
  }
  return out;
}

at::Tensor max_abs_cpu(at::TensorList tensors) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  check_params(tensors);
  const bool is_double = n > 0 && tensors[0].scalar_type() == at::kDouble;
  const Plan plan(numels(tensors));
  std::vector<double> partial(plan.num_segments(), 0.0);
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "max_abs", [&] {
          std::vector<const scalar_t*> x(n);
          for (int64_t t = 0; t < n; ++t) {
            x[t] = tensors[t].const_data_ptr<scalar_t>();
          }
          plan.run([&](int64_t s, const Segment& seg) {
            partial[s] = max_abs_segment<scalar_t>(x[seg.tensor] + seg.begin, seg.end - seg.begin);
          });
        });
  }
  auto out = at::zeros({n}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t s = 0; s < plan.num_segments(); ++s) {
    double& m = o[plan.segment(s).tensor];
    m = std::isnan(partial[s]) || std::isnan(m) ? std::numeric_limits<double>::quiet_NaN()
                                                : std::max(m, partial[s]);
  }
  return is_double ? out : out.to(at::kFloat);
}

}  // namespace
}  // namespace cvsparse::cpu
CVSPARSE_SIMD_END

TORCH_LIBRARY_IMPL(cvsparse, CPU, m) {
  if (cvsparse::cpu::simd_supported()) {
    m.impl("max_abs", &cvsparse::cpu::max_abs_cpu);
  }
}
