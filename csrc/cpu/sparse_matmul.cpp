// sparse_matmul on CPU: out (M x N) = W (M x K, packed per row) @ input (K x N)
// (+ bias[m] on row m) (then ReLU).
//
// Lanes are the N columns (a batch, or the pixels of a 1x1 convolution).  A task is a chunk of
// rows x a block of up to kBlockSteps vector steps of lanes; for each row it keeps the block's
// accumulators in registers and walks the row's nonzeros once, moving a pointer down the input
// by delta x N per nonzero (the delta encoding is consumed as it is, never decoded to a table).
// Lanes left over past the last whole vector step are computed with scalar accumulators — for
// N = 1 (batch-1 Linear) that is the whole product, a sparse dot per row with four independent
// sums.  Reduced precision (float16, bfloat16) loads convert to float32 and accumulate there.
//
// A Linear layer's batch arrives as rows (N, K); the input may be given as that matrix's
// transpose (a (K, N) view with strides (1, K)), which is copied to (K, N) here in 8 x 8 tiles
// (in-register transposes for float32) into a buffer of the calling thread kept across calls —
// about a tenth of the time of a generic strided copy.
#include <immintrin.h>
#include <torch/library.h>

#include <vector>

#include "sparse_common.h"

// float32 on CPUs with AVX-512 (sparse::avx512_usable): a block of 64 lanes is four registers,
// so a nonzero costs four multiply-adds instead of eight, and two rows go at once (eight
// independent accumulator chains).  Compiled for AVX-512F by function attribute.
namespace cvsparse::cpu::avx512 {
#if CVSPARSE_AVX2
constexpr bool kMatmulBuilt = true;

constexpr int kZ = 4;  // 64 lanes: four registers per row

__attribute__((target("avx512f"))) inline void start_row(__m512* acc, const float* bias,
                                                         int64_t m) {
  for (int k = 0; k < kZ; ++k) {
    acc[k] = _mm512_set1_ps(bias ? bias[m] : 0.0f);
  }
}

// acc += values[i] · (the 64 lanes at p, p moved down by deltas[i] rows of n) for i in [i, end).
__attribute__((target("avx512f"))) inline void walk_row(__m512* acc, const float* values,
                                                        const int32_t* deltas, int32_t i,
                                                        int32_t end, const float* p, int64_t n) {
  for (; i < end; ++i) {
    p += static_cast<int64_t>(deltas[i]) * n;
    const __m512 w = _mm512_set1_ps(values[i]);
    for (int k = 0; k < kZ; ++k) {
      acc[k] = _mm512_fmadd_ps(w, _mm512_loadu_ps(p + 16 * k), acc[k]);
    }
  }
}

__attribute__((target("avx512f"))) inline void store_row(float* o, const __m512* acc,
                                                         bool relu) {
  const __m512 zero = _mm512_setzero_ps();
  for (int k = 0; k < kZ; ++k) {
    // max(0, x) returns its second operand x when x is NaN, like torch.relu.
    _mm512_storeu_ps(o + 16 * k, relu ? _mm512_max_ps(zero, acc[k]) : acc[k]);
  }
}

// out[m, n0 + lane] for rows m of [m0, m1) and the 64 lanes from n0 (x and out have n lanes):
// two rows at a time while both have nonzeros left, then each row's rest.
__attribute__((target("avx512f"))) void rows64_f32(const float* x, const float* values,
                                                   const int32_t* deltas, const int32_t* row_ptr,
                                                   const float* bias, float* out, int64_t n,
                                                   bool relu, int64_t m0, int64_t m1,
                                                   int64_t n0) {
  int64_t m = m0;
  for (; m + 2 <= m1; m += 2) {
    __m512 acc_a[kZ], acc_b[kZ];
    start_row(acc_a, bias, m);
    start_row(acc_b, bias, m + 1);
    int32_t ia = row_ptr[m];
    int32_t ib = row_ptr[m + 1];
    const int32_t ea = row_ptr[m + 1];
    const int32_t eb = row_ptr[m + 2];
    const float* pa = x + n0;
    const float* pb = x + n0;
    for (; ia < ea && ib < eb; ++ia, ++ib) {
      pa += static_cast<int64_t>(deltas[ia]) * n;
      pb += static_cast<int64_t>(deltas[ib]) * n;
      const __m512 wa = _mm512_set1_ps(values[ia]);
      const __m512 wb = _mm512_set1_ps(values[ib]);
      for (int k = 0; k < kZ; ++k) {
        acc_a[k] = _mm512_fmadd_ps(wa, _mm512_loadu_ps(pa + 16 * k), acc_a[k]);
        acc_b[k] = _mm512_fmadd_ps(wb, _mm512_loadu_ps(pb + 16 * k), acc_b[k]);
      }
    }
    walk_row(acc_a, values, deltas, ia, ea, pa, n);
    walk_row(acc_b, values, deltas, ib, eb, pb, n);
    store_row(out + m * n + n0, acc_a, relu);
    store_row(out + (m + 1) * n + n0, acc_b, relu);
  }
  for (; m < m1; ++m) {
    __m512 acc[kZ];
    start_row(acc, bias, m);
    walk_row(acc, values, deltas, row_ptr[m], row_ptr[m + 1], x + n0, n);
    store_row(out + m * n + n0, acc, relu);
  }
}
#else
constexpr bool kMatmulBuilt = false;
void rows64_f32(const float*, const float*, const int32_t*, const int32_t*, const float*, float*,
                int64_t, bool, int64_t, int64_t, int64_t) {}
#endif
}  // namespace cvsparse::cpu::avx512

CVSPARSE_SIMD_BEGIN
namespace cvsparse::cpu {
namespace {

template <typename scalar_t>
struct MatmulArgs {
  const scalar_t* x;
  const scalar_t* values;
  const int32_t* deltas;
  const int32_t* row_ptr;
  const scalar_t* bias;
  scalar_t* out;
  int64_t n;  // lanes (columns of input and out)
  bool relu;
  bool avx512;  // float32 blocks of 64 lanes may use avx512::rows64_f32
};

// Rows [m0, m1) over lanes [n0, n0 + kSteps * kStep): kSteps * kParts vector accumulators.
template <typename scalar_t, int kSteps>
void rows_vector(const MatmulArgs<scalar_t>& a, int64_t m0, int64_t m1, int64_t n0) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using OVec = typename L::OVec;
  constexpr int kParts = L::kParts;
  constexpr int64_t kStep = L::kStep;
  constexpr int kAcc = kSteps * kParts;
  const OVec zero(opmath_t(0));
  for (int64_t m = m0; m < m1; ++m) {
    OVec acc[kAcc];
    const OVec init(a.bias ? static_cast<opmath_t>(a.bias[m]) : opmath_t(0));
    for (int k = 0; k < kAcc; ++k) {
      acc[k] = init;
    }
    const scalar_t* p = a.x + n0;
    const int32_t end = a.row_ptr[m + 1];
    for (int32_t i = a.row_ptr[m]; i < end; ++i) {
      p += static_cast<int64_t>(a.deltas[i]) * a.n;
      const OVec w(static_cast<opmath_t>(a.values[i]));
      for (int s = 0; s < kSteps; ++s) {
        OVec xv[kParts];
        L::load(p + s * kStep, xv);
        for (int part = 0; part < kParts; ++part) {
          acc[s * kParts + part] = at::vec::fmadd(w, xv[part], acc[s * kParts + part]);
        }
      }
    }
    if (a.relu) {
      for (int k = 0; k < kAcc; ++k) {
        acc[k] = at::vec::maximum(acc[k], zero);
      }
    }
    scalar_t* o = a.out + m * a.n + n0;
    for (int s = 0; s < kSteps; ++s) {
      L::store(o + s * kStep, acc + s * kParts);
    }
  }
}

// Rows [m0, m1) over lanes [n0, n0 + count), count < one vector step: scalar accumulators.
template <typename scalar_t>
void rows_scalar(const MatmulArgs<scalar_t>& a, int64_t m0, int64_t m1, int64_t n0,
                 int64_t count) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t n = a.n;
  for (int64_t m = m0; m < m1; ++m) {
    const int32_t begin = a.row_ptr[m];
    const int32_t end = a.row_ptr[m + 1];
    const opmath_t b = a.bias ? static_cast<opmath_t>(a.bias[m]) : opmath_t(0);
    for (int64_t lane = n0; lane < n0 + count; ++lane) {
      // Four independent sums hide the multiply-add latency.
      opmath_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      const scalar_t* p = a.x + lane;
      int32_t i = begin;
      for (; i + 4 <= end; i += 4) {
        p += static_cast<int64_t>(a.deltas[i]) * n;
        s0 += static_cast<opmath_t>(a.values[i]) * static_cast<opmath_t>(*p);
        p += static_cast<int64_t>(a.deltas[i + 1]) * n;
        s1 += static_cast<opmath_t>(a.values[i + 1]) * static_cast<opmath_t>(*p);
        p += static_cast<int64_t>(a.deltas[i + 2]) * n;
        s2 += static_cast<opmath_t>(a.values[i + 2]) * static_cast<opmath_t>(*p);
        p += static_cast<int64_t>(a.deltas[i + 3]) * n;
        s3 += static_cast<opmath_t>(a.values[i + 3]) * static_cast<opmath_t>(*p);
      }
      for (; i < end; ++i) {
        p += static_cast<int64_t>(a.deltas[i]) * n;
        s0 += static_cast<opmath_t>(a.values[i]) * static_cast<opmath_t>(*p);
      }
      opmath_t v = b + ((s0 + s1) + (s2 + s3));
      if (a.relu) {
        v = v > opmath_t(0) || v != v ? v : opmath_t(0);  // NaN passes, like torch.relu
      }
      a.out[m * n + lane] = static_cast<scalar_t>(v);
    }
  }
}

// Rows [m0, m1) over lanes [n0, n1): whole blocks of kBlockSteps steps, then the remaining
// whole steps one size down at a time, then the scalar tail.
template <typename scalar_t, int kBlockSteps>
void rows_lanes(const MatmulArgs<scalar_t>& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int64_t kStep = Lanes<scalar_t>::kStep;
  int64_t n = n0;
  if constexpr (std::is_same_v<scalar_t, float> && avx512::kMatmulBuilt &&
                kBlockSteps * kStep == 64) {
    if (a.avx512) {
      for (; n + 64 <= n1; n += 64) {
        avx512::rows64_f32(a.x, a.values, a.deltas, a.row_ptr, a.bias, a.out, a.n, a.relu, m0,
                           m1, n);
      }
    }
  }
  for (; n + kBlockSteps * kStep <= n1; n += kBlockSteps * kStep) {
    rows_vector<scalar_t, kBlockSteps>(a, m0, m1, n);
  }
  if constexpr (kBlockSteps >= 4) {
    if (n + 4 * kStep <= n1) {
      rows_vector<scalar_t, 4>(a, m0, m1, n);
      n += 4 * kStep;
    }
  }
  if constexpr (kBlockSteps >= 2) {
    if (n + 2 * kStep <= n1) {
      rows_vector<scalar_t, 2>(a, m0, m1, n);
      n += 2 * kStep;
    }
  }
  if (n + kStep <= n1) {
    rows_vector<scalar_t, 1>(a, m0, m1, n);
    n += kStep;
  }
  if (n < n1) {
    rows_scalar<scalar_t>(a, m0, m1, n, n1 - n);
  }
}

// The (K, N) lanes of an input given as the transpose of a contiguous (N, K) `rows`.
template <typename scalar_t>
const scalar_t* lanes_from_rows(const at::Tensor& input) {
  constexpr int64_t kTile = 8;
  const int64_t k = input.size(0);
  const int64_t n = input.size(1);
  thread_local std::vector<unsigned char> scratch;
  const size_t bytes = static_cast<size_t>(k * n) * sizeof(scalar_t);
  if (scratch.size() < bytes) {
    scratch.resize(bytes);
  }
  auto* dst = reinterpret_cast<scalar_t*>(scratch.data());
  const scalar_t* src = input.const_data_ptr<scalar_t>();  // row r, column c at src[r * k + c]
  const int64_t n_tiles = n / kTile * kTile;
  const int64_t k_tiles = k / kTile * kTile;
  // Bands of kTile output rows (input columns), each written front to back: the band's
  // input lines stay in L1 for the next band, which reads their other half.
  for (int64_t c = 0; c < k_tiles; c += kTile) {
    for (int64_t r = 0; r < n_tiles; r += kTile) {
      at::vec::transpose_mxn<scalar_t, kTile, kTile>(src + r * k + c, k, dst + c * n + r, n);
    }
    for (int64_t r = n_tiles; r < n; ++r) {
      for (int64_t i = c; i < c + kTile; ++i) {
        dst[i * n + r] = src[r * k + i];
      }
    }
  }
  for (int64_t c = k_tiles; c < k; ++c) {
    for (int64_t r = 0; r < n; ++r) {
      dst[c * n + r] = src[r * k + c];
    }
  }
  return dst;
}

template <typename scalar_t>
void sparse_matmul_kernel(const MatmulArgs<scalar_t>& a, int64_t rows, int64_t nnz,
                          int64_t inline_work) {
  using L = Lanes<scalar_t>;
  // Eight vector accumulators per block: float32 64 lanes, float64 32, float16/bfloat16 64.
  constexpr int kBlockSteps = 8 / L::kParts;
  constexpr int64_t kBlock = kBlockSteps * L::kStep;
  const int64_t n = a.n;
  const int64_t blocks = std::max<int64_t>(1, (n + kBlock - 1) / kBlock);
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::clamp<int64_t>(
      (threads * sparse::kTasksPerThread + blocks - 1) / blocks, 1, std::max<int64_t>(rows, 1));
  const int64_t tasks = chunks * blocks;
  const bool small = (nnz + rows) * n < inline_work;
  at::parallel_for(0, tasks, small ? tasks : 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / blocks;
      const int64_t blk = t % blocks;
      const int64_t m0 = sparse::chunk_begin(a.row_ptr, rows, r, chunks);
      const int64_t m1 = sparse::chunk_begin(a.row_ptr, rows, r + 1, chunks);
      const int64_t n0 = blk * kBlock;
      rows_lanes<scalar_t, kBlockSteps>(a, m0, m1, n0, std::min(n, n0 + kBlock));
    }
  });
}

at::Tensor sparse_matmul_cpu(const at::Tensor& input, const at::Tensor& values,
                             const at::Tensor& col_deltas, const at::Tensor& row_ptr,
                             const std::optional<at::Tensor>& bias, bool relu) {
  TORCH_CHECK(input.dim() == 2, "input must be a (K, N) matrix");
  const bool transposed = !input.is_contiguous();
  TORCH_CHECK(!transposed || (input.stride(0) == 1 && input.stride(1) == input.size(0)),
              "input must be a contiguous (K, N), or the transpose of a contiguous (N, K)");
  TORCH_CHECK(values.scalar_type() == input.scalar_type(), "values must have input's dtype");
  sparse::check_packed(values, col_deltas, row_ptr, input.size(0));
  const int64_t rows = row_ptr.numel() - 1;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == input.scalar_type() && bias->is_contiguous() &&
                    bias->numel() == rows,
                "bias must be a contiguous (M,) tensor of input's dtype");
  }
  auto out = at::empty({rows, input.size(1)}, input.options());
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "sparse_matmul", [&] {
    const MatmulArgs<scalar_t> args{
        transposed ? lanes_from_rows<scalar_t>(input) : input.const_data_ptr<scalar_t>(),
        values.data_ptr<scalar_t>(),
        col_deltas.data_ptr<int32_t>(), row_ptr.data_ptr<int32_t>(),
        bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
        out.data_ptr<scalar_t>(), input.size(1), relu, sparse::avx512_usable()};
    sparse_matmul_kernel<scalar_t>(args, rows, values.numel(),
                                   transposed ? sparse::kInlineTransposedWork
                                              : sparse::kInlineWork);
  });
  return out;
}

}  // namespace
}  // namespace cvsparse::cpu
CVSPARSE_SIMD_END

TORCH_LIBRARY_IMPL(cvsparse, CPU, m) {
  if (cvsparse::cpu::simd_supported()) {
    m.impl("sparse_matmul", &cvsparse::cpu::sparse_matmul_cpu);
  }
}
