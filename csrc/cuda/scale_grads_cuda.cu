// CUDA implementation of pykd::scale_grads_, the backward of the fused losses: g *= scale in place.
//
// The scale is read by the kernels from device memory, never by the host: each thread loads it
// (one value, or its row's) and returns before touching the gradient when it is exactly 1, so an
// upstream gradient of 1 costs a launch and no traffic, and nothing synchronises with the host
// (CUDA graphs, torch.compile). The scale may have any floating dtype: the kernels load it by a
// run-time switch on its dtype (one uniform branch per load), which keeps the kernels to one per
// gradient dtype and mode.
//
// One scale for all: a multi-tensor launch, as in hint_loss_cuda.cu: the gradients of one dtype
// go in a table (pointers, sizes, first block numbers) passed by value, each block scales one chunk
// of one gradient, with 16-byte vectors when the gradient's start is aligned (a dense gradient is
// scaled as the flat span of memory it covers, so any memory format works). One scale per row:
// one launch per gradient, each thread handles one 16-byte vector (or one element) at a time and
// looks up the row of its first and last element; a vector that straddles rows is scaled element
// by element.
#include "scale_grads.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace pykd::cuda {
namespace {

constexpr int kMaxGrads = 96;
constexpr int kThreads = 256;

// The scale as the kernels see it: element i is data[i * stride], of dtype `kind`.
enum class ScaleKind : int32_t { Float, Double, Half, BFloat16 };

struct ScaleRef {
  const void* data;
  int64_t stride;
  ScaleKind kind;
};

__device__ __forceinline__ double load_scale(const ScaleRef& scale, int64_t i) {
  const int64_t at = i * scale.stride;
  switch (scale.kind) {
    case ScaleKind::Double:
      return static_cast<const double*>(scale.data)[at];
    case ScaleKind::Half:
      return static_cast<double>(static_cast<float>(static_cast<const c10::Half*>(scale.data)[at]));
    case ScaleKind::BFloat16:
      return static_cast<double>(
          static_cast<float>(static_cast<const c10::BFloat16*>(scale.data)[at]));
    default:
      return static_cast<double>(static_cast<const float*>(scale.data)[at]);
  }
}

template <typename scalar_t>
struct Traits {
  static constexpr int kVec = 16 / sizeof(scalar_t);
  static constexpr int kUnroll = 4;
  static constexpr int64_t kChunk = int64_t{kThreads} * kVec * kUnroll;  // elements per block
};

template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

struct GradTable {
  void* data[kMaxGrads];
  int64_t numel[kMaxGrads];
  int32_t first_block[kMaxGrads + 1];  // gradient k has blocks [first_block[k], first_block[k+1])
  bool aligned[kMaxGrads];             // its start is 16-byte aligned
  int32_t grads;
};
static_assert(sizeof(GradTable) + sizeof(ScaleRef) <= 4096, "kernel arguments must stay within 4 KiB");

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    scale_all_kernel(const GradTable table, const ScaleRef scale_ref) {
  using T = Traits<scalar_t>;
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Pack<scalar_t, T::kVec>;
  const double scale_value = load_scale(scale_ref, 0);
  if (scale_value == 1.0) {
    return;
  }
  const acc_t scale = static_cast<acc_t>(scale_value);
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = table.grads - 1;  // the last gradient whose first block is <= block
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first_block[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  auto* g = static_cast<scalar_t*>(table.data[lo]);
  const int64_t begin = int64_t{block - table.first_block[lo]} * T::kChunk;
  const int64_t end = begin + T::kChunk < table.numel[lo] ? begin + T::kChunk : table.numel[lo];
  int64_t scalar_begin = begin;
  if (table.aligned[lo]) {
    const int64_t vec_end = begin + (end - begin) / T::kVec * T::kVec;
    for (int64_t i = begin + threadIdx.x * T::kVec; i < vec_end; i += kThreads * T::kVec) {
      Vec v = *reinterpret_cast<const Vec*>(g + i);
#pragma unroll
      for (int j = 0; j < T::kVec; ++j) {
        v.v[j] = static_cast<scalar_t>(static_cast<acc_t>(v.v[j]) * scale);
      }
      *reinterpret_cast<Vec*>(g + i) = v;
    }
    scalar_begin = vec_end;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += kThreads) {
    g[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * scale);
  }
}

// g is [rows, cols] contiguous; the elements of row r are scaled by scale[r] unless it is 1.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) scale_rows_kernel(
    scalar_t* __restrict__ g, int64_t numel, int64_t cols, bool aligned, const ScaleRef scale_ref) {
  using T = Traits<scalar_t>;
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Pack<scalar_t, T::kVec>;
  const int64_t begin = int64_t{blockIdx.x} * T::kChunk;
  const int64_t end = begin + T::kChunk < numel ? begin + T::kChunk : numel;
  int64_t scalar_begin = begin;
  if (aligned) {
    const int64_t vec_end = begin + (end - begin) / T::kVec * T::kVec;
    for (int64_t i = begin + threadIdx.x * T::kVec; i < vec_end; i += kThreads * T::kVec) {
      const int64_t first_row = i / cols, last_row = (i + T::kVec - 1) / cols;
      if (first_row == last_row) {
        const double s = load_scale(scale_ref, first_row);
        if (s == 1.0) {
          continue;
        }
        const acc_t scale = static_cast<acc_t>(s);
        Vec v = *reinterpret_cast<const Vec*>(g + i);
#pragma unroll
        for (int j = 0; j < T::kVec; ++j) {
          v.v[j] = static_cast<scalar_t>(static_cast<acc_t>(v.v[j]) * scale);
        }
        *reinterpret_cast<Vec*>(g + i) = v;
      } else {
        for (int j = 0; j < T::kVec; ++j) {
          const double s = load_scale(scale_ref, (i + j) / cols);
          if (s != 1.0) {
            g[i + j] = static_cast<scalar_t>(static_cast<acc_t>(g[i + j]) * static_cast<acc_t>(s));
          }
        }
      }
    }
    scalar_begin = vec_end;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += kThreads) {
    const double s = load_scale(scale_ref, i / cols);
    if (s != 1.0) {
      g[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * static_cast<acc_t>(s));
    }
  }
}

ScaleRef scale_ref(const at::Tensor& flat) {
  ScaleKind kind = ScaleKind::Float;
  switch (flat.scalar_type()) {
    case at::kFloat:
      kind = ScaleKind::Float;
      break;
    case at::kDouble:
      kind = ScaleKind::Double;
      break;
    case at::kHalf:
      kind = ScaleKind::Half;
      break;
    case at::kBFloat16:
      kind = ScaleKind::BFloat16;
      break;
    default:
      TORCH_CHECK_TYPE(false, "scale_grads_: unsupported scale dtype ", flat.scalar_type());
  }
  return {flat.const_data_ptr(), flat.stride(0), kind};
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

unsigned int blocks_for(int64_t numel, int64_t chunk, const char* what) {
  const int64_t blocks = (numel + chunk - 1) / chunk;
  TORCH_CHECK_VALUE(
      blocks <= std::numeric_limits<int32_t>::max(), "scale_grads_: ", what, " is too large (",
      numel, " elements)");
  return static_cast<unsigned int>(blocks);
}

void scale_grads_cuda(at::TensorList grads, const at::Tensor& scale) {
  const bool per_row = check_scale_grads(grads, scale);  // before the guard: our own messages
  if (grads.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(scale.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor flat = scale.reshape({-1});  // a view when it can be (an expanded 1 too)
  const ScaleRef ref = scale_ref(flat);

  if (per_row) {
    for (const at::Tensor& g : grads) {
      if (g.numel() == 0) {
        continue;
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "scale_grads_", [&] {
        using T = Traits<scalar_t>;
        auto* data = g.mutable_data_ptr<scalar_t>();
        scale_rows_kernel<scalar_t><<<blocks_for(g.numel(), T::kChunk, "a gradient"), kThreads, 0, stream>>>(
            data, g.numel(), g.size(-1), aligned16(data), ref);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    return;
  }

  // One scale for all: one launch per dtype and per kMaxGrads gradients.
  std::vector<bool> done(grads.size(), false);
  for (size_t first = 0; first < grads.size(); ++first) {
    if (done[first]) {
      continue;
    }
    const at::ScalarType dtype = grads[first].scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "scale_grads_", [&] {
      using T = Traits<scalar_t>;
      auto launch = [&](const GradTable& table, int64_t blocks) {
        if (blocks > 0) {
          scale_all_kernel<scalar_t>
              <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(table, ref);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      };
      GradTable table{};
      int64_t blocks = 0;
      for (size_t k = first; k < grads.size(); ++k) {
        const at::Tensor& g = grads[k];
        if (done[k] || g.scalar_type() != dtype) {
          continue;
        }
        done[k] = true;
        if (g.numel() == 0) {
          continue;
        }
        const int64_t n = blocks_for(g.numel(), T::kChunk, "a gradient");
        if (table.grads == kMaxGrads || blocks + n > std::numeric_limits<int32_t>::max()) {
          launch(table, blocks);
          table = GradTable{};
          blocks = 0;
        }
        const int i = table.grads++;
        table.data[i] = g.mutable_data_ptr();
        table.numel[i] = g.numel();
        table.aligned[i] = aligned16(table.data[i]);
        table.first_block[i] = static_cast<int32_t>(blocks);
        blocks += n;
        table.first_block[i + 1] = static_cast<int32_t>(blocks);
      }
      launch(table, blocks);
    });
  }
}

}  // namespace
}  // namespace pykd::cuda

TORCH_LIBRARY_IMPL(pykd, CUDA, m) {
  m.impl("scale_grads_", &pykd::cuda::scale_grads_cuda);
}
