// Shared machinery of the multi-tensor CPU kernels (prox_sgd_, mixed_partial_dot, threshold_).
//
// A list operator cuts every tensor of its list into segments of kChunk elements (Plan), groups
// consecutive segments into at most kMaxTasks tasks of nearly equal element counts, and runs the
// tasks with one at::parallel_for, threads taking the next task as they finish one: one huge
// tensor and many small ones both spread over every core, in a single parallel region per
// call.  Each segment owns one slot of a per-segment partial result (counts, sums) — no shared
// accumulators — and the slots are reduced in a fixed order.  Segment cuts depend only on each
// tensor's own size, so results are bitwise reproducible whatever the thread count and the rest
// of the list.
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
#include <atomic>
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

// Tensors are cut into segments of kChunk elements (the last one shorter).  Cuts depend only on
// each tensor's own size, so a tensor's partial results — and their fixed-order sum — are the
// same whatever the list around it and the number of threads.  kChunk is a multiple of every
// cache line, so two threads never write the same line.
constexpr int64_t kChunk = 1 << 14;
// A task (a run of consecutive segments) has at least kChunk elements — below that a thread is
// not worth waking — and there are at most kMaxTasks of them: many more than cores, so they
// balance, few enough to be cheap.
constexpr int64_t kMaxTasks = 64;

// Elements [begin, end) of list entry `tensor`.
struct Segment {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

class Plan {
 public:
  explicit Plan(const std::vector<int64_t>& numels) {
    int64_t total = 0;
    for (size_t t = 0; t < numels.size(); ++t) {
      for (int64_t begin = 0; begin < numels[t]; begin += kChunk) {
        segments_.push_back({static_cast<int64_t>(t), begin, std::min(numels[t], begin + kChunk)});
      }
      total += numels[t];
    }
    // Segment s goes to task (elements before s) * tasks / total: runs of ~total/tasks elements.
    const int64_t tasks = std::clamp<int64_t>(total / kChunk, 1, kMaxTasks);
    task_first_.assign(tasks + 1, num_segments());
    int64_t k = 0;
    int64_t before = 0;
    for (int64_t s = 0; s < num_segments(); ++s) {
      const int64_t task = before * tasks / total;
      while (k <= task) {
        task_first_[k++] = s;
      }
      before += segments_[s].end - segments_[s].begin;
    }
  }

  int64_t num_segments() const { return static_cast<int64_t>(segments_.size()); }
  const Segment& segment(int64_t s) const { return segments_[s]; }

  // Calls f(segment_index, segment) for every segment.  Threads take tasks from a shared
  // counter (one relaxed fetch_add per task) rather than a fixed share, so a thread that the OS
  // delays — on a machine running other jobs — does not hold up the others.
  template <typename F>
  void run(const F& f) const {
    const int64_t tasks = static_cast<int64_t>(task_first_.size()) - 1;
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>(tasks, at::get_num_threads());
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      for (int64_t k = next.fetch_add(1, std::memory_order_relaxed); k < tasks;
           k = next.fetch_add(1, std::memory_order_relaxed)) {
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

// One iteration of a kernel handles kStep elements of scalar_t as kParts registers of opmath_t:
// float32 1 x 8 lanes (AVX2), float64 2 x 4, float16 / bfloat16 2 x 8 (one 16-bit register).
template <typename scalar_t>
struct Lanes {
  using opmath_t = at::opmath_type<scalar_t>;
  using OVec = Vectorized<opmath_t>;
  using IVec = Vectorized<int32_t>;  // one mask byte per float lane, widened
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<scalar_t>;
  static constexpr bool kDouble = std::is_same_v<opmath_t, double>;
  static constexpr int64_t kStep = kDouble ? 2 * OVec::size() : Vectorized<scalar_t>::size();
  static constexpr int kParts = static_cast<int>(kStep / OVec::size());
  static constexpr int kGroups = static_cast<int>(kStep / IVec::size());  // mask byte groups
  static_assert(IVec::size() == Vectorized<float>::size(), "one int32 lane per float lane");
  static_assert(kDouble || kParts * OVec::size() == Vectorized<scalar_t>::size());

  // Loads n (default kStep) elements; lanes past n are zero.
  static inline void load(const scalar_t* p, OVec* out, int64_t n = kStep) {
    if constexpr (kReduced) {
      auto raw = n == kStep ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, n);
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(raw);
      out[0] = lo;
      out[1] = hi;
    } else {
      for (int part = 0; part < kParts; ++part) {
        const int64_t k = std::clamp<int64_t>(n - part * OVec::size(), 0, OVec::size());
        out[part] = k == OVec::size() ? OVec::loadu(p + part * OVec::size())
                                      : OVec::loadu(p + part * OVec::size(), k);
      }
    }
  }

  // Stores n (default kStep) elements rounded to scalar_t.  With kRound, `v` is replaced by the
  // values as stored (they differ for float16 / bfloat16).
  template <bool kRound = false>
  static inline void store(scalar_t* p, OVec* v, int64_t n = kStep) {
    if constexpr (kReduced) {
      auto raw = at::vec::convert_from_float<scalar_t>(v[0], v[1]);
      if (n == kStep) {
        raw.store(p);
      } else {
        raw.store(p, n);
      }
      if constexpr (kRound) {
        auto [lo, hi] = at::vec::convert_to_float<scalar_t>(raw);
        v[0] = lo;
        v[1] = hi;
      }
    } else {
      for (int part = 0; part < kParts; ++part) {
        const int64_t k = std::clamp<int64_t>(n - part * OVec::size(), 0, OVec::size());
        if (k == OVec::size()) {
          v[part].store(p + part * OVec::size());
        } else if (k > 0) {
          v[part].store(p + part * OVec::size(), k);
        }
      }
    }
  }

  // Select masks (every bit set where the mask byte is nonzero; clear past n) for operator&.
  static inline void load_mask(const uint8_t* m, OVec* out, int64_t n = kStep) {
    for (int group = 0; group < kGroups; ++group) {
      const int64_t k = std::clamp<int64_t>(n - group * IVec::size(), 0, IVec::size());
      const IVec bytes = k > 0 ? widen(m + group * IVec::size(), k) : IVec(0);
      const IVec bits = bytes != IVec(0);
      if constexpr (kDouble) {
        const at::vec::VectorizedN<int32_t, 1> narrow(bits);
        const auto wide = at::vec::convert<int64_t, 2, int32_t, 1>(narrow);
        out[2 * group] = at::vec::cast<double>(wide[0]);
        out[2 * group + 1] = at::vec::cast<double>(wide[1]);
      } else {
        out[group] = at::vec::cast<float>(bits);
      }
    }
  }

  // Select masks of the first n lanes.
  static inline void first_lanes(OVec* out, int64_t n) {
    const OVec all_set = OVec(opmath_t(0)) == OVec(opmath_t(0));
    for (int part = 0; part < kParts; ++part) {
      if (n >= (part + 1) * OVec::size()) {
        out[part] = all_set;
      } else {
        const opmath_t start = static_cast<opmath_t>(part * OVec::size());
        out[part] = OVec::arange(start, opmath_t(1)) < OVec(static_cast<opmath_t>(n));
      }
    }
  }

  // Writes one byte, 0 or 1, per lane of the select masks `keep` (n lanes, default kStep).
  static inline void store_mask(uint8_t* m, const OVec* keep, int64_t n = kStep) {
    const Vectorized<float> one(1.0f);
    for (int group = 0; group < kGroups; ++group) {
      const int64_t k = std::clamp<int64_t>(n - group * IVec::size(), 0, IVec::size());
      if (k == 0) {
        break;
      }
      Vectorized<float> bits;
      if constexpr (kDouble) {
        at::vec::VectorizedN<int64_t, 2> wide;
        wide[0] = at::vec::cast<int64_t>(keep[2 * group]);
        wide[1] = at::vec::cast<int64_t>(keep[2 * group + 1]);
        bits = at::vec::cast<float>(at::vec::convert<int32_t, 1, int64_t, 2>(wide));
      } else {
        bits = keep[group];
      }
      // 1.0 / 0.0 per lane, narrowed to bytes in the low IVec::size() bytes of a register.
      const auto bytes = at::vec::convert<uint8_t>(bits & one);
      if (k == IVec::size()) {
        __at_align__ uint8_t buf[Vectorized<uint8_t>::size()];
        bytes.store(buf);
        std::memcpy(m + group * IVec::size(), buf, IVec::size());
      } else {
        bytes.store(m + group * IVec::size(), k);
      }
    }
  }

 private:
  // n <= IVec::size() mask bytes widened to int32 lanes (zero past n).
  static inline IVec widen(const uint8_t* m, int64_t n) {
#if CVSPARSE_AVX2
    return at::vec::convert_to_int32<uint8_t>(m, static_cast<int>(n));
#else
    return at::vec::convert<int32_t>(Vectorized<uint8_t>::loadu(m, n));
#endif
  }
};

// Software prefetch distance.  The hardware prefetchers alone leave a core short of requests in
// flight on these five-stream loops; prefetching each stream this far ahead, once per cache
// line, lifts the per-core bandwidth by ~20-30% (measured on the benchmark machine).
constexpr int64_t kPrefetchBytes = 2048;

template <typename T>
inline void prefetch(const T* p) {
  __builtin_prefetch(p, 0);
}

template <typename T>
inline void prefetch_for_write(T* p) {
  __builtin_prefetch(p, 1);
}

// Calls step(i, n) for i = begin, begin + kStep, ... < end with n = min(kStep, end - i): whole
// steps where n is the constant kStep (so loads and stores take their full-vector path), then
// the partial tail.  Once per cache line of scalar_t it calls ahead(j) with j the element
// kPrefetchBytes ahead, for the kernel to prefetch its streams there.
template <typename scalar_t, int64_t kStep, typename Ahead, typename Step>
inline void for_each_step(int64_t begin, int64_t end, const Ahead& ahead, const Step& step) {
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(scalar_t));
  constexpr int64_t kDistance = kPrefetchBytes / static_cast<int64_t>(sizeof(scalar_t));
  static_assert(kLine % kStep == 0, "a cache line holds whole steps");
  int64_t i = begin;
  for (; i + kLine <= end; i += kLine) {
    ahead(i + kDistance);
    for (int64_t j = 0; j < kLine; j += kStep) {
      step(i + j, kStep);
    }
  }
  for (; i < end; i += kStep) {
    step(i, std::min(kStep, end - i));
  }
}

// Sum of the lanes of a vector of small whole numbers (counts), exact below 2^24 per lane.
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
