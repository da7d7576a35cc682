// What the CUDA forward and backward kernels share: how threads cover rows (RowTraits, chosen at
// run time by choose_layout / dispatch_layout), loading a thread's share of a row, exp2 and logs.
//
// A row is read as "packs" of kWidth elements: 16-byte vectors on the vectorised path, single
// elements otherwise. kThreadsPerRow threads share a row, pack p going to thread
// p % kThreadsPerRow, so each load instruction of a warp reads contiguous memory. Short rows get a
// few threads each (several rows per warp), medium rows a warp, long rows a whole block.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace pykd::cuda {

constexpr int kWarpSize = 32;
constexpr int kVectorBytes = 16;

template <typename scalar_t_, int kThreadsPerRow_, bool kVectorized_>
struct RowTraits {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kThreadsPerRow = kThreadsPerRow_;
  static constexpr int kWidth = kVectorized_ ? kVectorBytes / int(sizeof(scalar_t)) : 1;
  // Packs per tensor that a thread loads before using any: memory requests in flight.
  static constexpr int kUnroll = kVectorized_ ? 2 : 4;
  static constexpr int kChunk = kWidth * kUnroll;  // elements per thread per step
  static constexpr int kBlockThreads = kThreadsPerRow > 256 ? kThreadsPerRow : 256;
  static constexpr int kRowsPerBlock = kBlockThreads / kThreadsPerRow;
  static_assert(kBlockThreads % kWarpSize == 0 && kBlockThreads % kThreadsPerRow == 0);
  static_assert(kThreadsPerRow <= kWarpSize || kThreadsPerRow == kBlockThreads);

  struct alignas(sizeof(scalar_t) * kWidth) Pack {
    scalar_t v[kWidth];
  };
};

// The run-time choice of RowTraits for a launch.
struct Layout {
  int threads_per_row;
  bool vectorized;
};

// One (pointer, row stride in elements) per operand, null for one that is absent; the 16-byte path
// needs every row of every operand to start 16-byte aligned and rows of whole vectors.
struct RowOperand {
  const void* data;
  int64_t row_stride;
};

inline Layout choose_layout(
    int64_t cols,
    int64_t element_size,
    std::initializer_list<RowOperand> operands) {
  const int64_t width = kVectorBytes / element_size;
  bool vectorized = cols % width == 0;
  for (const RowOperand& op : operands) {
    vectorized = vectorized &&
        (op.data == nullptr ||
         (reinterpret_cast<uintptr_t>(op.data) % kVectorBytes == 0 && op.row_stride % width == 0));
  }
  const int64_t packs = vectorized ? cols / width : cols;
  // Enough packs per thread to amortise a row's reduction, enough threads to keep rows parallel.
  const int threads = packs <= 16 ? 4 : packs <= 512 ? kWarpSize : packs <= 16384 ? 256 : 1024;
  return Layout{threads, vectorized};
}

// Calls f(RowTraits<scalar_t, ...>{}) for the layout, with at most kMaxThreadsPerRow threads on a
// row (only those kernels are compiled).
template <typename scalar_t, int kMaxThreadsPerRow = 1024, typename F>
void dispatch_layout(const Layout& layout, const F& f) {
  const int threads = std::min(layout.threads_per_row, kMaxThreadsPerRow);
  auto with_threads = [&](auto vectorized) {
    constexpr bool kVectorized = decltype(vectorized)::value;
    if (threads == 4) {
      return f(RowTraits<scalar_t, 4, kVectorized>{});
    }
    if (threads == kWarpSize) {
      return f(RowTraits<scalar_t, kWarpSize, kVectorized>{});
    }
    if (threads == 256) {
      return f(RowTraits<scalar_t, 256, kVectorized>{});
    }
    if constexpr (kMaxThreadsPerRow >= 1024) {
      if (threads == 1024) {
        return f(RowTraits<scalar_t, 1024, kVectorized>{});
      }
    }
    TORCH_INTERNAL_ASSERT(false, "kd_loss: no kernel for ", threads, " threads per row");
  };
  layout.vectorized ? with_threads(std::true_type{}) : with_threads(std::false_type{});
}

// Blocks to launch for `rows` rows.
template <typename Traits>
unsigned int grid_blocks(int64_t rows) {
  const int64_t blocks = (rows + Traits::kRowsPerBlock - 1) / Traits::kRowsPerBlock;
  TORCH_CHECK(
      blocks <= std::numeric_limits<int32_t>::max(), "kd_loss: too many rows for one launch: ",
      rows);
  return static_cast<unsigned int>(blocks);
}

// A thread's step through its row: packs first, first + kThreadsPerRow, ... (kUnroll of them),
// converted to acc_t. Packs at or past `packs` (the row's count) read as -inf, which carries no
// mass in either softmax.
template <typename Traits>
__device__ __forceinline__ void load_chunk(
    const typename Traits::scalar_t* __restrict__ row,
    int64_t first,
    int64_t packs,
    typename Traits::acc_t (&out)[Traits::kChunk]) {
  using acc_t = typename Traits::acc_t;
  using Pack = typename Traits::Pack;
#pragma unroll
  for (int u = 0; u < Traits::kUnroll; ++u) {
    const int64_t p = first + int64_t(u) * Traits::kThreadsPerRow;
    if (p < packs) {
      const Pack pack = reinterpret_cast<const Pack*>(row)[p];
#pragma unroll
      for (int w = 0; w < Traits::kWidth; ++w) {
        out[u * Traits::kWidth + w] = static_cast<acc_t>(pack.v[w]);
      }
    } else {
#pragma unroll
      for (int w = 0; w < Traits::kWidth; ++w) {
        out[u * Traits::kWidth + w] = -std::numeric_limits<acc_t>::infinity();
      }
    }
  }
}

// The kernels work in base 2: with x2 = x * (log2(e) / T), exp(x/T - ref) is exp2(x2 - ref2), one
// multiply-add and the hardware's exp2 (~2 ulp). An accurate natural exp wraps that instruction in
// a range reduction, and the fast one (__expf) loses accuracy as |x| grows. Row results are
// converted back to natural logarithms once per row.
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

__device__ __forceinline__ float exp2_acc(float x) {
  return ::exp2f(x);
}
__device__ __forceinline__ double exp2_acc(double x) {
  return ::exp2(x);
}
__device__ __forceinline__ float log2_acc(float x) {
  return ::log2f(x);
}
__device__ __forceinline__ double log2_acc(double x) {
  return ::log2(x);
}
__device__ __forceinline__ float log_acc(float x) {
  return ::logf(x);
}
__device__ __forceinline__ double log_acc(double x) {
  return ::log(x);
}

}  // namespace pykd::cuda
