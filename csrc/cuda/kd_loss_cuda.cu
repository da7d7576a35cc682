// CUDA implementation of pykd::kd_loss: kd_loss.h's op body (checks before the device guard) on
// the logits' device and the current stream, with at most three launches and no host sync:
//   1. with labels under "batchmean", count_valid_kernel counts the valid rows into a device
//      scalar (D), which the next kernel reads;
//   2. the row kernel (kd_loss_rows.cuh, one file per divergence) writes every row's loss and the
//      gradients; for one class, one_class_kernel instead (every divergence and the
//      cross-entropy of a single class are exactly 0, or NaN for a non-finite logit, and so are
//      the gradients, with no rounding noise);
//   3. unless reduction is "none" (where the row losses are the output), reduce_kernel adds the
//      row losses in a fixed order (in float64) and divides by D: the loss is deterministic.
// All of it runs under CUDA graphs.
#include "cuda/kd_loss_cuda.h"
#include "divergence.h"
#include "kd_loss.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <limits>
#include <optional>
#include <string_view>
#include <tuple>

namespace pykd::cuda {
namespace {

constexpr int kReduceThreads = 512;

// The number of rows whose label is not ignore_index, by one block in a fixed order.
__global__ void __launch_bounds__(kReduceThreads) count_valid_kernel(
    const int64_t* __restrict__ labels,
    int64_t rows,
    int64_t ignore_index,
    int64_t* __restrict__ count) {
  int64_t n = 0;
  for (int64_t i = threadIdx.x; i < rows; i += kReduceThreads) {
    n += labels[i] != ignore_index;
  }
  using BlockReduce = cub::BlockReduce<int64_t, kReduceThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  n = BlockReduce(temp).Sum(n);
  if (threadIdx.x == 0) {
    *count = n;
  }
}

// loss = sum of the row losses / D, the sum in float64 and in an order fixed by `rows`.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) reduce_kernel(
    const acc_t* __restrict__ row_loss,
    int64_t rows,
    const int64_t* __restrict__ valid_count,
    int64_t divisor,
    acc_t* __restrict__ loss) {
  double sum = 0;
  for (int64_t i = threadIdx.x; i < rows; i += kReduceThreads) {
    sum += static_cast<double>(row_loss[i]);
  }
  using BlockReduce = cub::BlockReduce<double, kReduceThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  sum = BlockReduce(temp).Sum(sum);
  if (threadIdx.x == 0) {
    const int64_t d = valid_count != nullptr ? *valid_count : divisor;
    *loss = static_cast<acc_t>(sum / static_cast<double>(d > 1 ? d : 1));
  }
}

// One class: both softmaxes are exactly 1, so every divergence and the cross-entropy are 0, and
// so are the gradients, exactly (the row kernel would leave rounding noise). As on the CPU, a
// NaN or infinite logit makes the row's loss NaN (x - x), and its own gradient NaN.
template <typename s_t, typename t_t>
__global__ void __launch_bounds__(256) one_class_kernel(const KdRowProblem p) {
  using acc_t = at::opmath_type<s_t>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; row < p.rows; row += stride) {
    const int64_t label = p.labels != nullptr ? p.labels[row] : 0;
    const bool valid = p.labels == nullptr || label != p.ignore_index;
    // With a hard-label term a valid label must be the one class, as in F.cross_entropy.
    CUDA_KERNEL_ASSERT(!(valid && p.hard_weight > 0) || label == 0);
    const acc_t x = static_cast<acc_t>(static_cast<const s_t*>(p.student)[row * p.student_stride]);
    const acc_t y = static_cast<acc_t>(static_cast<const t_t*>(p.teacher)[row * p.teacher_stride]);
    static_cast<acc_t*>(p.row_loss)[row] = valid ? (x - x) + (y - y) : acc_t(0);
    if (p.grad_student != nullptr) {
      static_cast<s_t*>(p.grad_student)[row] = static_cast<s_t>(valid ? (x - x) * 0 : acc_t(0));
    }
    if (p.grad_teacher != nullptr) {
      static_cast<t_t*>(p.grad_teacher)[row] = static_cast<t_t>(valid ? (y - y) * 0 : acc_t(0));
    }
  }
}

template <typename F>
void dispatch_logits(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kDouble:
      return f(double{});
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(at::Half{});
    case at::kBFloat16:
      return f(at::BFloat16{});
    default:
      TORCH_INTERNAL_ASSERT(false, "kd_loss: unexpected logits dtype ", dtype);
  }
}

void launch_one_class(const KdRowProblem& problem) {
  const int64_t blocks = std::min<int64_t>((problem.rows + 255) / 256, 65536);
  dispatch_logits(problem.student_dtype, [&](auto s) {
    dispatch_logits(problem.teacher_dtype, [&](auto t) {
      using s_t = decltype(s);
      using t_t = decltype(t);
      // kd_loss.h allows float64 only with float64.
      if constexpr (std::is_same_v<s_t, double> == std::is_same_v<t_t, double>) {
        one_class_kernel<s_t, t_t>
            <<<static_cast<unsigned int>(blocks), 256, 0, problem.stream>>>(problem);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        TORCH_INTERNAL_ASSERT(false, "kd_loss: float64 logits with another dtype");
      }
    });
  });
}

void launch(const KdArgs& a) {
  const at::Tensor& s = a.student;
  const at::Tensor& t = a.teacher;
  const int64_t rows = s.size(0), cols = s.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool labelled = a.labels.defined();
  const at::ScalarType acc = a.loss.scalar_type();

  at::Tensor valid_count;
  if (labelled && a.reduction == Reduction::BatchMean) {
    valid_count = at::empty({}, a.labels.options());
    count_valid_kernel<<<1, kReduceThreads, 0, stream>>>(
        a.labels.const_data_ptr<int64_t>(), rows, a.ignore_index,
        valid_count.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t divisor = a.reduction == Reduction::BatchMean && !labelled ? rows : 1;
  const at::Tensor row_loss =
      a.reduction == Reduction::None ? a.loss : at::empty({rows}, a.loss.options());

  const KdRowProblem problem{
      s.scalar_type(),
      t.scalar_type(),
      s.const_data_ptr(),
      t.const_data_ptr(),
      a.grad_student.defined() ? a.grad_student.mutable_data_ptr() : nullptr,
      a.grad_teacher.defined() ? a.grad_teacher.mutable_data_ptr() : nullptr,
      labelled ? a.labels.const_data_ptr<int64_t>() : nullptr,
      valid_count.defined() ? valid_count.const_data_ptr<int64_t>() : nullptr,
      row_loss.mutable_data_ptr(),
      rows,
      cols,
      s.stride(0),
      t.stride(0),
      a.ignore_index,
      divisor,
      a.temperature,
      a.soft_weight,
      a.hard_weight,
      stream};
  if (cols == 1) {
    launch_one_class(problem);
  } else if (acc == at::kDouble) {
    dispatch_divergence<double>(a.beta, [&](auto div) { launch_kd_rows(problem, div); });
  } else {
    dispatch_divergence<float>(a.beta, [&](auto div) { launch_kd_rows(problem, div); });
  }

  if (a.reduction != Reduction::None) {
    const int64_t* count = valid_count.defined() ? valid_count.const_data_ptr<int64_t>() : nullptr;
    if (acc == at::kDouble) {
      reduce_kernel<double><<<1, kReduceThreads, 0, stream>>>(
          row_loss.const_data_ptr<double>(), rows, count, divisor,
          a.loss.mutable_data_ptr<double>());
    } else {
      reduce_kernel<float><<<1, kReduceThreads, 0, stream>>>(
          row_loss.const_data_ptr<float>(), rows, count, divisor,
          a.loss.mutable_data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_cuda(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double beta,
    double soft_weight,
    double hard_weight,
    int64_t ignore_index,
    std::string_view reduction,
    bool student_grad,
    bool teacher_grad) {
  return kd_loss_impl<c10::cuda::CUDAGuard>(
      student_logits, teacher_logits, labels, temperature, beta, soft_weight, hard_weight,
      ignore_index, reduction, student_grad,
      teacher_grad, launch);
}

}  // namespace
}  // namespace pykd::cuda

TORCH_LIBRARY_IMPL(pykd, CUDA, m) {
  m.impl("kd_loss", &pykd::cuda::kd_loss_cuda);
}
