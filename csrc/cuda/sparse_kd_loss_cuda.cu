// CUDA implementation of pykd::sparse_kd_loss: sparse_kd_loss.h's op body (checks before the
// device guard) on the logits' device and the current stream, with at most three launches and no
// host sync (so it runs under CUDA graphs):
//   1. with labels under "batchmean", count_valid_kernel counts the valid rows into a device
//      scalar D, which the row kernel reads;
//   2. sparse_rows_kernel, one block of kThreads threads per row (a grid-stride loop over rows):
//      a. the K teacher entries (strided over the threads): their indices checked (an index
//         outside [0, V) is a device-side assert; with assertions compiled out the row's loss
//         and gradient become NaN), their classes marked in a bitmap of V bits in shared memory
//         (a second bitmap marks repeated classes), their log p_k, the first kStageEntries of
//         them staged in shared memory with their classes;
//      b. one read of the student row from global memory with online sums in base 2 (running
//         maximum m, sum of exp2(x log2(e)/T - m log2(e)/T), and the same over the classes the
//         bitmap does not name: the tail), merged over the block;
//      c. the entries' terms and, with teacher_lse and r > 0, the tail bucket; a tail below
//         kSmallTail of the row's maximum is summed again relative to its own maximum (a second
//         read, in such rows only), so q keeps its relative accuracy;
//      d. with a gradient, a second read of the row (from L2 for the rows in flight) writing
//         T/D (u p_j - r p_j / q) for the tail classes, then u p_s - p_k for each named class;
//         a repeated class is summed by one thread in entry order (in the gradient's dtype);
//   3. unless reduction is "none", reduce_kernel adds the row losses in float64 in a fixed order
//      and divides by D: the loss is deterministic.
// Offsets are int64. The bitmaps take 2 * ceil(V / 32) * 4 bytes of dynamic shared memory
// (32 KiB at V = 128256); beyond 48 KiB the kernel opts in to more, up to the device's limit.
#include "cuda/acc_math.cuh"
#include "cuda/dtype_dispatch.cuh"
#include "cuda/row_reduction.cuh"
#include "sparse_kd_loss.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>

namespace pykd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // student logits each thread loads before using them
constexpr int kStageEntries = 1024;
constexpr double kSmallTail = 0x1p-40;  // as in the CPU kernel

struct SparseRowProblem {
  const void* student;
  const void* values;
  const void* indices;
  const void* lse;  // [rows] in the accumulation type, or null: the top-k is renormalised
  const int64_t* labels;
  const int64_t* valid_count;  // D on the device, or null: divisor
  void* row_loss;
  void* grad;
  int64_t rows, cols, k, student_stride, values_stride, indices_stride, ignore_index, divisor;
  double temperature;
};

struct MaxNan {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return max_nan(a, b);
  }
};

struct Add {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

__device__ __forceinline__ bool is_marked(const uint32_t* bitmap, int64_t j) {
  return (bitmap[j >> 5] >> (j & 31)) & 1u;
}

// A block-wide reduction whose result every thread gets; the barriers make temp and the
// broadcast slot reusable right after.
template <typename acc_t>
struct BlockAll {
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  typename Reduce::TempStorage& temp;
  acc_t& slot;
  template <typename Op>
  __device__ __forceinline__ acc_t operator()(acc_t x, Op op) {
    const acc_t r = Reduce(temp).Reduce(x, op);
    if (threadIdx.x == 0) {
      slot = r;
    }
    __syncthreads();
    const acc_t all = slot;
    __syncthreads();
    return all;
  }
  __device__ __forceinline__ acc_t sum(acc_t x) {
    return (*this)(x, Add());
  }
  __device__ __forceinline__ acc_t max(acc_t x) {
    return (*this)(x, MaxNan());
  }
};

// A thread's online sums over part of a row: all classes, and the tail classes only.
template <typename acc_t>
struct Online {
  acc_t max, sum, tail;
  __device__ __forceinline__ void add(acc_t x, bool tail_class, acc_t scale) {
    const acc_t m = max_nan(max, x);
    if (m != max) {
      if (max != -std::numeric_limits<acc_t>::infinity()) {
        const acc_t factor = exp2_acc(reference(max, scale) - reference(m, scale));
        sum *= factor;
        tail *= factor;
      }
      max = m;
    }
    const acc_t e = exp2_acc(fma_acc(x, scale, -reference(max, scale)));
    sum += e;
    tail += tail_class ? e : acc_t(0);
  }
};

template <typename s_t, typename v_t, typename i_t>
__global__ void __launch_bounds__(kThreads) sparse_rows_kernel(const SparseRowProblem p) {
  using acc_t = at::opmath_type<s_t>;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  extern __shared__ uint32_t bitmaps[];
  __shared__ int32_t stage_index[kStageEntries];
  __shared__ acc_t stage_log_p[kStageEntries];
  __shared__ typename BlockAll<acc_t>::Reduce::TempStorage temp;
  __shared__ acc_t slot;
  __shared__ int bad_index, distinct, repeats;
  BlockAll<acc_t> block{temp, slot};

  const int tid = threadIdx.x;
  const int64_t cols = p.cols, k_count = p.k, words = (cols + 31) / 32;
  uint32_t* named = bitmaps;
  uint32_t* repeated = bitmaps + words;
  const acc_t temperature = static_cast<acc_t>(p.temperature);
  const acc_t inv_temp = acc_t(1) / temperature;
  const acc_t scale = static_cast<acc_t>(kLog2e / p.temperature);  // base 2: x log2(e) / T
  const acc_t ln2 = static_cast<acc_t>(kLn2);
  const int64_t d = p.valid_count != nullptr ? *p.valid_count : p.divisor;
  const acc_t grad_scale = temperature / static_cast<acc_t>(d > 1 ? d : 1);
  const auto* lse = static_cast<const acc_t*>(p.lse);
  auto* row_loss = static_cast<acc_t*>(p.row_loss);

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    s_t* grad = p.grad != nullptr ? static_cast<s_t*>(p.grad) + row * cols : nullptr;
    if (p.labels != nullptr && p.labels[row] == p.ignore_index) {  // the same for the block
      for (int64_t j = tid; j < cols; j += kThreads) {
        if (grad != nullptr) {
          grad[j] = s_t(0);
        }
      }
      if (tid == 0) {
        row_loss[row] = 0;
      }
      continue;
    }
    const s_t* s = static_cast<const s_t*>(p.student) + row * p.student_stride;
    const v_t* v = static_cast<const v_t*>(p.values) + row * p.values_stride;
    const i_t* idx = static_cast<const i_t*>(p.indices) + row * p.indices_stride;

    // a. The teacher's entries.
    __syncthreads();  // the previous row is done with the bitmaps and the staged entries
    for (int64_t w = tid; w < 2 * words; w += kThreads) {
      bitmaps[w] = 0;
    }
    if (tid == 0) {
      bad_index = 0;
      distinct = 0;
      repeats = 0;
    }
    acc_t ref_t = 0, log_sum_t = 0;  // renormalised: log p_k = (v_k / T - ref_t) - log_sum_t
    if (lse != nullptr) {
      ref_t = lse[row];
    } else {
      acc_t m = -kInf;
      for (int64_t k = tid; k < k_count; k += kThreads) {
        m = max_nan(m, static_cast<acc_t>(v[k]));
      }
      m = block.max(m);
      ref_t = m == -kInf ? acc_t(0) : m * inv_temp;
      acc_t sum = 0;
      for (int64_t k = tid; k < k_count; k += kThreads) {
        sum += exp_acc(fma_acc(static_cast<acc_t>(v[k]), inv_temp, -ref_t));
      }
      sum = block.sum(sum);
      log_sum_t = sum > 0 ? log_acc(sum) : acc_t(0);  // no teacher mass: p = 0, as in kd_loss
    }
    auto log_p_of = [&](acc_t value) {
      return lse != nullptr ? value * inv_temp - ref_t
                            : fma_acc(value, inv_temp, -ref_t) - log_sum_t;
    };
    __syncthreads();  // the bitmaps are clear
    acc_t teacher_mass = 0;
    for (int64_t k = tid; k < k_count; k += kThreads) {
      const int64_t j = static_cast<int64_t>(idx[k]);
      const bool in_range = j >= 0 && j < cols;
      CUDA_KERNEL_ASSERT(in_range && "sparse_kd_loss: teacher_indices must be in [0, V)");
      const acc_t log_p = log_p_of(static_cast<acc_t>(v[k]));
      teacher_mass += exp_acc(log_p);
      if (!in_range) {
        atomicOr(&bad_index, 1);
        continue;
      }
      const uint32_t bit = 1u << (j & 31);
      if (atomicOr(&named[j >> 5], bit) & bit) {
        atomicOr(&repeated[j >> 5], bit);
        atomicAdd(&repeats, 1);
      } else {
        atomicAdd(&distinct, 1);
      }
      if (k < kStageEntries) {
        stage_index[k] = static_cast<int32_t>(j);
        stage_log_p[k] = log_p;
      }
    }
    teacher_mass = block.sum(teacher_mass);  // its barriers publish the bitmaps and the stage
    if (bad_index != 0) {
      const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
      for (int64_t j = tid; j < cols; j += kThreads) {
        if (grad != nullptr) {
          grad[j] = static_cast<s_t>(nan);
        }
      }
      if (tid == 0) {
        row_loss[row] = nan;
      }
      continue;
    }
    auto entry = [&](int64_t k, int64_t& j, acc_t& log_p) {
      if (k < kStageEntries) {
        j = stage_index[k];
        log_p = stage_log_p[k];
      } else {
        j = static_cast<int64_t>(idx[k]);
        log_p = log_p_of(static_cast<acc_t>(v[k]));
      }
    };

    // b. The student's statistics.
    Online<acc_t> o{-kInf, acc_t(0), acc_t(0)};
    for (int64_t base = tid; base < cols; base += kUnroll * kThreads) {
      acc_t x[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = base + int64_t(u) * kThreads;
        x[u] = j < cols ? static_cast<acc_t>(s[j]) : -kInf;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = base + int64_t(u) * kThreads;
        if (j < cols) {
          o.add(x[u], !is_marked(named, j), scale);
        }
      }
    }
    const acc_t row_max = block.max(o.max);
    const acc_t ref_s = reference(row_max, scale);
    const acc_t move = o.max == -kInf ? acc_t(0) : exp2_acc(reference(o.max, scale) - ref_s);
    const acc_t z = block.sum(o.sum * move);
    acc_t tail_z = block.sum(o.tail * move);
    // A student without mass keeps p_s = 0 and log p_s = -inf (a loss of +inf where p_k > 0).
    const acc_t log2_z = z > 0 ? log2_acc(z) : acc_t(0);
    const acc_t inv_z = z > 0 ? acc_t(1) / z : acc_t(0);

    // c. The loss.
    acc_t value = 0;
    for (int64_t k = tid; k < k_count; k += kThreads) {
      int64_t j;
      acc_t log_p;
      entry(k, j, log_p);
      const acc_t pk = exp_acc(log_p);
      const acc_t log_ps = ln2 * (fma_acc(static_cast<acc_t>(s[j]), scale, -ref_s) - log2_z);
      value += pk != 0 ? pk * (log_p - log_ps) : acc_t(0);
    }
    value = block.sum(value);
    acc_t r = 0, u = 1;
    if (lse != nullptr) {
      r = distinct == cols ? acc_t(0) : max_nan(acc_t(0), acc_t(1) - teacher_mass);
      u = teacher_mass + r;
    }
    acc_t tail_ref = ref_s;
    bool own_tail_reference = false;
    if (r > 0) {  // the same for the block
      if (!(tail_z >= acc_t(kSmallTail))) {
        own_tail_reference = true;
        acc_t m = -kInf;
        for (int64_t j = tid; j < cols; j += kThreads) {
          if (!is_marked(named, j)) {
            m = max_nan(m, static_cast<acc_t>(s[j]));
          }
        }
        tail_ref = reference(block.max(m), scale);
        acc_t sum = 0;
        for (int64_t j = tid; j < cols; j += kThreads) {
          if (!is_marked(named, j)) {
            sum += exp2_acc(fma_acc(static_cast<acc_t>(s[j]), scale, -tail_ref));
          }
        }
        tail_z = block.sum(sum);
      }
      // q = 2^(tail_ref - ref_s) tail_z / z; log2 of 0 is -inf: q = 0, a loss of +inf.
      const acc_t log_q = ln2 * ((tail_ref - ref_s) + (log2_acc(tail_z) - log2_z));
      value += r * (log_acc(r) - log_q);
    }
    if (tid == 0) {
      row_loss[row] = temperature * temperature * value;
    }
    if (grad == nullptr) {
      continue;
    }

    // d. The gradient: the tail classes, then the named ones.
    const bool tail_grad = r > 0 && tail_z > 0;
    const acc_t coef =
        grad_scale * (u * inv_z - (tail_grad && !own_tail_reference ? r / tail_z : acc_t(0)));
    const acc_t own_tail_coef = tail_grad && own_tail_reference ? grad_scale * r / tail_z : 0;
    for (int64_t base = tid; base < cols; base += kUnroll * kThreads) {
      acc_t x[kUnroll];
#pragma unroll
      for (int uu = 0; uu < kUnroll; ++uu) {
        const int64_t j = base + int64_t(uu) * kThreads;
        x[uu] = j < cols ? static_cast<acc_t>(s[j]) : -kInf;
      }
#pragma unroll
      for (int uu = 0; uu < kUnroll; ++uu) {
        const int64_t j = base + int64_t(uu) * kThreads;
        if (j < cols && !is_marked(named, j)) {
          acc_t g = exp2_acc(fma_acc(x[uu], scale, -ref_s)) * coef;
          if (own_tail_coef != 0) {
            g -= exp2_acc(fma_acc(x[uu], scale, -tail_ref)) * own_tail_coef;
          }
          grad[j] = static_cast<s_t>(g);
        }
      }
    }
    auto named_grad = [&](int64_t j) {  // T / D * u * p_s,j
      return grad_scale * u * exp2_acc(fma_acc(static_cast<acc_t>(s[j]), scale, -ref_s)) * inv_z;
    };
    for (int64_t k = tid; k < k_count; k += kThreads) {
      int64_t j;
      acc_t log_p;
      entry(k, j, log_p);
      if (!is_marked(repeated, j)) {
        grad[j] = static_cast<s_t>(named_grad(j) - grad_scale * exp_acc(log_p));
      }
    }
    if (repeats != 0) {
      __syncthreads();  // every thread is done with the bitmaps of this row
      if (tid == 0) {  // in entry order, so the result is deterministic
        for (int64_t k = 0; k < k_count; ++k) {
          int64_t j;
          acc_t log_p;
          entry(k, j, log_p);
          if (!is_marked(repeated, j)) {
            continue;
          }
          const acc_t pk = grad_scale * exp_acc(log_p);
          const uint32_t bit = 1u << (j & 31);
          if (named[j >> 5] & bit) {  // the first entry of class j
            named[j >> 5] &= ~bit;
            grad[j] = static_cast<s_t>(named_grad(j) - pk);
          } else {
            grad[j] = static_cast<s_t>(static_cast<acc_t>(grad[j]) - pk);
          }
        }
      }
    }
  }
}

template <typename s_t, typename v_t, typename i_t>
void launch_rows(const SparseRowProblem& problem, cudaStream_t stream) {
  const auto kernel = sparse_rows_kernel<s_t, v_t, i_t>;
  const int64_t words = (problem.cols + 31) / 32;
  const size_t bitmap_bytes = static_cast<size_t>(2 * words) * sizeof(uint32_t);
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  if (bitmap_bytes + attributes.sharedSizeBytes > 48 * 1024) {
    int device, limit;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK_VALUE(
        bitmap_bytes + attributes.sharedSizeBytes <= static_cast<size_t>(limit),
        "sparse_kd_loss: ", problem.cols, " classes need ", bitmap_bytes,
        " bytes of shared memory per block on CUDA, more than this device's ", limit);
    C10_CUDA_CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bitmap_bytes)));
  }
  const int64_t blocks = std::min<int64_t>(problem.rows, int64_t(1) << 20);
  kernel<<<static_cast<unsigned int>(blocks), kThreads, bitmap_bytes, stream>>>(problem);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch(const SparseKdArgs& a) {
  const int64_t rows = a.student.size(0), cols = a.student.size(1);
  TORCH_CHECK_VALUE(
      cols <= std::numeric_limits<int32_t>::max(),
      "sparse_kd_loss: at most 2^31 - 1 classes on CUDA, got ", cols);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const RowReduction reduction(a.reduction, a.labels, rows, a.ignore_index, a.loss, stream);
  const SparseRowProblem problem{
      a.student.const_data_ptr(),
      a.values.const_data_ptr(),
      a.indices.const_data_ptr(),
      a.lse.defined() ? a.lse.const_data_ptr() : nullptr,
      a.labels.defined() ? a.labels.const_data_ptr<int64_t>() : nullptr,
      reduction.valid_count(),
      reduction.row_loss.mutable_data_ptr(),
      a.grad_student.defined() ? a.grad_student.mutable_data_ptr() : nullptr,
      rows,
      cols,
      a.values.size(1),
      a.student.stride(0),
      a.values.stride(0),
      a.indices.stride(0),
      a.ignore_index,
      reduction.divisor,
      a.temperature};
  dispatch_dtype_pair(a.student.scalar_type(), a.values.scalar_type(), "sparse_kd_loss",
                      [&](auto s, auto v) {
                        if (a.indices.scalar_type() == at::kInt) {
                          launch_rows<decltype(s), decltype(v), int32_t>(problem, stream);
                        } else {
                          launch_rows<decltype(s), decltype(v), int64_t>(problem, stream);
                        }
                      });
  reduction.finish();
}

std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_cuda(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_values,
    const at::Tensor& teacher_indices,
    const std::optional<at::Tensor>& teacher_lse,
    const std::optional<at::Tensor>& labels,
    double temperature,
    int64_t ignore_index,
    std::string_view reduction,
    bool student_grad) {
  return sparse_kd_loss_impl<c10::cuda::CUDAGuard>(
      student_logits, teacher_values, teacher_indices, teacher_lse, labels, temperature,
      ignore_index, reduction, student_grad, launch);
}

}  // namespace
}  // namespace pykd::cuda

TORCH_LIBRARY_IMPL(pykd, CUDA, m) {
  m.impl("sparse_kd_loss", &pykd::cuda::sparse_kd_loss_cuda);
}
