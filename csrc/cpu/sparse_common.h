// Shared pieces of the sparse inference kernels (sparse_matmul.cpp, sparse_conv2d.cpp).
//
// The weight W (M x K) is packed per output row (cvsparse/ops/sparse_format.py): values,
// col_deltas (a row's first column, then column differences), row_ptr.  Both kernels compute
// one output row at a time over a block of SIMD lanes (batch columns, or output pixels), with
// up to kMaxAcc vector accumulators in registers: per nonzero, one broadcast of the value and
// one fused multiply-add per accumulator, each loading a contiguous run of the activations.
// Work is split into tasks (row chunks x lane blocks, or images x row chunks) run by a single
// at::parallel_for; row chunks are balanced by nonzeros + rows, not by rows.
#pragma once

#include <array>
#include <memory>
#include <mutex>

#include "common.h"

namespace cvsparse::cpu::sparse {

// Below this many multiply-adds a call runs on the calling thread: waking the pool costs more.
constexpr int64_t kInlineWork = 1 << 16;
// The same for sparse_matmul on a transposed batch, which the calling thread copies into its
// own buffer: other threads must pull that buffer across cores, and the next call's copy push
// it back; below this many multiply-adds that costs more than the second thread saves
// (LeNet-300-100's first layer at batch 64, 0.27M: 23 µs on one thread, 67 µs on two).
constexpr int64_t kInlineTransposedWork = 1 << 21;
// Tasks per thread when a call is split (threads take contiguous runs of tasks).
constexpr int64_t kTasksPerThread = 4;

// First row of chunk r of `chunks`, balancing row_ptr[m] + m (nonzeros plus a per-row cost).
inline int64_t chunk_begin(const int32_t* row_ptr, int64_t rows, int64_t r, int64_t chunks) {
  if (r <= 0) {
    return 0;
  }
  if (r >= chunks) {
    return rows;
  }
  const int64_t target = (static_cast<int64_t>(row_ptr[rows]) + rows) * r / chunks;
  int64_t lo = 0;
  int64_t hi = rows;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(row_ptr[mid]) + mid < target) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Whether float32 kernels may use AVX-512 (compiled by function attribute where the build
// targets x86 with GCC): the CPU has it and ATen's dispatch level allows it
// (ATEN_CPU_CAPABILITY=avx2 turns it off, as for ATen's own kernels).
inline bool avx512_usable() {
#if CVSPARSE_AVX2
  static const bool ok = __builtin_cpu_supports("avx512f") &&
                         at::get_cpu_capability() == std::string("AVX512");
  return ok;
#else
  return false;
#endif
}

// Tables derived from a packed weight's indices (e.g. the input offset of every nonzero for one
// image geometry), kept across calls: decoding them costs a division per nonzero, as much as a
// batch-1 convolution's arithmetic.  An entry is found again only for the same col_deltas and
// row_ptr tensors (held by weak reference, so their addresses cannot be reused while the entry
// lives), unchanged (same data pointers and version counters; inference tensors, which have
// none, are never cached), and the same key; entries of
// freed weights are dropped, and the least recently used go beyond kMaxEntries.
class IndexCache {
 public:
  using Key = std::array<int64_t, 8>;
  using Table = std::vector<int64_t>;
  static constexpr size_t kMaxEntries = 256;

  template <typename Build>
  std::shared_ptr<const Table> get(const at::Tensor& col_deltas, const at::Tensor& row_ptr,
                                   const Key& key, const Build& build) {
    if (col_deltas.is_inference() || row_ptr.is_inference()) {
      // Inference tensors keep no version counter: a change could not be seen.  No caching.
      return std::make_shared<const Table>(build());
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& e : entries_) {
        if (e.matches(col_deltas, row_ptr, key)) {
          e.last_use = ++clock_;
          return e.table;
        }
      }
    }
    auto table = std::make_shared<const Table>(build());
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                  [](const Entry& e) { return e.deltas.expired() ||
                                                              e.ptr.expired(); }),
                   entries_.end());
    if (entries_.size() >= kMaxEntries) {
      entries_.erase(std::min_element(entries_.begin(), entries_.end(),
                                      [](const Entry& a, const Entry& b) {
                                        return a.last_use < b.last_use;
                                      }));
    }
    entries_.push_back(Entry{Weak(col_deltas.getIntrusivePtr()), Weak(row_ptr.getIntrusivePtr()),
                             col_deltas._version(), row_ptr._version(),
                             col_deltas.const_data_ptr(), row_ptr.const_data_ptr(), key, table,
                             ++clock_});
    return table;
  }

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    Weak deltas;
    Weak ptr;
    int64_t deltas_version;
    int64_t ptr_version;
    const void* deltas_data;
    const void* ptr_data;
    Key key;
    std::shared_ptr<const Table> table;
    uint64_t last_use;

    bool matches(const at::Tensor& d, const at::Tensor& p, const Key& k) const {
      return !deltas.expired() && !ptr.expired() &&
             deltas._unsafe_get_target() == d.unsafeGetTensorImpl() &&
             ptr._unsafe_get_target() == p.unsafeGetTensorImpl() &&
             deltas_version == d._version() && ptr_version == p._version() &&
             deltas_data == d.const_data_ptr() && ptr_data == p.const_data_ptr() && key == k;
    }
  };
  std::mutex mutex_;
  std::vector<Entry> entries_;
  uint64_t clock_ = 0;
};

// Memory-safety invariants of a packed weight with `cols` columns (the Python layer checks the
// same with friendlier messages): row_ptr[0] = 0, nondecreasing, ends at nnz; deltas >= 0 and
// every row's last column < cols.  The metadata is checked on every call; the pass over the
// indices only the first time a weight is seen with `cols` (validated_cache: the same
// col_deltas and row_ptr tensors, unchanged since), since at batch 1 it costs as much as the
// product itself.
inline IndexCache& validated_cache() {
  static IndexCache cache;
  return cache;
}

inline void check_packed(const at::Tensor& values, const at::Tensor& col_deltas,
                         const at::Tensor& row_ptr, int64_t cols) {
  TORCH_CHECK(values.dim() == 1 && col_deltas.dim() == 1 && row_ptr.dim() == 1,
              "values, col_deltas and row_ptr must be 1-D");
  TORCH_CHECK(values.is_contiguous() && col_deltas.is_contiguous() && row_ptr.is_contiguous(),
              "values, col_deltas and row_ptr must be contiguous");
  TORCH_CHECK(col_deltas.scalar_type() == at::kInt && row_ptr.scalar_type() == at::kInt,
              "col_deltas and row_ptr must be int32");
  TORCH_CHECK(row_ptr.numel() >= 1, "row_ptr must have M + 1 >= 1 entries");
  TORCH_CHECK(col_deltas.numel() == values.numel(), "col_deltas and values differ in length");
  const int32_t* ptr = row_ptr.data_ptr<int32_t>();
  const int32_t* d = col_deltas.data_ptr<int32_t>();
  const int64_t rows = row_ptr.numel() - 1;
  TORCH_CHECK(ptr[0] == 0 && ptr[rows] == values.numel(),
              "row_ptr must start at 0 and end at the number of values");
  validated_cache().get(col_deltas, row_ptr, IndexCache::Key{cols, 0, 0, 0, 0, 0, 0, 0}, [&] {
    for (int64_t m = 0; m < rows; ++m) {
      TORCH_CHECK(ptr[m] <= ptr[m + 1], "row_ptr decreases at row ", m);
      int64_t col = 0;
      int32_t negative = 0;
      for (int32_t i = ptr[m]; i < ptr[m + 1]; ++i) {
        col += d[i];
        negative |= d[i];
      }
      TORCH_CHECK(negative >= 0 && (ptr[m] == ptr[m + 1] || col < cols),
                  "col_deltas of row ", m, " leave the ", cols, " columns");
    }
    return IndexCache::Table{};
  });
}

}  // namespace cvsparse::cpu::sparse
