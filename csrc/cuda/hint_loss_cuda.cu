// CUDA implementation of pykd::hint_loss: a multi-tensor launch, one pass.
//
// Every pair is cut into chunks of kChunk elements and each thread block handles one chunk of one
// pair. The pairs' pointers, sizes, scales and first block numbers travel in a table passed by
// value as a kernel argument (kMaxPairs pairs, under the 4 KiB argument limit of every CUDA
// version), so one launch covers up to kMaxPairs pairs and nothing is copied to the device first;
// more pairs take one launch per kMaxPairs. A block finds its pair by a binary search over the
// first block numbers.
//
// Each block reads its chunk of s and t once: it sums the squared differences and, when they are
// asked for, writes the gradients 2 w_k / numel_k * (s - t) (and their negatives for the teacher)
// from the same registers; the template flags compile the forward-only kernel without the
// stores. Each block writes its chunk's sum times w_k / numel_k to a partial, and a second small
// kernel adds the partials in a fixed order (in float64), so the loss is deterministic and no
// atomics are used. Chunks whose pointers are all 16-byte aligned use 16-byte vector loads and
// stores.
#include "hint_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace pykd::cuda {
namespace {

constexpr int kMaxPairs = 64;

struct PairTable {
  const void* student[kMaxPairs];
  const void* teacher[kMaxPairs];
  void* grad_student[kMaxPairs];  // null when not asked for
  void* grad_teacher[kMaxPairs];
  int64_t numel[kMaxPairs];
  double scale[kMaxPairs];             // w_k / numel_k; the gradient's is exactly twice that
  int32_t first_block[kMaxPairs + 1];  // pair k has blocks [first_block[k], first_block[k + 1])
  bool aligned[kMaxPairs];             // all of the pair's pointers are 16-byte aligned
  int32_t pairs;
};
static_assert(sizeof(PairTable) <= 4096, "kernel arguments must stay within 4 KiB");

// Compile-time configuration: a 16-byte vector holds kVec elements; a block handles kChunk
// elements, kUnroll vectors per thread.
template <typename scalar_t>
struct Traits {
  static constexpr int kThreads = 256;
  static constexpr int kVec = 16 / sizeof(scalar_t);
  static constexpr int kUnroll = 8;
  static constexpr int64_t kChunk = int64_t{kThreads} * kVec * kUnroll;
};

template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

struct Span {
  int pair;
  int64_t begin, end;
};

template <typename scalar_t>
__device__ Span block_span(const PairTable& table) {
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = table.pairs - 1;  // the last pair whose first block is <= block
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first_block[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t begin = int64_t{block - table.first_block[lo]} * Traits<scalar_t>::kChunk;
  const int64_t end = begin + Traits<scalar_t>::kChunk;
  return {lo, begin, end < table.numel[lo] ? end : table.numel[lo]};
}

template <typename scalar_t, typename acc_t, bool kStudent, bool kTeacher>
__global__ void __launch_bounds__(Traits<scalar_t>::kThreads)
    hint_loss_kernel(const PairTable table, acc_t* __restrict__ partials) {
  using T = Traits<scalar_t>;
  using Vec = Pack<scalar_t, T::kVec>;
  const Span span = block_span<scalar_t>(table);
  const auto* s = static_cast<const scalar_t*>(table.student[span.pair]);
  const auto* t = static_cast<const scalar_t*>(table.teacher[span.pair]);
  auto* grad_s = static_cast<scalar_t*>(table.grad_student[span.pair]);
  auto* grad_t = static_cast<scalar_t*>(table.grad_teacher[span.pair]);
  // 2 w_k / numel_k, as hint_grad_scale computes it on the CPU (doubling is exact).
  const acc_t grad_scale = static_cast<acc_t>(2.0 * table.scale[span.pair]);
  acc_t sum = 0;
  int64_t scalar_begin = span.begin;
  if (table.aligned[span.pair]) {
    const int64_t vec_end = span.begin + (span.end - span.begin) / T::kVec * T::kVec;
    for (int64_t i = span.begin + threadIdx.x * T::kVec; i < vec_end; i += T::kThreads * T::kVec) {
      const Vec vs = *reinterpret_cast<const Vec*>(s + i);
      const Vec vt = *reinterpret_cast<const Vec*>(t + i);
      Vec gs, gt;  // only the ones asked for are stored
#pragma unroll
      for (int j = 0; j < T::kVec; ++j) {
        const acc_t d = static_cast<acc_t>(vs.v[j]) - static_cast<acc_t>(vt.v[j]);
        sum += d * d;
        const acc_t g = grad_scale * d;
        gs.v[j] = static_cast<scalar_t>(g);
        gt.v[j] = static_cast<scalar_t>(-g);
      }
      if constexpr (kStudent) {
        *reinterpret_cast<Vec*>(grad_s + i) = gs;
      }
      if constexpr (kTeacher) {
        *reinterpret_cast<Vec*>(grad_t + i) = gt;
      }
    }
    scalar_begin = vec_end;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < span.end; i += T::kThreads) {
    const acc_t d = static_cast<acc_t>(s[i]) - static_cast<acc_t>(t[i]);
    sum += d * d;
    if constexpr (kStudent) {
      grad_s[i] = static_cast<scalar_t>(grad_scale * d);
    }
    if constexpr (kTeacher) {
      grad_t[i] = static_cast<scalar_t>(-(grad_scale * d));
    }
  }
  using BlockReduce = cub::BlockReduce<acc_t, T::kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  sum = BlockReduce(temp).Sum(sum);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = sum * static_cast<acc_t>(table.scale[span.pair]);
  }
}

// loss = bias + the sum of the partials, in a fixed order whatever the launch.
template <typename acc_t>
__global__ void __launch_bounds__(1024)
    hint_sum_kernel(const acc_t* __restrict__ partials, int64_t n, double bias, acc_t* loss) {
  double sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    sum += static_cast<double>(partials[i]);
  }
  using BlockReduce = cub::BlockReduce<double, 1024>;
  __shared__ typename BlockReduce::TempStorage temp;
  sum = BlockReduce(temp).Sum(sum);
  if (threadIdx.x == 0) {
    *loss = static_cast<acc_t>(sum + bias);
  }
}

bool aligned16(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

const void* pointer(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.const_data_ptr() : nullptr;
}

void* mutable_pointer(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.mutable_data_ptr() : nullptr;
}

// The launches covering all non-empty pairs: tables of up to kMaxPairs pairs, each with the
// global number of its first block (where its partials start) and its number of blocks.
struct Launch {
  PairTable table;
  int64_t first_block, blocks;
};

std::vector<Launch> plan_launches(
    const std::vector<HintPair>& pairs, const std::vector<double>& scales, int64_t chunk) {
  std::vector<Launch> launches;
  int64_t total_blocks = 0;
  for (size_t k = 0; k < pairs.size(); ++k) {
    const HintPair& pair = pairs[k];
    if (pair.numel() == 0) {
      continue;
    }
    if (launches.empty() || launches.back().table.pairs == kMaxPairs) {
      launches.push_back(Launch{PairTable{}, total_blocks, 0});
    }
    Launch& launch = launches.back();
    PairTable& table = launch.table;
    const int i = table.pairs++;
    table.student[i] = pointer(pair.student);
    table.teacher[i] = pointer(pair.teacher);
    table.grad_student[i] = mutable_pointer(pair.grad_student);
    table.grad_teacher[i] = mutable_pointer(pair.grad_teacher_out);
    table.numel[i] = pair.numel();
    table.scale[i] = scales[k];
    table.aligned[i] = aligned16(table.student[i]) && aligned16(table.teacher[i]) &&
        aligned16(table.grad_student[i]) && aligned16(table.grad_teacher[i]);
    const int64_t blocks = (pair.numel() + chunk - 1) / chunk;
    TORCH_CHECK_VALUE(
        launch.blocks + blocks <= std::numeric_limits<int32_t>::max(),
        "hint_loss: feature pair ", k, " is too large (", pair.numel(), " elements)");
    table.first_block[i] = static_cast<int32_t>(launch.blocks);
    launch.blocks += blocks;
    table.first_block[i + 1] = static_cast<int32_t>(launch.blocks);
    total_blocks += blocks;
  }
  return launches;
}

dim3 grid(const Launch& launch) {
  return dim3(static_cast<unsigned int>(launch.blocks));
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> hint_loss_cuda(
    at::TensorList student_features,
    at::TensorList teacher_features,
    at::ArrayRef<double> weights,
    bool student_grad,
    bool teacher_grad) {
  check_hint_features("hint_loss", student_features, teacher_features, weights);  // before the guard
  const at::Tensor& first = student_features[0];
  const c10::cuda::CUDAGuard guard(first.device());
  const auto acc_dtype = at::toOpMathType(first.scalar_type());
  at::Tensor loss = at::empty({}, first.options().dtype(acc_dtype));
  std::vector<HintPair> pairs =
      hint_pairs(student_features, teacher_features, student_grad, teacher_grad);
  std::vector<double> scales;
  double bias = 0;  // an empty pair contributes w * 0 / 0 = NaN, as on the CPU
  for (size_t k = 0; k < pairs.size(); ++k) {
    const int64_t n = pairs[k].numel();
    scales.push_back(n == 0 ? 0.0 : weights[k] / static_cast<double>(n));
    if (n == 0) {
      bias = std::numeric_limits<double>::quiet_NaN();
    }
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, first.scalar_type(), "hint_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using T = Traits<scalar_t>;
    const std::vector<Launch> launches = plan_launches(pairs, scales, T::kChunk);
    const int64_t blocks = launches.empty() ? 0 : launches.back().first_block + launches.back().blocks;
    at::Tensor partials = at::empty({blocks}, first.options().dtype(acc_dtype));
    for (const Launch& launch : launches) {
      acc_t* out = partials.mutable_data_ptr<acc_t>() + launch.first_block;
      if (student_grad && teacher_grad) {
        hint_loss_kernel<scalar_t, acc_t, true, true>
            <<<grid(launch), T::kThreads, 0, stream>>>(launch.table, out);
      } else if (student_grad) {
        hint_loss_kernel<scalar_t, acc_t, true, false>
            <<<grid(launch), T::kThreads, 0, stream>>>(launch.table, out);
      } else if (teacher_grad) {
        hint_loss_kernel<scalar_t, acc_t, false, true>
            <<<grid(launch), T::kThreads, 0, stream>>>(launch.table, out);
      } else {
        hint_loss_kernel<scalar_t, acc_t, false, false>
            <<<grid(launch), T::kThreads, 0, stream>>>(launch.table, out);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    hint_sum_kernel<acc_t><<<1, 1024, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), blocks, bias, loss.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto [grad_student, grad_teacher] = hint_gradients(pairs);
  return {loss, std::move(grad_student), std::move(grad_teacher)};
}

}  // namespace
}  // namespace pykd::cuda

TORCH_LIBRARY_IMPL(pykd, CUDA, m) {
  m.impl("hint_loss", &pykd::cuda::hint_loss_cuda);
}
