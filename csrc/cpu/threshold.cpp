// threshold_ on CPU: magnitude pruning over a whole list of tensors (docs/method.md §4).  One pass:
// keep = |w| >= τ and mask;  w, v = keep ? (w, v) : 0;  mask = keep;  count the kept elements.
// An empty masks list means "no masks" (keep = |w| >= τ), like an empty momentum_bufs list.
// |w| >= τ is evaluated in the math type (τ rounded to float for float32 / float16 / bfloat16),
// like the reference.
#include <torch/library.h>

#include "common.h"

CVSPARSE_SIMD_BEGIN
namespace cvsparse::cpu {
namespace {

// Prunes elements [0, len) of one segment; returns how many are kept.
template <typename scalar_t, bool kBufs, bool kMasks>
int64_t threshold_segment(scalar_t* __restrict w, scalar_t* __restrict v,
                          uint8_t* __restrict mask, int64_t len, double tau) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using OVec = typename L::OVec;
  constexpr int kParts = L::kParts;
  constexpr int64_t kStep = L::kStep;
  // Per-lane counts stay exact in opmath_t if flushed every kBlock elements.
  constexpr int64_t kBlock = 1 << 12;
  const OVec threshold(static_cast<opmath_t>(tau));
  const OVec one(opmath_t(1));
  int64_t count = 0;
  for (int64_t block = 0; block < len; block += kBlock) {
    const int64_t stop = std::min(len, block + kBlock);
    OVec kept(opmath_t(0));
    const auto ahead = [&](int64_t j) {
      prefetch_for_write(w + j);
      if constexpr (kBufs) {
        prefetch_for_write(v + j);
      }
      if constexpr (kMasks) {
        prefetch_for_write(mask + j);
      }
    };
    for_each_step<scalar_t, kStep>(block, stop, ahead, [&](int64_t i, int64_t n) {
      OVec wv[kParts], vv[kParts], keep[kParts];
      L::load(w + i, wv, n);
      if constexpr (kMasks) {
        L::load_mask(mask + i, keep, n);  // lanes past n are never kept
      } else {
        L::first_lanes(keep, n);
      }
      if constexpr (kBufs) {
        L::load(v + i, vv, n);
      }
      for (int p = 0; p < kParts; ++p) {
        keep[p] = keep[p] & (wv[p].abs() >= threshold);
        wv[p] = wv[p] & keep[p];
        if constexpr (kBufs) {
          vv[p] = vv[p] & keep[p];
        }
        kept = kept + (keep[p] & one);
      }
      L::store(w + i, wv, n);
      if constexpr (kBufs) {
        L::store(v + i, vv, n);
      }
      if constexpr (kMasks) {
        L::store_mask(mask + i, keep, n);
      }
    });
    count += lane_count(kept);
  }
  return count;
}

template <typename scalar_t, bool kBufs, bool kMasks>
void threshold_list(at::TensorList params, at::TensorList bufs, at::TensorList masks,
                    double tau, const Plan& plan, std::vector<int64_t>& partial) {
  const size_t n = params.size();
  std::vector<scalar_t*> w(n), v(n, nullptr);
  std::vector<uint8_t*> m(n, nullptr);
  for (size_t t = 0; t < n; ++t) {
    w[t] = params[t].data_ptr<scalar_t>();
    if constexpr (kMasks) {
      m[t] = reinterpret_cast<uint8_t*>(masks[t].data_ptr<bool>());
    }
    if constexpr (kBufs) {
      v[t] = bufs[t].data_ptr<scalar_t>();
    }
  }
  plan.run([&](int64_t s, const Segment& seg) {
    const int64_t t = seg.tensor;
    scalar_t* __restrict ws = w[t] + seg.begin;
    scalar_t* __restrict vs = kBufs ? v[t] + seg.begin : nullptr;
    uint8_t* __restrict ms = kMasks ? m[t] + seg.begin : nullptr;
    partial[s] =
        threshold_segment<scalar_t, kBufs, kMasks>(ws, vs, ms, seg.end - seg.begin, tau);
  });
}

at::Tensor threshold_cpu(at::TensorList params, at::TensorList momentum_bufs,
                         at::TensorList masks, double tau) {
  const int64_t n = static_cast<int64_t>(params.size());
  check_params(params);
  const bool has_bufs = !momentum_bufs.empty();
  const bool has_masks = !masks.empty();
  if (has_bufs) {
    check_companions("momentum_bufs", momentum_bufs, params);
  }
  if (has_masks) {
    check_companions("masks", masks, params, at::kBool);
  }
  const Plan plan(numels(params));
  std::vector<int64_t> partial(plan.num_segments(), 0);
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, params[0].scalar_type(), "threshold_", [&] {
          auto run = [&](auto bufs_tag, auto masks_tag) {
            threshold_list<scalar_t, decltype(bufs_tag)::value, decltype(masks_tag)::value>(
                params, momentum_bufs, masks, tau, plan, partial);
          };
          if (has_bufs && has_masks) {
            run(std::true_type{}, std::true_type{});
          } else if (has_bufs) {
            run(std::true_type{}, std::false_type{});
          } else if (has_masks) {
            run(std::false_type{}, std::true_type{});
          } else {
            run(std::false_type{}, std::false_type{});
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
    m.impl("threshold_", &cvsparse::cpu::threshold_cpu);
  }
}
