// sparse_conv2d on CPU: direct convolution (groups 1, zero padding) with a weight packed per
// output channel (columns = flattened (c, i, j) of a C x kh x kw filter), bias and ReLU fused.
//
// No im2col.  Each image is first copied, in the math type, into a zero-padded buffer split
// into stride phases: plane (a, b) of channel c holds padded pixels (r·sh + a, t·sw + b) for
// r < Hq = Ho + (kh − 1) / sh, t < Wq = Wo + (kw − 1) / sw.  Output pixel (oh, ow) then reads
// tap (c, i, j) at
//     c·sh·sw·Hq·Wq + ((i mod sh)·sw + j mod sw)·Hq·Wq + (oh + i / sh)·Wq + (ow + j / sw),
// i.e. at offset(c, i, j) + q with q = oh·Wq + ow: over the "wide" output grid q in [0, Ho·Wq)
// every nonzero weight is one fixed offset, and a run of consecutive q is one contiguous load.
// A convolution becomes, per output channel, a sum over its nonzeros of value x shifted input
// vector — the sparse_matmul inner loop with offsets instead of rows.  Lanes with ow >= Wo (the
// wide grid's extra columns) are computed and dropped; the buffer has slack so that a last,
// partial block of lanes never reads out of bounds.
//
// Tasks are (image, chunk of output channels), image-major; a thread copies an image into its
// buffer when it starts on it (once per image and thread), then, block of lanes by block of
// lanes, runs every channel of its chunk over the block (its input window stays in L1).  The
// nonzeros' offsets are decoded once per weight and geometry and kept (sparse::IndexCache);
// image buffers are thread-local and only grow: nothing is allocated per call once the
// largest layer has run.
#include <immintrin.h>
#include <torch/library.h>

#include "sparse_common.h"

// float32 blocks on CPUs with AVX-512 (and ATen allowed to use it): 16 lanes per register, so a
// block of 64 lanes takes four multiply-adds per nonzero instead of eight.  Compiled for
// AVX-512F by function attribute, called only after the run-time check below.
namespace cvsparse::cpu::avx512 {
#if CVSPARSE_AVX2
constexpr bool kBuilt = true;

// tmp[0, 16·kZ) = bias + Σ_i values[i] · base[offsets[i] + lane], then ReLU (NaN kept).
template <int kZ>
__attribute__((target("avx512f"))) void conv_block_f32(const float* base,
                                                        const int64_t* offsets,
                                                        const float* values, int64_t nnz,
                                                        float bias, bool relu, float* tmp) {
  __m512 acc[kZ];
  for (int k = 0; k < kZ; ++k) {
    acc[k] = _mm512_set1_ps(bias);
  }
  for (int64_t i = 0; i < nnz; ++i) {
    const __m512 w = _mm512_set1_ps(values[i]);
    const float* p = base + offsets[i];
    for (int k = 0; k < kZ; ++k) {
      acc[k] = _mm512_fmadd_ps(w, _mm512_loadu_ps(p + 16 * k), acc[k]);
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int k = 0; k < kZ; ++k) {
    // max(0, x) returns its second operand x when x is NaN, like torch.relu.
    _mm512_storeu_ps(tmp + 16 * k, relu ? _mm512_max_ps(zero, acc[k]) : acc[k]);
  }
}

// Two output channels at once (2·kZ independent accumulator chains hide the multiply-add
// latency): tmp_a / tmp_b as conv_block_f32 for channels a and b.
template <int kZ>
__attribute__((target("avx512f"))) void conv_block2_f32(
    const float* base, const int64_t* off_a, const float* val_a, int64_t nnz_a, float bias_a,
    const int64_t* off_b, const float* val_b, int64_t nnz_b, float bias_b, bool relu,
    float* tmp_a, float* tmp_b) {
  __m512 acc_a[kZ], acc_b[kZ];
  for (int k = 0; k < kZ; ++k) {
    acc_a[k] = _mm512_set1_ps(bias_a);
    acc_b[k] = _mm512_set1_ps(bias_b);
  }
  const int64_t both = std::min(nnz_a, nnz_b);
  for (int64_t i = 0; i < both; ++i) {
    const __m512 wa = _mm512_set1_ps(val_a[i]);
    const __m512 wb = _mm512_set1_ps(val_b[i]);
    const float* pa = base + off_a[i];
    const float* pb = base + off_b[i];
    for (int k = 0; k < kZ; ++k) {
      acc_a[k] = _mm512_fmadd_ps(wa, _mm512_loadu_ps(pa + 16 * k), acc_a[k]);
      acc_b[k] = _mm512_fmadd_ps(wb, _mm512_loadu_ps(pb + 16 * k), acc_b[k]);
    }
  }
  for (int64_t i = both; i < nnz_a; ++i) {
    const __m512 w = _mm512_set1_ps(val_a[i]);
    const float* p = base + off_a[i];
    for (int k = 0; k < kZ; ++k) {
      acc_a[k] = _mm512_fmadd_ps(w, _mm512_loadu_ps(p + 16 * k), acc_a[k]);
    }
  }
  for (int64_t i = both; i < nnz_b; ++i) {
    const __m512 w = _mm512_set1_ps(val_b[i]);
    const float* p = base + off_b[i];
    for (int k = 0; k < kZ; ++k) {
      acc_b[k] = _mm512_fmadd_ps(w, _mm512_loadu_ps(p + 16 * k), acc_b[k]);
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int k = 0; k < kZ; ++k) {
    _mm512_storeu_ps(tmp_a + 16 * k, relu ? _mm512_max_ps(zero, acc_a[k]) : acc_a[k]);
    _mm512_storeu_ps(tmp_b + 16 * k, relu ? _mm512_max_ps(zero, acc_b[k]) : acc_b[k]);
  }
}

#else
constexpr bool kBuilt = false;
template <int kZ>
void conv_block_f32(const float*, const int64_t*, const float*, int64_t, float, bool, float*) {}
template <int kZ>
void conv_block2_f32(const float*, const int64_t*, const float*, int64_t, float, const int64_t*,
                     const float*, int64_t, float, bool, float*, float*) {}
#endif
}  // namespace cvsparse::cpu::avx512

CVSPARSE_SIMD_BEGIN
namespace cvsparse::cpu {
namespace {

struct ConvGeometry {
  int64_t batch, channels, height, width, rows;  // rows = output channels M
  int64_t kh, kw, sh, sw, ph, pw, out_h, out_w;
  int64_t hq, wq;  // rows and columns of one stride-phase plane
  bool avx512;     // float32 blocks may use AVX-512
  int64_t plane() const { return hq * wq; }
  int64_t channel_stride() const { return sh * sw * plane(); }
  int64_t lanes() const { return out_h * wq; }  // the wide output grid of one image
};

template <typename opmath_t>
constexpr int64_t kVec = at::vec::Vectorized<opmath_t>::size();
// Vector accumulators per block of lanes.
constexpr int kMaxAcc = 8;

// Copies image b into buf (channel-major, stride phases, zero padding), in opmath_t.
template <typename scalar_t, typename opmath_t>
void pack_image(const scalar_t* x, const ConvGeometry& g, opmath_t* buf) {
  for (int64_t c = 0; c < g.channels; ++c) {
    const scalar_t* src = x + c * g.height * g.width;
    for (int64_t a = 0; a < g.sh; ++a) {
      for (int64_t b = 0; b < g.sw; ++b) {
        opmath_t* dst = buf + c * g.channel_stride() + (a * g.sw + b) * g.plane();
        for (int64_t r = 0; r < g.hq; ++r) {
          opmath_t* row = dst + r * g.wq;
          const int64_t ih = r * g.sh + a - g.ph;
          if (ih < 0 || ih >= g.height) {
            std::fill(row, row + g.wq, opmath_t(0));
            continue;
          }
          const scalar_t* in = src + ih * g.width;
          if (g.sw == 1) {
            // t covers padded columns t + b = t; input column t − pw.
            const int64_t lo = std::min(g.wq, g.pw);
            const int64_t hi = std::clamp<int64_t>(g.pw + g.width, lo, g.wq);
            std::fill(row, row + lo, opmath_t(0));
            for (int64_t t = lo; t < hi; ++t) {
              row[t] = static_cast<opmath_t>(in[t - g.pw]);
            }
            std::fill(row + hi, row + g.wq, opmath_t(0));
          } else {
            for (int64_t t = 0; t < g.wq; ++t) {
              const int64_t iw = t * g.sw + b - g.pw;
              row[t] = iw >= 0 && iw < g.width ? static_cast<opmath_t>(in[iw]) : opmath_t(0);
            }
          }
        }
      }
    }
  }
}

// Lanes [q0, q0 + count) of one output channel, computed into tmp: lane q is pixel
// (q / wq, q % wq); the runs with ow < out_w are stored.
template <typename scalar_t, typename opmath_t>
void store_block(const opmath_t* tmp, const ConvGeometry& g, int64_t q0, int64_t count,
                 scalar_t* out) {
  const int64_t q1 = std::min(q0 + count, g.lanes());
  int64_t oh = q0 / g.wq;
  int64_t ow = q0 % g.wq;
  for (int64_t q = q0; q < q1;) {
    const int64_t run = std::min(g.out_w - ow, q1 - q);
    if (run > 0) {
      scalar_t* o = out + oh * g.out_w + ow;
      const opmath_t* s = tmp + (q - q0);
      for (int64_t k = 0; k < run; ++k) {
        o[k] = static_cast<scalar_t>(s[k]);
      }
    }
    q += g.wq - ow;
    ow = 0;
    ++oh;
  }
}

// kAcc vectors of lanes [q0, q0 + kAcc·kVec) of one output channel, then bias/ReLU and the
// store of the lanes that are real output pixels.
template <typename scalar_t, typename opmath_t, int kAcc>
void channel_block(const opmath_t* buf, const int64_t* offsets, const scalar_t* values,
                   int64_t nnz, opmath_t bias, bool relu, const ConvGeometry& g, int64_t q0,
                   scalar_t* out) {
  using Vec = at::vec::Vectorized<opmath_t>;
  constexpr int64_t kW = kVec<opmath_t>;
  __at_align__ opmath_t tmp[kMaxAcc * kW];
  bool done = false;
  if constexpr (std::is_same_v<scalar_t, float> && avx512::kBuilt) {
    if (g.avx512) {
      avx512::conv_block_f32<(kAcc + 1) / 2>(buf + q0, offsets, values, nnz, bias, relu, tmp);
      done = true;
    }
  }
  if (!done) {
    Vec acc[kAcc];
    for (int k = 0; k < kAcc; ++k) {
      acc[k] = Vec(bias);
    }
    const opmath_t* base = buf + q0;
    for (int64_t i = 0; i < nnz; ++i) {
      const Vec w(static_cast<opmath_t>(values[i]));
      const opmath_t* p = base + offsets[i];
      for (int k = 0; k < kAcc; ++k) {
        acc[k] = at::vec::fmadd(w, Vec::loadu(p + k * kW), acc[k]);
      }
    }
    if (relu) {
      const Vec zero(opmath_t(0));
      for (int k = 0; k < kAcc; ++k) {
        acc[k] = at::vec::maximum(acc[k], zero);
      }
    }
    for (int k = 0; k < kAcc; ++k) {
      acc[k].store(tmp + k * kW);
    }
  }
  store_block<scalar_t, opmath_t>(tmp, g, q0, kAcc * kW, out);
}

// Output channels [m0, m1) of one image over kAcc vectors of lanes from q0: the block's input
// window (a few rows of every channel plane) stays in L1 while the channels sweep over it.
template <typename scalar_t, typename opmath_t, int kAcc>
void rows_block(const opmath_t* buf, const int64_t* offsets, const scalar_t* values,
                const int32_t* ptr, const scalar_t* bias, bool relu, const ConvGeometry& g,
                int64_t m0, int64_t m1, int64_t q0, scalar_t* out) {
  const int64_t pixels = g.out_h * g.out_w;
  int64_t m = m0;
  if constexpr (std::is_same_v<scalar_t, float> && avx512::kBuilt) {
    if (g.avx512) {
      constexpr int64_t kW = kVec<opmath_t>;
      __at_align__ float tmp_a[kMaxAcc * kW];
      __at_align__ float tmp_b[kMaxAcc * kW];
      for (; m + 1 < m1; m += 2) {
        const int64_t a = ptr[m], b = ptr[m + 1], e = ptr[m + 2];
        avx512::conv_block2_f32<(kAcc + 1) / 2>(
            buf + q0, offsets + a, values + a, b - a, bias ? bias[m] : 0.0f, offsets + b,
            values + b, e - b, bias ? bias[m + 1] : 0.0f, relu, tmp_a, tmp_b);
        store_block<scalar_t, opmath_t>(tmp_a, g, q0, kAcc * kW, out + m * pixels);
        store_block<scalar_t, opmath_t>(tmp_b, g, q0, kAcc * kW, out + (m + 1) * pixels);
      }
    }
  }
  for (; m < m1; ++m) {
    const int64_t begin = ptr[m];
    const opmath_t bm = bias ? static_cast<opmath_t>(bias[m]) : opmath_t(0);
    channel_block<scalar_t, opmath_t, kAcc>(buf, offsets + begin, values + begin,
                                            ptr[m + 1] - begin, bm, relu, g, q0,
                                            out + m * pixels);
  }
}

template <typename scalar_t, typename opmath_t>
void channel_rows(const opmath_t* buf, const int64_t* offsets, const scalar_t* values, const int32_t* ptr,
          const scalar_t* bias, bool relu, const ConvGeometry& g, int64_t m0, int64_t m1,
          scalar_t* out) {
  constexpr int64_t kW = kVec<opmath_t>;
  const int64_t lanes = g.lanes();
  int64_t q = 0;
  for (; q + kMaxAcc * kW <= lanes; q += kMaxAcc * kW) {
    rows_block<scalar_t, opmath_t, kMaxAcc>(buf, offsets, values, ptr, bias, relu, g, m0, m1, q,
                                            out);
  }
  const int64_t rest = (lanes - q + kW - 1) / kW;  // vectors left, <= kMaxAcc
  switch (rest) {
#define CVSPARSE_REST(n)                                                                     \
  case n:                                                                                    \
    rows_block<scalar_t, opmath_t, n>(buf, offsets, values, ptr, bias, relu, g, m0, m1, q, \
                                      out);                                                  \
    break;
    CVSPARSE_REST(1)
    CVSPARSE_REST(2)
    CVSPARSE_REST(3)
    CVSPARSE_REST(4)
    CVSPARSE_REST(5)
    CVSPARSE_REST(6)
    CVSPARSE_REST(7)
    CVSPARSE_REST(8)
#undef CVSPARSE_REST
    default:
      break;
  }
}

// The input offset of every nonzero for geometry g (see the file comment).
sparse::IndexCache::Table decode_offsets(const int32_t* deltas, const int32_t* ptr, int64_t rows,
                                         const ConvGeometry& g) {
  const int64_t taps = g.kh * g.kw;
  std::vector<int64_t> tap(taps);
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      tap[i * g.kw + j] =
          ((i % g.sh) * g.sw + j % g.sw) * g.plane() + (i / g.sh) * g.wq + j / g.sw;
    }
  }
  sparse::IndexCache::Table offsets(ptr[rows]);
  for (int64_t m = 0; m < rows; ++m) {
    int64_t col = 0;
    for (int64_t i = ptr[m]; i < ptr[m + 1]; ++i) {
      col += deltas[i];
      const int64_t c = col / taps;
      offsets[i] = c * g.channel_stride() + tap[col - c * taps];
    }
  }
  return offsets;
}

sparse::IndexCache& offset_cache() {
  static sparse::IndexCache cache;
  return cache;
}

template <typename scalar_t>
void sparse_conv2d_kernel(const at::Tensor& input, const at::Tensor& values,
                          const at::Tensor& col_deltas, const at::Tensor& row_ptr,
                          const scalar_t* bias, bool relu, const ConvGeometry& g,
                          at::Tensor& out) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int64_t kW = kVec<opmath_t>;
  const scalar_t* x = input.data_ptr<scalar_t>();
  const scalar_t* vals = values.data_ptr<scalar_t>();
  const int32_t* ptr = row_ptr.data_ptr<int32_t>();
  scalar_t* y = out.data_ptr<scalar_t>();
  const int64_t rows = g.rows;
  const auto table = offset_cache().get(
      col_deltas, row_ptr, {g.channels, g.kh, g.kw, g.sh, g.sw, g.hq, g.wq, 0}, [&] {
        return decode_offsets(col_deltas.data_ptr<int32_t>(), ptr, rows, g);
      });
  const int64_t* offsets = table->data();
  const int64_t image = g.channels * g.height * g.width;
  const int64_t out_image = rows * g.out_h * g.out_w;
  // The last block of lanes reads up to kMaxAcc vectors past the wide grid, plus the largest
  // within-plane shift: the slack keeps those reads inside the buffer (zeros, never stored).
  const int64_t buffer = g.channels * g.channel_stride() + kMaxAcc * kW + g.wq + g.kw + g.hq;
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::clamp<int64_t>(
      (threads * sparse::kTasksPerThread + g.batch - 1) / g.batch, 1, std::max<int64_t>(rows, 1));
  const int64_t tasks = g.batch * chunks;
  const int64_t work = (values.numel() + rows) * g.lanes() * g.batch;
  at::parallel_for(0, tasks, work < sparse::kInlineWork ? tasks : 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<opmath_t> buf;
    if (static_cast<int64_t>(buf.size()) < buffer) {
      buf.resize(buffer);
    }
    std::fill(buf.begin() + g.channels * g.channel_stride(), buf.begin() + buffer, opmath_t(0));
    int64_t packed = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks;
      const int64_t r = t % chunks;
      if (b != packed) {
        pack_image<scalar_t, opmath_t>(x + b * image, g, buf.data());
        packed = b;
      }
      channel_rows<scalar_t, opmath_t>(buf.data(), offsets, vals, ptr, bias, relu, g,
                               sparse::chunk_begin(ptr, rows, r, chunks),
                               sparse::chunk_begin(ptr, rows, r + 1, chunks),
                               y + b * out_image);
    }
  });
}

at::Tensor sparse_conv2d_cpu(const at::Tensor& input, const at::Tensor& values,
                             const at::Tensor& col_deltas, const at::Tensor& row_ptr,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding, bool relu) {
  TORCH_CHECK(input.dim() == 4 && input.is_contiguous(),
              "input must be a contiguous (B, C, H, W)");
  TORCH_CHECK(values.scalar_type() == input.scalar_type(), "values must have input's dtype");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2,
              "kernel_size, stride and padding must be pairs");
  ConvGeometry g{};
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.rows = row_ptr.numel() - 1;
  g.kh = kernel_size[0];
  g.kw = kernel_size[1];
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  TORCH_CHECK(g.kh >= 1 && g.kw >= 1 && g.sh >= 1 && g.sw >= 1 && g.ph >= 0 && g.pw >= 0,
              "kernel_size and stride must be >= 1, padding >= 0");
  TORCH_CHECK(g.height + 2 * g.ph >= g.kh && g.width + 2 * g.pw >= g.kw,
              "the padded input is smaller than the kernel");
  sparse::check_packed(values, col_deltas, row_ptr, g.channels * g.kh * g.kw);
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == input.scalar_type() && bias->is_contiguous() &&
                    bias->numel() == g.rows,
                "bias must be a contiguous (M,) tensor of input's dtype");
  }
  g.out_h = (g.height + 2 * g.ph - g.kh) / g.sh + 1;
  g.out_w = (g.width + 2 * g.pw - g.kw) / g.sw + 1;
  g.hq = g.out_h + (g.kh - 1) / g.sh;
  g.wq = g.out_w + (g.kw - 1) / g.sw;
  g.avx512 = sparse::avx512_usable();
  auto out = at::empty({g.batch, g.rows, g.out_h, g.out_w}, input.options());
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "sparse_conv2d", [&] {
    sparse_conv2d_kernel<scalar_t>(input, values, col_deltas, row_ptr,
                                   bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, relu,
                                   g, out);
  });
  return out;
}

}  // namespace
}  // namespace cvsparse::cpu
CVSPARSE_SIMD_END

TORCH_LIBRARY_IMPL(cvsparse, CPU, m) {
  if (cvsparse::cpu::simd_supported()) {
    m.impl("sparse_conv2d", &cvsparse::cpu::sparse_conv2d_cpu);
  }
}
