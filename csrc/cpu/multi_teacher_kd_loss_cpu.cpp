// CPU implementation of pykd::multi_teacher_kd_loss (checks and allocation are
// multi_teacher_kd_loss.h's): the valid rows' count, the kernel for this CPU
// (cpu/cpu_capability.h) in one parallel region over the rows, the reduction in a fixed order.
#include "multi_teacher_kd_loss.h"
#include "cpu/cpu_capability.h"
#include "cpu/multi_teacher_kd_loss_cpu.h"
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

void launch(const MultiTeacherArgs& args) {
  const int64_t rows = args.student.size(0);
  const auto kernel_rows = [&](void* row_loss, double inv_denominator) {
    MultiTeacherKernelArgs kernel{};
    kernel.student_dtype = args.student.scalar_type();
    kernel.teacher_dtype = args.teachers[0].scalar_type();
    kernel.student = args.student.const_data_ptr();
    kernel.student_stride = args.student.stride(0);
    kernel.teacher_count = static_cast<int64_t>(args.teachers.size());
    for (size_t k = 0; k < args.teachers.size(); ++k) {
      kernel.teachers[k] = args.teachers[k].const_data_ptr();
      kernel.teacher_strides[k] = args.teachers[k].stride(0);
      kernel.weights[k] = args.weights[k];
      kernel.grad_teachers[k] =
          args.grad_teachers.empty() ? nullptr : args.grad_teachers[k].mutable_data_ptr();
    }
    kernel.rows = args.student.size(0);
    kernel.cols = args.student.size(1);
    kernel.labels = args.labels.defined() ? args.labels.const_data_ptr<int64_t>() : nullptr;
    kernel.ignore_index = args.ignore_index;
    kernel.temperature = args.temperature;
    kernel.inv_denominator = inv_denominator;
    kernel.row_loss = row_loss;
    kernel.grad_student =
        args.grad_student.defined() ? args.grad_student.mutable_data_ptr() : nullptr;
    PYKD_CPU_KERNEL(multi_teacher_kd_loss_rows)(kernel);
  };
  reduce_rows(args.reduction, rows, count_valid_rows(args.labels, rows, args.ignore_index),
              args.loss, kernel_rows);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> multi_teacher_kd_loss_cpu(
    const at::Tensor& student_logits,
    at::TensorList teacher_logits,
    at::ArrayRef<double> weights,
    const std::optional<at::Tensor>& labels,
    double temperature,
    int64_t ignore_index,
    c10::string_view reduction,
    bool student_grad,
    bool teacher_grad) {
  return multi_teacher_kd_loss_impl<NoGuard>(
      student_logits, teacher_logits, weights, labels, temperature, ignore_index,
      std::string_view(reduction.data(), reduction.size()), student_grad, teacher_grad, launch);
}

}  // namespace
}  // namespace pykd::cpu

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("multi_teacher_kd_loss", &pykd::cpu::multi_teacher_kd_loss_cpu);
}
