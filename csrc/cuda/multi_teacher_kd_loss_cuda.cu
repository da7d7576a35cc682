// CUDA implementation of pykd::multi_teacher_kd_loss: multi_teacher_kd_loss.h's op body (checks
// before the device guard) on the logits' device and the current stream, no host sync:
//   1. with labels under "batchmean", count_valid_kernel counts the valid rows into a device
//      scalar (D), which the row kernel reads;
//   2. ONE launch of the row kernel for all K teachers: every row's loss and the gradients;
//   3. unless reduction is "none", reduce_kernel adds the row losses in a fixed order, in
//      float64, and divides by D: the loss is deterministic.
//
// The row kernel. A row belongs to one warp (rows of at most kWarpRowMaxCols classes, several rows
// per block) or to one 512-thread block (longer rows). Per row:
//   sweep 1: each of the K + 1 tensors (the student, then each teacher) read once from global
//            memory, in 16-byte-or-smaller packs, with per-thread online sums in base 2
//            (scale = log2(e) / T: the running maximum m and sum exp2(fma(x, scale, -m*scale)),
//            kd_loss_rows.cuh's Online/accumulate/merge), merged over the row's threads; the
//            row's references and log2 totals go to shared memory;
//   sweep 2: the student row and the K teacher rows read again, element by element all K + 1
//            together: log2 p = fma(x, scale, -ref) - log2(total) (relative to the row maximum,
//            never a difference of two large numbers), the row's loss
//            T^2 ln2 sum_k w_k sum_j p_tk,j (log2 p_tk,j - log2 p_s,j), and the student's gradient
//            T/D (W p_s - sum_k w_k p_tk), written straight away;
//   sweep 3, only when the teachers' gradients are wanted: per teacher its KL (a row reduction),
//            then its gradient T/D w_k p_tk (log p_tk - log p_s - KL_k).
// Sweeps 2 and 3 re-read the rows from global memory: from L2 while the row is recent (a warp's
// short rows, or a block's row of up to a few hundred KB with few blocks in flight), from HBM
// otherwise (e.g. 1024 rows of 32000 float32 classes and 4 teachers: 640 KB a row, more than L2
// holds across all SMs). Masked rows read nothing and get a zero loss and zero gradients.
#include "cuda/kd_loss_rows.cuh"
#include "cuda/row_reduction.cuh"
#include "multi_teacher_kd_loss.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

namespace pykd::cuda {
namespace {

constexpr int kBlockThreads = 512;
constexpr int kMaxTensors = static_cast<int>(kMaxTeachers) + 1;
constexpr int64_t kWarpRowMaxCols = 1024;
constexpr int kPackElements = 4;  // the vectorised path's pack (16 bytes of float32)
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// What the row kernel is given (by value: ~1.1 KB of kernel parameters).
struct RowsParams {
  const void* student;
  const void* teachers[kMaxTeachers];
  void* grad_teachers[kMaxTeachers];  // null when not wanted
  int64_t teacher_strides[kMaxTeachers];
  double weights[kMaxTeachers];
  void* grad_student;          // contiguous [rows, cols], or null
  const int64_t* labels;       // or null: every row valid
  const int64_t* valid_count;  // on the device, or null: divisor is D
  void* row_loss;              // [rows] of the accumulation dtype
  int64_t rows, cols, student_stride, ignore_index, divisor;
  double temperature, weight_sum;
  int teacher_count;
};

template <int N, typename T, typename acc_t>
__device__ __forceinline__ void load_pack(const T* p, acc_t (&x)[N]) {
  if constexpr (N == 1) {
    x[0] = static_cast<acc_t>(*p);
  } else {
    const Vec<T, N> v = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      x[i] = static_cast<acc_t>(v.v[i]);
    }
  }
}

template <int N, typename T, typename acc_t>
__device__ __forceinline__ void store_pack(T* p, const acc_t (&x)[N]) {
  if constexpr (N == 1) {
    *p = static_cast<T>(x[0]);
  } else {
    Vec<T, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      v.v[i] = static_cast<T>(x[i]);
    }
    *reinterpret_cast<Vec<T, N>*>(p) = v;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t shuffle_xor(acc_t v, int offset) {
  return __shfl_xor_sync(0xffffffffu, v, offset);
}

template <typename acc_t>
__device__ __forceinline__ Online<acc_t> shuffle_xor(const Online<acc_t>& o, int offset) {
  return Online<acc_t>{shuffle_xor(o.max, offset), shuffle_xor(o.sum, offset), acc_t(0)};
}

// Merges v over the kRowThreads threads of a row (a warp, or the whole block); every one of them
// gets the same result (the merges are commutative bit for bit). A block-wide row needs every
// thread of the block here (two barriers); partials: one slot per warp.
template <int kRowThreads, typename T, typename Merge>
__device__ __forceinline__ T reduce_row(T v, T* partials, const Merge& merge) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = merge(v, shuffle_xor(v, offset));
  }
  if constexpr (kRowThreads > kWarpSize) {
    if (threadIdx.x % kWarpSize == 0) {
      partials[threadIdx.x / kWarpSize] = v;
    }
    __syncthreads();
    v = partials[0];
    for (int w = 1; w < kRowThreads / kWarpSize; ++w) {
      v = merge(v, partials[w]);
    }
    __syncthreads();  // the slots may be written again
  }
  return v;
}

template <int kRowThreads>
__device__ __forceinline__ void row_sync() {
  if constexpr (kRowThreads > kWarpSize) {
    __syncthreads();
  } else {
    __syncwarp();
  }
}

// A class's term: 0 where p_t is 0 (0 * log 0 = 0), else p_t * (log2 p_t - log2 p_s).
template <typename acc_t>
__device__ __forceinline__ acc_t kl_term(acc_t p_t, acc_t log2_p_t, acc_t log2_p_s) {
  return p_t == acc_t(0) ? acc_t(0) : p_t * (log2_p_t - log2_p_s);
}

template <int kRowThreads, int kPack, typename s_t, typename t_t>
__global__ void __launch_bounds__(kBlockThreads) multi_teacher_rows_kernel(const RowsParams p) {
  using acc_t = at::opmath_type<s_t>;
  constexpr int kRowsPerBlock = kBlockThreads / kRowThreads;
  constexpr int kWarps = kBlockThreads / kWarpSize;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  __shared__ Online<acc_t> online_partials[kWarps];
  __shared__ acc_t sum_partials[kWarps];
  __shared__ acc_t row_ref[kRowsPerBlock][kMaxTensors];
  __shared__ acc_t row_log2_total[kRowsPerBlock][kMaxTensors];

  const int slot = threadIdx.x / kRowThreads;
  const int lane = threadIdx.x % kRowThreads;
  const int K = p.teacher_count;
  const int64_t cols = p.cols;
  const acc_t scale = static_cast<acc_t>(kLog2e / p.temperature);
  const int64_t d = p.valid_count != nullptr ? *p.valid_count : p.divisor;
  const acc_t grad_scale = static_cast<acc_t>(p.temperature / static_cast<double>(d > 1 ? d : 1));
  const acc_t loss_scale = static_cast<acc_t>(p.temperature * p.temperature * kLn2);
  const acc_t weight_sum = static_cast<acc_t>(p.weight_sum);
  const int64_t first = int64_t(lane) * kPack;
  constexpr int64_t kStride = int64_t(kRowThreads) * kPack;
  auto add = [](acc_t a, acc_t b) { return a + b; };

  for (int64_t row0 = int64_t(blockIdx.x) * kRowsPerBlock; row0 < p.rows;
       row0 += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t row = row0 + slot;
    if (row >= p.rows) {  // a whole warp of the warp-per-row path (no block barrier there)
      continue;
    }
    const s_t* s = static_cast<const s_t*>(p.student) + row * p.student_stride;
    s_t* grad_s = p.grad_student != nullptr ? static_cast<s_t*>(p.grad_student) + row * cols
                                            : nullptr;
    auto teacher = [&](int k) {
      return static_cast<const t_t*>(p.teachers[k]) + row * p.teacher_strides[k];
    };
    auto grad_teacher = [&](int k) {
      return p.grad_teachers[k] != nullptr ? static_cast<t_t*>(p.grad_teachers[k]) + row * cols
                                           : nullptr;
    };
    acc_t* row_loss = static_cast<acc_t*>(p.row_loss) + row;

    if (p.labels != nullptr && p.labels[row] == p.ignore_index) {
      for (int64_t j = lane; j < cols; j += kRowThreads) {
        if (grad_s != nullptr) {
          grad_s[j] = s_t(0);
        }
        for (int k = 0; k < K; ++k) {
          if (t_t* g = grad_teacher(k)) {
            g[j] = t_t(0);
          }
        }
      }
      if (lane == 0) {
        *row_loss = acc_t(0);
      }
      continue;
    }
    if (cols == 1) {
      // One class: every softmax is exactly 1, so every KL and gradient is 0 (NaN for a NaN or
      // infinite logit), without the rounding noise of the general path.
      if (lane == 0) {
        const acc_t x = static_cast<acc_t>(s[0]);
        acc_t zero = x - x;
        for (int k = 0; k < K; ++k) {
          const acc_t y = static_cast<acc_t>(teacher(k)[0]);
          zero += y - y;
          if (t_t* g = grad_teacher(k)) {
            g[0] = static_cast<t_t>((y - y) * 0);
          }
        }
        if (grad_s != nullptr) {
          grad_s[0] = static_cast<s_t>((x - x) * 0);
        }
        *row_loss = zero;
      }
      continue;
    }

    // Sweep 1: each tensor's maximum and sum, tensor 0 the student.
    for (int x = 0; x <= K; ++x) {
      Online<acc_t> o = empty_online<acc_t>();
      if (x == 0) {
        for (int64_t j = first; j < cols; j += kStride) {
          acc_t v[kPack];
          load_pack<kPack>(s + j, v);
          accumulate<kPack>(o, v, scale, false);
        }
      } else {
        const t_t* t = teacher(x - 1);
        for (int64_t j = first; j < cols; j += kStride) {
          acc_t v[kPack];
          load_pack<kPack>(t + j, v);
          accumulate<kPack>(o, v, scale, false);
        }
      }
      o = reduce_row<kRowThreads>(o, online_partials, [scale](const auto& a, const auto& b) {
        return merge(a, b, scale, false);
      });
      if (lane == 0) {
        row_ref[slot][x] = reference(o.max, scale);
        // No mass (every logit -inf): log2 p = -inf everywhere; a NaN sum stays NaN.
        row_log2_total[slot][x] = o.sum == acc_t(0) ? kInf : log2_acc(o.sum);
      }
    }
    row_sync<kRowThreads>();
    const acc_t ref_s = row_ref[slot][0], log2_total_s = row_log2_total[slot][0];

    // Sweep 2: the loss and the student's gradient.
    acc_t loss = 0;
    for (int64_t j = first; j < cols; j += kStride) {
      acc_t v[kPack], log2_ps[kPack], mix[kPack];
      load_pack<kPack>(s + j, v);
#pragma unroll
      for (int i = 0; i < kPack; ++i) {
        log2_ps[i] = fma_acc(v[i], scale, -ref_s) - log2_total_s;
        mix[i] = 0;
      }
      for (int k = 0; k < K; ++k) {
        acc_t tv[kPack];
        load_pack<kPack>(teacher(k) + j, tv);
        const acc_t w = static_cast<acc_t>(p.weights[k]);
        const acc_t ref_t = row_ref[slot][k + 1], log2_total_t = row_log2_total[slot][k + 1];
#pragma unroll
        for (int i = 0; i < kPack; ++i) {
          const acc_t log2_pt = fma_acc(tv[i], scale, -ref_t) - log2_total_t;
          const acc_t pt = exp2_acc(log2_pt);
          loss += w * kl_term(pt, log2_pt, log2_ps[i]);
          mix[i] += w * pt;
        }
      }
      if (grad_s != nullptr) {
        acc_t g[kPack];
#pragma unroll
        for (int i = 0; i < kPack; ++i) {
          g[i] = grad_scale * (weight_sum * exp2_acc(log2_ps[i]) - mix[i]);
        }
        store_pack<kPack>(grad_s + j, g);
      }
    }
    loss = reduce_row<kRowThreads>(loss, sum_partials, add);
    if (lane == 0) {
      *row_loss = loss_scale * loss;
    }

    // Sweep 3: the teachers' gradients, each after its KL.
    for (int k = 0; k < K && p.grad_teachers[0] != nullptr; ++k) {
      const t_t* t = teacher(k);
      t_t* grad_t = grad_teacher(k);
      const acc_t ref_t = row_ref[slot][k + 1], log2_total_t = row_log2_total[slot][k + 1];
      auto terms = [&](int64_t j, acc_t (&pt)[kPack], acc_t (&term)[kPack]) {
        acc_t sv[kPack], tv[kPack];
        load_pack<kPack>(s + j, sv);
        load_pack<kPack>(t + j, tv);
#pragma unroll
        for (int i = 0; i < kPack; ++i) {
          const acc_t log2_ps = fma_acc(sv[i], scale, -ref_s) - log2_total_s;
          const acc_t log2_pt = fma_acc(tv[i], scale, -ref_t) - log2_total_t;
          pt[i] = exp2_acc(log2_pt);
          term[i] = kl_term(pt[i], log2_pt, log2_ps);
        }
      };
      acc_t kl = 0;
      for (int64_t j = first; j < cols; j += kStride) {
        acc_t pt[kPack], term[kPack];
        terms(j, pt, term);
#pragma unroll
        for (int i = 0; i < kPack; ++i) {
          kl += term[i];
        }
      }
      kl = reduce_row<kRowThreads>(kl, sum_partials, add);  // in log2 units
      const acc_t g_scale = grad_scale * static_cast<acc_t>(p.weights[k] * kLn2);
      for (int64_t j = first; j < cols; j += kStride) {
        acc_t pt[kPack], term[kPack], g[kPack];
        terms(j, pt, term);
#pragma unroll
        for (int i = 0; i < kPack; ++i) {
          g[i] = g_scale * (term[i] - pt[i] * kl);
        }
        store_pack<kPack>(grad_t + j, g);
      }
    }
    if constexpr (kRowThreads == kWarpSize) {
      __syncwarp();  // row_ref may be written for the next row
    } else {
      __syncthreads();
    }
  }
}

template <typename T>
bool pack_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % (sizeof(T) * kPackElements) == 0;
}

template <typename s_t, typename t_t>
void launch_rows(const RowsParams& p, cudaStream_t stream) {
  bool vectorised = p.cols % kPackElements == 0 && p.student_stride % kPackElements == 0 &&
      pack_aligned<s_t>(p.student) &&
      (p.grad_student == nullptr || pack_aligned<s_t>(p.grad_student));
  for (int k = 0; k < p.teacher_count; ++k) {
    vectorised = vectorised && p.teacher_strides[k] % kPackElements == 0 &&
        pack_aligned<t_t>(p.teachers[k]) &&
        (p.grad_teachers[k] == nullptr || pack_aligned<t_t>(p.grad_teachers[k]));
  }
  auto go = [&](auto row_threads, auto pack) {
    constexpr int kRowThreads = decltype(row_threads)::value;
    constexpr int kRowsPerBlock = kBlockThreads / kRowThreads;
    const int64_t blocks = std::min((p.rows + kRowsPerBlock - 1) / kRowsPerBlock, kMaxBlocks);
    multi_teacher_rows_kernel<kRowThreads, decltype(pack)::value, s_t, t_t>
        <<<static_cast<unsigned int>(blocks), kBlockThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  using Warp = std::integral_constant<int, kWarpSize>;
  using Block = std::integral_constant<int, kBlockThreads>;
  using Scalar = std::integral_constant<int, 1>;
  using Packed = std::integral_constant<int, kPackElements>;
  if (p.cols <= kWarpRowMaxCols) {
    vectorised ? go(Warp{}, Packed{}) : go(Warp{}, Scalar{});
  } else {
    vectorised ? go(Block{}, Packed{}) : go(Block{}, Scalar{});
  }
}

void launch(const MultiTeacherArgs& a) {
  const int64_t rows = a.student.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const RowReduction reduction(a.reduction, a.labels, rows, a.ignore_index, a.loss, stream);

  RowsParams p{};
  p.student = a.student.const_data_ptr();
  p.teacher_count = static_cast<int>(a.teachers.size());
  double weight_sum = 0;
  for (size_t k = 0; k < a.teachers.size(); ++k) {
    p.teachers[k] = a.teachers[k].const_data_ptr();
    p.teacher_strides[k] = a.teachers[k].stride(0);
    p.weights[k] = a.weights[k];
    p.grad_teachers[k] = a.grad_teachers.empty() ? nullptr : a.grad_teachers[k].mutable_data_ptr();
    weight_sum += a.weights[k];
  }
  p.grad_student = a.grad_student.defined() ? a.grad_student.mutable_data_ptr() : nullptr;
  p.labels = a.labels.defined() ? a.labels.const_data_ptr<int64_t>() : nullptr;
  p.valid_count = reduction.valid_count();
  p.row_loss = reduction.row_loss.mutable_data_ptr();
  p.rows = rows;
  p.cols = a.student.size(1);
  p.student_stride = a.student.stride(0);
  p.ignore_index = a.ignore_index;
  p.divisor = reduction.divisor;
  p.temperature = a.temperature;
  p.weight_sum = weight_sum;
  dispatch_dtype_pair(a.student.scalar_type(), a.teachers[0].scalar_type(),
                      "multi_teacher_kd_loss", [&](auto s, auto t) {
                        launch_rows<decltype(s), decltype(t)>(p, stream);
                      });
  reduction.finish();
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> multi_teacher_kd_loss_cuda(
    const at::Tensor& student_logits,
    at::TensorList teacher_logits,
    at::ArrayRef<double> weights,
    const std::optional<at::Tensor>& labels,
    double temperature,
    int64_t ignore_index,
    std::string_view reduction,
    bool student_grad,
    bool teacher_grad) {
  return multi_teacher_kd_loss_impl<c10::cuda::CUDAGuard>(
      student_logits, teacher_logits, weights, labels, temperature, ignore_index, reduction,
      student_grad, teacher_grad, launch);
}

}  // namespace
}  // namespace pykd::cuda

TORCH_LIBRARY_IMPL(pykd, CUDA, m) {
  m.impl("multi_teacher_kd_loss", &pykd::cuda::multi_teacher_kd_loss_cuda);
}
