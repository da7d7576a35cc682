// CPU implementation of pykd::sparse_kd_loss (checks and allocation are sparse_kd_loss.h's): the
// valid rows' count, the kernel for this CPU (cpu/cpu_capability.h), the reduction.
#include "sparse_kd_loss.h"
#include "cpu/cpu_capability.h"
#include "cpu/sparse_kd_loss_cpu.h"
#include "cpu/row_reduction.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace pykd::cpu {
namespace {

void launch(const SparseKdArgs& args) {
  const int64_t rows = args.student.size(0);
  const auto kernel_rows = [&](void* row_loss, double inv_denominator) {
    const SparseKdKernelArgs kernel{
        args.student.scalar_type(),
        args.values.scalar_type(),
        args.indices.scalar_type(),
        args.student.const_data_ptr(),
        args.values.const_data_ptr(),
        args.indices.const_data_ptr(),
        args.lse.defined() ? args.lse.const_data_ptr() : nullptr,
        args.student.size(0),
        args.student.size(1),
        args.values.size(1),
        args.student.stride(0),
        args.values.stride(0),
        args.indices.stride(0),
        args.labels.defined() ? args.labels.const_data_ptr<int64_t>() : nullptr,
        args.ignore_index,
        args.temperature,
        inv_denominator,
        row_loss,
        args.grad_student.defined() ? args.grad_student.data_ptr() : nullptr};
    PYKD_CPU_KERNEL(sparse_kd_loss_rows)(kernel);
  };
  reduce_rows(args.reduction, rows, count_valid_rows(args.labels, rows, args.ignore_index),
              args.loss, kernel_rows);
}

std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_cpu(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_values,
    const at::Tensor& teacher_indices,
    const std::optional<at::Tensor>& teacher_lse,
    const std::optional<at::Tensor>& labels,
    double temperature,
    int64_t ignore_index,
    c10::string_view reduction,
    bool student_grad) {
  return sparse_kd_loss_impl<NoGuard>(
      student_logits, teacher_values, teacher_indices, teacher_lse, labels, temperature,
      ignore_index, std::string_view(reduction.data(), reduction.size()), student_grad, launch);
}

}  // namespace
}  // namespace pykd::cpu

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("sparse_kd_loss", &pykd::cpu::sparse_kd_loss_cpu);
}
