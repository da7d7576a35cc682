// CPU implementation of pykd::multi_teacher_kd_loss (checks and allocation are
// multi_teacher_kd_loss.h's): the valid rows' count, the kernel for this CPU
// (cpu/cpu_capability.h) in one parallel region over the rows, the reduction in a fixed order.
#include "multi_teacher_kd_loss.h"
#include "cpu/cpu_capability.h"
#include "cpu/multi_teacher_kd_loss_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace pykd::cpu {
namespace {

struct NoGuard {
  explicit NoGuard(const c10::Device&) {}
};

int64_t count_valid_rows(const MultiTeacherArgs& args) {
  if (!args.labels.defined()) {
    return args.student.size(0);
  }
  const int64_t* labels = args.labels.const_data_ptr<int64_t>();
  const int64_t rows = args.labels.numel();
  return std::count_if(labels, labels + rows, [&](int64_t l) { return l != args.ignore_index; });
}

// sum(values) in double, in a fixed order whatever the number of threads (as kd_loss_cpu.cpp's).
double deterministic_sum(const at::Tensor& values) {
  constexpr int64_t kChunk = 4096;
  const int64_t n = values.numel();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "multi_teacher_kd_loss_sum", [&] {
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double sum = 0;
        for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
          sum += v[i];
        }
        partial[c] = sum;
      }
    });
  });
  double total = 0;
  for (double p : partial) {
    total += p;
  }
  return total;
}

void launch(const MultiTeacherArgs& args) {
  const int64_t valid = count_valid_rows(args);
  const double denominator =
      args.reduction == Reduction::BatchMean ? double(std::max<int64_t>(valid, 1)) : 1.0;
  const at::Tensor row_loss = args.reduction == Reduction::None
      ? args.loss
      : at::empty({args.student.size(0)}, args.loss.options());
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
  kernel.inv_denominator = 1.0 / denominator;
  kernel.row_loss = row_loss.mutable_data_ptr();
  kernel.grad_student =
      args.grad_student.defined() ? args.grad_student.mutable_data_ptr() : nullptr;
  use_avx2() ? AVX2::multi_teacher_kd_loss_rows(kernel)
             : DEFAULT::multi_teacher_kd_loss_rows(kernel);
  if (args.reduction != Reduction::None) {
    args.loss.fill_(deterministic_sum(row_loss) / denominator);
  }
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
