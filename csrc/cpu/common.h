// Shared machinery of the multi-tensor CPU kernels (prox_sgd_, mixed_partial_dot, threshold_).
//
// A list operator sees its n tensors as one flattened element index space.  Plan cuts that
// space into at most kMaxTasks tasks of (nearly) equal size, each task into segments that stay
// inside one tensor, and runs the tasks with at::parallel_for.  So one huge tensor and many
// small ones both spread over every core, and each segment owns one slot of a per-segment
// partial result (counts, sums): no atomics, no contention, and — because the cut depends only
// on the tensor sizes, not on the thread count — deterministic reductions.
//
// Lanes<scalar_t> moves data between memory in scalar_t and at::vec registers in the operator's
// math type (float for float32 / float16 / bfloat16, double for float64).
//
// Instruction set.  The extension is built for the baseline ISA (no -march), where at::vec is a
// plain array type.  On x86-64 with GCC the kernels are instead compiled for AVX2+FMA+F16C: the
// at::vec headers are included with CPU_CAPABILITY_AVX2 inside a `#pragma GCC target` region
// (in their own inline namespace, so nothing collides with other translation units), and each
// kernel file wraps its kernels in CVSPARSE_SIMD_BEGIN / CVSPARSE_SIMD_END.  Everything else
// (ATen, c10, the math headers at::vec pulls in) is included before the region, so it stays
// baseline code.  At load time the kernels are registered only if the CPU has AVX2
// (simd_supported(), which honours ATEN_CPU_CAPABILITY); otherwise the operators have no CPU
// kernel and cvsparse's "auto" backend uses the reference implementation.
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/MathConstants.h>
#include <c10/util/copysign.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(CPU_CAPABILITY)
#define CVSPARSE_AVX2 1
#define CPU_CAPABILITY cvsparse_avx2
#define CPU_CAPABILITY_AVX2
// fp-contract=off: no fused multiply-adds the reference does not make (same rounding).
#define CVSPARSE_SIMD_BEGIN                                                                   \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt\")") \
      _Pragma("GCC optimize(\"fp-contract=off\")")
#define CVSPARSE_SIMD_END _Pragma("GCC pop_options")
#else
#define CVSPARSE_AVX2 0
#define CVSPARSE_SIMD_BEGIN
#define CVSPARSE_SIMD_END
#endif

CVSPARSE_SIMD_BEGIN
#if CVSPARSE_AVX2 && !defined(__AVX2__)
// `#pragma GCC target` does not define the ISA macros; sleef.h declares its AVX2 entry points
// (which at::vec references) only under them.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CVSPARSE_UNDEF_ISA_MACROS
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#ifdef CVSPARSE_UNDEF_ISA_MACROS
#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#undef CVSPARSE_UNDEF_ISA_MACROS
#endif
CVSPARSE_SIMD_END

namespace cvsparse::cpu {

// A task below this many elements is not worth a thread; lists smaller than it run serially.
constexpr int64_t kMinTaskElems = 1 << 14;
// Upper bound of tasks per call: many more than cores, so tasks balance, few enough to be cheap.
constexpr int64_t kMaxTasks = 64;
// Task cuts inside a tensor fall on multiples of this many elements (>= one cache line of
// every dtype, bool masks included), so two threads never write the same cache line.
constexpr int64_t kCutAlign = 64;

// Elements [begin, end) of list entry `tensor`.
struct Segment {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

class Plan {
 public:
  explicit Plan(const std::vector<int64_t>& numels) {
    std::vector<int64_t> offsets(numels.size() + 1, 0);
    for (size_t t = 0; t < numels.size(); ++t) {
      offsets[t + 1] = offsets[t] + numels[t];
    }
    const int64_t total = offsets.back();
    const int64_t tasks = std::clamp<int64_t>(total / kMinTaskElems, 1, kMaxTasks);
    task_first_.reserve(tasks + 1);
    size_t t = 0;  // tensor holding the current position
    int64_t pos = 0;  // current position in the flattened index space
    for (int64_t k = 0; k < tasks; ++k) {
      task_first_.push_back(static_cast<int64_t>(segments_.size()));
      int64_t cut = (k + 1 == tasks) ? total : total / tasks * (k + 1);
      // Align the cut relative to the start of the tensor it falls in.
      size_t c = static_cast<size_t>(
          std::upper_bound(offsets.begin(), offsets.end(), cut) - offsets.begin()) - 1;
      if (cut < total) {
        cut = offsets[c] + (cut - offsets[c]) / kCutAlign * kCutAlign;
      }
      cut = std::max(cut, pos);
      while (pos < cut) {
        while (offsets[t + 1] <= pos) {
          ++t;  // skip finished and empty tensors
        }
        const int64_t stop = std::min(cut, offsets[t + 1]);
        segments_.push_back({static_cast<int64_t>(t), pos - offsets[t], stop - offsets[t]});
        pos = stop;
      }
    }
    task_first_.push_back(static_cast<int64_t>(segments_.size()));
  }

  int64_t num_segments() const { return static_cast<int64_t>(segments_.size()); }
  const Segment& segment(int64_t s) const { return segments_[s]; }

  // Calls f(segment_index, segment) for every segment, tasks in parallel.
  template <typename F>
  void run(const F& f) const {
    const int64_t tasks = static_cast<int64_t>(task_first_.size()) - 1;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        for (int64_t s = task_first_[k]; s < task_first_[k + 1]; ++s) {
          f(s, segments_[s]);
        }
      }
    });
  }

 private:
  std::vector<Segment> segments_;
  std::vector<int64_t> task_first_;  // task k owns segments [task_first_[k], task_first_[k+1])
};

// Memory-safety invariants of a companion list (the Python layer validates everything with
// friendlier messages; these guard direct torch.ops calls).
inline void check_companions(const char* name, at::TensorList tensors, at::TensorList params,
                             std::optional<at::ScalarType> dtype = std::nullopt) {
  TORCH_CHECK(tensors.size() == params.size(), name, " has ", tensors.size(),
              " tensors but params has ", params.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, "[", i,
                "] must be a contiguous CPU tensor");
    TORCH_CHECK(t.numel() == params[i].numel(), name, "[", i, "] has ", t.numel(),
                " elements but params[", i, "] has ", params[i].numel());
    TORCH_CHECK(t.scalar_type() == dtype.value_or(params[i].scalar_type()), name, "[", i,
                "] has dtype ", t.scalar_type());
  }
}

inline void check_params(at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), "params[", i,
                "] must be a contiguous CPU tensor");
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), "params[", i,
                "] has dtype ", p.scalar_type(), " but params[0] has ", params[0].scalar_type());
  }
}

inline std::vector<int64_t> numels(at::TensorList tensors) {
  std::vector<int64_t> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) {
    out.push_back(t.numel());
  }
  return out;
}

// Per-tensor int64 counts from per-segment partial counts.
inline at::Tensor sum_counts(const Plan& plan, const std::vector<int64_t>& partial, int64_t n) {
  auto out = at::zeros({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t s = 0; s < plan.num_segments(); ++s) {
    o[plan.segment(s).tensor] += partial[s];
  }
  return out;
}

// True when this CPU can run the kernels of this build (see the note on instruction sets).
inline bool simd_supported() {
#if CVSPARSE_AVX2
  const std::string cap = at::get_cpu_capability();
  return cap == "AVX2" || cap == "AVX512";
#else
  return true;
#endif
}

}  // namespace cvsparse::cpu

CVSPARSE_SIMD_BEGIN
namespace cvsparse::cpu {

using at::vec::Vectorized;

template <typename scalar_t>
struct Lanes {
  using opmath_t = at::opmath_type<scalar_t>;
  using OVec = Vectorized<opmath_t>;
  // Reduced-precision registers hold twice the lanes of a float register.
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<scalar_t>;
  static constexpr int kParts = kReduced ? 2 : 1;
  static constexpr int64_t kStep = OVec::size() * kParts;  // elements per iteration

  // Loads `count` (default kStep) elements; lanes past count are zero.
  static inline void load(const scalar_t* p, OVec* out, int64_t count = kStep) {
    if constexpr (kReduced) {
      auto raw = count == kStep ? Vectorized<scalar_t>::loadu(p)
                                : Vectorized<scalar_t>::loadu(p, count);
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(raw);
      out[0] = lo;
      out[1] = hi;
    } else {
      out[0] = count == kStep ? OVec::loadu(p) : OVec::loadu(p, count);
    }
  }

  static inline Vectorized<scalar_t> pack(const OVec* in) {
    if constexpr (kReduced) {
      return at::vec::convert_from_float<scalar_t>(in[0], in[1]);
    } else {
      return in[0];
    }
  }

  // Stores `count` (default kStep) elements rounded to scalar_t.
  static inline void store(scalar_t* p, const OVec* in, int64_t count = kStep) {
    auto raw = pack(in);
    if (count == kStep) {
      raw.store(p);
    } else {
      raw.store(p, count);
    }
  }

  // Like store, and replaces `in` by the values as stored (after rounding to scalar_t).
  static inline void store_rounded(scalar_t* p, OVec* in, int64_t count = kStep) {
    auto raw = pack(in);
    if (count == kStep) {
      raw.store(p);
    } else {
      raw.store(p, count);
    }
    if constexpr (kReduced) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(raw);
      in[0] = lo;
      in[1] = hi;
    }
  }

  // Lanes with every bit set where the mask byte is nonzero (zero past count): a select mask
  // for operator& and blendv.
  static inline void load_mask(const uint8_t* m, OVec* out, int64_t count = kStep) {
    using bits_t = std::conditional_t<sizeof(opmath_t) == 4, int32_t, int64_t>;
    __at_align__ bits_t bits[kStep];
    if (count == kStep) {
      for (int64_t j = 0; j < kStep; ++j) {
        bits[j] = -static_cast<bits_t>(m[j] != 0);
      }
    } else {
      for (int64_t j = 0; j < kStep; ++j) {
        bits[j] = j < count ? -static_cast<bits_t>(m[j] != 0) : 0;
      }
    }
    for (int part = 0; part < kParts; ++part) {
      out[part] = OVec::loadu(bits + part * OVec::size());
    }
  }

  // Writes one byte (0 or 1) per lane of a select mask.
  static inline void store_mask(uint8_t* m, const OVec* keep, int64_t count = kStep) {
    using bits_t = std::conditional_t<sizeof(opmath_t) == 4, int32_t, int64_t>;
    __at_align__ bits_t bits[kStep];
    for (int part = 0; part < kParts; ++part) {
      keep[part].store(bits + part * OVec::size());
    }
    if (count == kStep) {
      for (int64_t j = 0; j < kStep; ++j) {
        m[j] = static_cast<uint8_t>(bits[j] != 0);
      }
    } else {
      for (int64_t j = 0; j < count; ++j) {
        m[j] = static_cast<uint8_t>(bits[j] != 0);
      }
    }
  }
};

// Sum of the lanes of a vector of 0/1 values, exact as long as each lane stays below 2^24.
template <typename T>
inline int64_t lane_count(const Vectorized<T>& v) {
  __at_align__ T buf[Vectorized<T>::size()];
  v.store(buf);
  int64_t n = 0;
  for (int64_t j = 0; j < Vectorized<T>::size(); ++j) {
    n += static_cast<int64_t>(buf[j]);
  }
  return n;
}

// Sum of the lanes of a vector, in double.
template <typename T>
inline double lane_sum(const Vectorized<T>& v) {
  __at_align__ T buf[Vectorized<T>::size()];
  v.store(buf);
  double s = 0;
  for (int64_t j = 0; j < Vectorized<T>::size(); ++j) {
    s += static_cast<double>(buf[j]);
  }
  return s;
}

}  // namespace cvsparse::cpu
CVSPARSE_SIMD_END
