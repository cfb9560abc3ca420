// Multi-tensor chunking shared by every CUDA list kernel of cvsparse.
//
// A list operator updates all tensors of a model in a handful of launches instead of one launch
// per tensor.  Every non-empty tensor is cut into chunks of kChunkSize elements; each CUDA block
// processes one (tensor, chunk) pair.  The host walks the lists once and packs, per launch, the
// tensors' base addresses and sizes plus a block -> (tensor slot, chunk) table into a
// ChunkMetadata struct passed by value (a __grid_constant__ kernel parameter, read in place).
// The struct stays below the classic 4 KB kernel-parameter limit, so long lists take several
// launches; a tensor whose chunks straddle two launches is simply carried over as slot 0.
//
// Blocks are numbered globally across launches (ChunkMetadata::first_block + blockIdx.x), in
// list order and chunk order.  A reduction that writes one partial per block therefore finds
// the partials of list entry l in one contiguous range (see chunk_offsets()).
//
// Element -> thread mapping: inside a chunk, thread t owns the groups of kILP consecutive
// elements starting at t*kILP, t*kILP + kBlockSize*kILP, ...  A group is moved with one vector
// load/store when every pointer of the block is aligned to kILP elements and the group is whole,
// element by element otherwise.  The mapping is the same on both paths, so per-thread sums (and
// hence every reduction) do not depend on the alignment of the tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace cvsparse::cuda {

constexpr int kBlockSize = 512;        // threads per block of a chunked launch
constexpr int kILP = 4;                // elements per thread per step (one vector access)
constexpr int64_t kChunkSize = 65536;  // elements per (tensor, chunk) block
constexpr int kMaxBlocksPerLaunch = 320;
constexpr int kWarpSize = 32;
static_assert(kChunkSize % (kBlockSize * kILP) == 0, "a chunk is a whole number of block steps");
static_assert(kBlockSize % kWarpSize == 0, "block reductions assume whole warps");

// Tensors per launch for a given number of parallel lists, sized so ChunkMetadata stays well
// under 4 KB (room is left for the operator's own arguments).
template <int Depth>
struct ListCapacity;
template <>
struct ListCapacity<1> {
  static constexpr int value = 96;
};
template <>
struct ListCapacity<2> {
  static constexpr int value = 64;
};
template <>
struct ListCapacity<3> {
  static constexpr int value = 48;
};
template <>
struct ListCapacity<4> {
  static constexpr int value = 36;
};

// Per-launch description of Depth parallel tensor lists (list 0 defines the sizes).
template <int Depth>
struct ChunkMetadata {
  static constexpr int kMaxTensors = ListCapacity<Depth>::value;
  void* addresses[Depth][kMaxTensors];  // nullptr for a list that is absent (empty optional)
  int64_t numel[kMaxTensors];
  int32_t list_index[kMaxTensors];  // position of the slot's tensor in the caller's lists
  uint8_t block_to_slot[kMaxBlocksPerLaunch];
  int32_t block_to_chunk[kMaxBlocksPerLaunch];
  int64_t first_block;  // global number of this launch's block 0
};
static_assert(sizeof(ChunkMetadata<1>) <= 3584, "kernel parameters must fit in 4 KB");
static_assert(sizeof(ChunkMetadata<2>) <= 3584, "kernel parameters must fit in 4 KB");
static_assert(sizeof(ChunkMetadata<3>) <= 3584, "kernel parameters must fit in 4 KB");
static_assert(sizeof(ChunkMetadata<4>) <= 3584, "kernel parameters must fit in 4 KB");
static_assert(ListCapacity<1>::value <= 256, "block_to_slot is a uint8_t");

inline int64_t num_chunks(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

// ---- host: validation of the memory-safety invariants the kernels rely on ------------------

// params: CUDA, contiguous, one device and one dtype.
inline void check_params(const char* op, at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.is_cuda(), op, ": params[", i, "] must be a CUDA tensor, got ", p.device());
    TORCH_CHECK(p.device() == params[0].device(), op, ": params[", i, "] is on ", p.device(),
                " but params[0] is on ", params[0].device());
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), op, ": params[", i, "] has dtype ",
                p.scalar_type(), " but params[0] has ", params[0].scalar_type());
    TORCH_CHECK(p.is_contiguous(), op, ": params[", i, "] must be contiguous");
  }
}

// A list paired one-to-one with params: same length (unless optional and empty), numel, device;
// dtype `dtype` (params' own when nullopt); contiguous.
inline void check_companion(const char* op, const char* name, at::TensorList list,
                            at::TensorList params, bool optional,
                            std::optional<at::ScalarType> dtype = std::nullopt) {
  if (optional && list.empty()) {
    return;
  }
  TORCH_CHECK(list.size() == params.size(), op, ": ", name, " has ", list.size(),
              " tensors but params has ", params.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    const at::ScalarType want = dtype.value_or(params[i].scalar_type());
    TORCH_CHECK(t.device() == params[i].device(), op, ": ", name, "[", i, "] is on ", t.device(),
                " but params[", i, "] is on ", params[i].device());
    TORCH_CHECK(t.scalar_type() == want, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                ", expected ", want);
    TORCH_CHECK(t.numel() == params[i].numel(), op, ": ", name, "[", i, "] has ", t.numel(),
                " elements but params[", i, "] has ", params[i].numel());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
  }
}

// ---- host: batching the (tensor, chunk) pairs into launches ------------------------------

// Calls launch(meta, num_blocks) once per batch of chunks of the non-empty tensors of `lists`
// (list 0 gives the sizes; an empty list is passed as nullptr addresses).
template <int Depth, typename Launch>
void for_each_chunk_batch(const std::array<at::TensorList, Depth>& lists, Launch&& launch) {
  using Meta = ChunkMetadata<Depth>;
  Meta meta{};
  int slot = 0;
  int blocks = 0;
  int64_t first_block = 0;
  const auto flush = [&]() {
    meta.first_block = first_block;
    launch(static_cast<const Meta&>(meta), blocks);
    first_block += blocks;
    blocks = 0;
  };
  for (size_t t = 0; t < lists[0].size(); ++t) {
    const int64_t n = lists[0][t].numel();
    if (n == 0) {
      continue;
    }
    const int64_t chunks = num_chunks(n);
    TORCH_CHECK(chunks <= std::numeric_limits<int32_t>::max(), "tensor ", t, " is too large");
    for (int d = 0; d < Depth; ++d) {
      meta.addresses[d][slot] = lists[d].empty() ? nullptr : lists[d][t].data_ptr();
    }
    meta.numel[slot] = n;
    meta.list_index[slot] = static_cast<int32_t>(t);
    ++slot;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_slot[blocks] = static_cast<uint8_t>(slot - 1);
      meta.block_to_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == kMaxBlocksPerLaunch || (last_chunk && slot == Meta::kMaxTensors)) {
        flush();
        if (last_chunk) {
          slot = 0;
        } else {  // the tensor goes on in the next launch: keep it, as slot 0
          for (int d = 0; d < Depth; ++d) {
            meta.addresses[d][0] = meta.addresses[d][slot - 1];
          }
          meta.numel[0] = meta.numel[slot - 1];
          meta.list_index[0] = meta.list_index[slot - 1];
          slot = 1;
        }
      }
    }
  }
  if (blocks > 0) {
    flush();
  }
}

// Global block range of each list entry: entry l owns blocks [offsets[l], offsets[l + 1]).
inline std::vector<int64_t> chunk_offsets(at::TensorList params) {
  std::vector<int64_t> offsets(params.size() + 1, 0);
  for (size_t t = 0; t < params.size(); ++t) {
    offsets[t + 1] = offsets[t] + num_chunks(params[t].numel());
  }
  return offsets;
}

// ---- device: the chunk a block owns and access to its elements ---------------------------

struct ChunkRange {
  int slot;
  int64_t list_index;  // position in the caller's lists (for per-tensor inputs and outputs)
  int64_t offset;      // first element of the chunk in the tensor
  int64_t count;       // elements in the chunk
};

template <int Depth>
__device__ __forceinline__ ChunkRange block_chunk(const ChunkMetadata<Depth>& meta) {
  const int slot = meta.block_to_slot[blockIdx.x];
  const int64_t offset = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t left = meta.numel[slot] - offset;
  return {slot, meta.list_index[slot], offset, left < kChunkSize ? left : kChunkSize};
}

// Pointer to the chunk's first element in list `list`, or nullptr when that list is absent.
template <typename T, int Depth>
__device__ __forceinline__ T* chunk_pointer(const ChunkMetadata<Depth>& meta, int list,
                                            const ChunkRange& range) {
  T* base = static_cast<T*>(meta.addresses[list][range.slot]);
  return base == nullptr ? nullptr : base + range.offset;
}

template <typename T>
struct alignas(sizeof(T) * kILP) Group {
  T v[kILP];
};

// True when p (or nullptr, an absent list) allows whole-group vector accesses.
template <typename T>
__device__ __forceinline__ bool group_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Group<T>) == 0;
}

// dst[k] = src[i + k] for the elements below count (zero-filled beyond).
template <typename T>
__device__ __forceinline__ void load_group(T (&dst)[kILP], const T* src, int64_t i, int64_t count,
                                           bool vector) {
  if (vector && i + kILP <= count) {
    const Group<T> g = *reinterpret_cast<const Group<T>*>(src + i);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      dst[k] = g.v[k];
    }
  } else {
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      dst[k] = i + k < count ? src[i + k] : T(0);
    }
  }
}

// dst[i + k] = src[k] for the elements below count.
template <typename T>
__device__ __forceinline__ void store_group(T* dst, const T (&src)[kILP], int64_t i, int64_t count,
                                            bool vector) {
  if (vector && i + kILP <= count) {
    Group<T> g;
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      g.v[k] = src[k];
    }
    *reinterpret_cast<Group<T>*>(dst + i) = g;
  } else {
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      if (i + k < count) {
        dst[i + k] = src[k];
      }
    }
  }
}

// ---- device: deterministic arithmetic and reductions --------------------------------------

// Correctly rounded products and sums that the compiler may not contract into FMAs, so the
// fused updates round exactly like the eager reference (one rounding per PyTorch operation).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

__device__ __forceinline__ float magnitude(float x) { return fabsf(x); }
__device__ __forceinline__ double magnitude(double x) { return fabs(x); }

// torch.sign: -1, 0 or 1 (0 for NaN).
template <typename T>
__device__ __forceinline__ T sign_of(T x) {
  return static_cast<T>((T(0) < x) - (x < T(0)));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) {
    x += __shfl_down_sync(0xffffffffu, x, delta);
  }
  return x;
}

// Sums x[j] over the block (blockDim.x a multiple of 32, at most 1024) in a fixed order; the
// totals are valid in thread 0.  Ends with a barrier, so it may be called repeatedly.
template <typename T, int N>
__device__ __forceinline__ void block_sum(T (&x)[N]) {
  __shared__ T warp_totals[N][kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    x[j] = warp_sum(x[j]);
    if (lane == 0) {
      warp_totals[j][warp] = x[j];
    }
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = static_cast<int>(blockDim.x) / kWarpSize;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      x[j] = warp_sum(lane < warps ? warp_totals[j][lane] : T(0));
    }
  }
  __syncthreads();
}

// Adds a block's count (valid in thread 0) to an int64 counter with one atomic per block.
__device__ __forceinline__ void add_block_count(unsigned long long count, int64_t* counter) {
  unsigned long long total[1] = {count};
  block_sum(total);
  if (threadIdx.x == 0 && total[0] != 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(counter), total[0]);
  }
}

// ---- the generic chunked launch ------------------------------------------------------------

template <int Depth, typename Op>
__global__ void __launch_bounds__(kBlockSize)
    chunked_kernel(const __grid_constant__ ChunkMetadata<Depth> meta, const Op op) {
  op(meta);
}

// Runs op (a functor with `__device__ void operator()(const ChunkMetadata<Depth>&) const`) on
// every chunk of `lists`, on the current stream of the current device.
template <int Depth, typename Op>
void multi_tensor_apply(const std::array<at::TensorList, Depth>& lists, const Op& op) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for_each_chunk_batch<Depth>(lists, [&](const ChunkMetadata<Depth>& meta, int blocks) {
    chunked_kernel<Depth, Op><<<blocks, kBlockSize, 0, stream>>>(meta, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cvsparse::cuda
