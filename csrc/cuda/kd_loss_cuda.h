// What the CUDA KD-loss files share: the row problem that kd_loss_cuda.cu (the op, its small
// kernels and the reduction) hands to the row kernel of kd_loss_rows.cuh, which is compiled once
// per divergence in kd_loss_forward_kl.cu, kd_loss_reverse_kl.cu and kd_loss_jensen_shannon.cu
// (so that the three compile in parallel).
#pragma once

#include <c10/core/ScalarType.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace pykd::cuda {

// One launch of the row kernel: [rows, cols] logits (cols >= 2; unit class stride, any row
// stride), the gradients' contiguous [rows, cols] buffers (null when not asked for) and the
// per-row losses it writes. Row r's loss is
//   soft_weight * T^2 * divergence_r + hard_weight * cross_entropy_r        (0 if masked)
// and its gradients those of that loss divided by D: *valid_count (at least 1) when valid_count
// is not null, `divisor` otherwise.
struct KdRowProblem {
  at::ScalarType student_dtype, teacher_dtype;
  const void* student;
  const void* teacher;
  void* grad_student;
  void* grad_teacher;
  const int64_t* labels;       // [rows], or null: every row is valid
  const int64_t* valid_count;  // on the device, or null
  void* row_loss;              // [rows] of the accumulation dtype
  int64_t rows, cols, student_stride, teacher_stride, ignore_index, divisor;
  double temperature, soft_weight, hard_weight;
  cudaStream_t stream;
};

// Launches the row kernel for divergence Div (divergence.h) on problem.stream. Explicitly
// instantiated for ForwardKL, ReverseKL and JensenShannon<float / double> in their own files.
template <typename Div>
void launch_kd_rows(const KdRowProblem& problem, const Div& divergence);

}  // namespace pykd::cuda
