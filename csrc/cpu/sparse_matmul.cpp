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
#include <torch/library.h>

#include "sparse_common.h"

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

template <typename scalar_t>
void sparse_matmul_kernel(const MatmulArgs<scalar_t>& a, int64_t rows, int64_t nnz) {
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
  const bool small = (nnz + rows) * n < sparse::kInlineWork;
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
  TORCH_CHECK(input.dim() == 2 && input.is_contiguous(), "input must be a contiguous (K, N)");
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
        input.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(),
        col_deltas.data_ptr<int32_t>(), row_ptr.data_ptr<int32_t>(),
        bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
        out.data_ptr<scalar_t>(), input.size(1), relu};
    sparse_matmul_kernel<scalar_t>(args, rows, values.numel());
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
