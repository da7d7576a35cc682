// CPU implementation of pykd::kd_loss (checks and allocation are kd_loss.h's): the valid rows'
// count and the labels' check, the kernel for this CPU (cpu/cpu_capability.h), the reduction.
#include "kd_loss.h"
#include "cpu/cpu_capability.h"
#include "cpu/kd_loss_cpu.h"
#include "cpu/row_reduction.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace pykd::cpu {
namespace {

// The number of rows whose label is not ignore_index; with a hard-label term, every such label
// must also be a class index.
int64_t count_valid_rows(const KdArgs& args) {
  if (!args.labels.defined() || args.hard_weight == 0) {
    return cpu::count_valid_rows(args.labels, args.student.size(0), args.ignore_index);
  }
  const int64_t* labels = args.labels.const_data_ptr<int64_t>();
  const int64_t rows = args.labels.numel(), cols = args.student.size(1);
  int64_t valid = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (labels[r] == args.ignore_index) {
      continue;
    }
    ++valid;
    TORCH_CHECK_VALUE(
        labels[r] >= 0 && labels[r] < cols,
        "kd_loss: labels must be class indices in [0, ", cols, ") or ignore_index (",
        args.ignore_index, "), got ", labels[r]);
  }
  return valid;
}

void launch(const KdArgs& args) {
  const auto kernel_rows = [&](void* row_loss, double inv_denominator) {
    const KdKernelArgs kernel{
        args.student.scalar_type(),
        args.teacher.scalar_type(),
        args.student.const_data_ptr(),
        args.teacher.const_data_ptr(),
        args.student.size(0),
        args.student.size(1),
        args.student.stride(0),
        args.teacher.stride(0),
        args.labels.defined() ? args.labels.const_data_ptr<int64_t>() : nullptr,
        args.ignore_index,
        args.temperature,
        args.beta,
        args.soft_weight,
        args.hard_weight,
        inv_denominator,
        row_loss,
        args.grad_student.defined() ? args.grad_student.data_ptr() : nullptr,
        args.grad_teacher.defined() ? args.grad_teacher.data_ptr() : nullptr};
    PYKD_CPU_KERNEL(kd_loss_rows)(kernel);
  };
  reduce_rows(args.reduction, args.student.size(0), count_valid_rows(args), args.loss,
              kernel_rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_cpu(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double beta,
    double soft_weight,
    double hard_weight,
    int64_t ignore_index,
    c10::string_view reduction,
    bool student_grad,
    bool teacher_grad) {
  return kd_loss_impl<NoGuard>(
      student_logits, teacher_logits, labels, temperature, beta, soft_weight, hard_weight,
      ignore_index, std::string_view(reduction.data(), reduction.size()), student_grad,
      teacher_grad, launch);
}

}  // namespace
}  // namespace pykd::cpu

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("kd_loss", &pykd::cpu::kd_loss_cpu);
}
