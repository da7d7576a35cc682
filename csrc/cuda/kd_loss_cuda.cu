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
#include "cuda/dtype_dispatch.cuh"
#include "cuda/row_reduction.cuh"
#include "kd_loss.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string_view>
#include <tuple>

namespace pykd::cuda {
namespace {

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

void launch_one_class(const KdRowProblem& problem) {
  const int64_t blocks = std::min<int64_t>((problem.rows + 255) / 256, 65536);
  dispatch_dtype_pair(problem.student_dtype, problem.teacher_dtype, "kd_loss", [&](auto s, auto t) {
    one_class_kernel<decltype(s), decltype(t)>
        <<<static_cast<unsigned int>(blocks), 256, 0, problem.stream>>>(problem);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch(const KdArgs& a) {
  const at::Tensor& s = a.student;
  const at::Tensor& t = a.teacher;
  const int64_t rows = s.size(0), cols = s.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const RowReduction reduction(a.reduction, a.labels, rows, a.ignore_index, a.loss, stream);

  const KdRowProblem problem{
      s.scalar_type(),
      t.scalar_type(),
      s.const_data_ptr(),
      t.const_data_ptr(),
      a.grad_student.defined() ? a.grad_student.mutable_data_ptr() : nullptr,
      a.grad_teacher.defined() ? a.grad_teacher.mutable_data_ptr() : nullptr,
      a.labels.defined() ? a.labels.const_data_ptr<int64_t>() : nullptr,
      reduction.valid_count(),
      reduction.row_loss.mutable_data_ptr(),
      rows,
      cols,
      s.stride(0),
      t.stride(0),
      a.ignore_index,
      reduction.divisor,
      a.temperature,
      a.soft_weight,
      a.hard_weight,
      stream};
  if (cols == 1) {
    launch_one_class(problem);
  } else if (a.loss.scalar_type() == at::kDouble) {
    dispatch_divergence<double>(a.beta, [&](auto div) { launch_kd_rows(problem, div); });
  } else {
    dispatch_divergence<float>(a.beta, [&](auto div) { launch_kd_rows(problem, div); });
  }
  reduction.finish();
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
