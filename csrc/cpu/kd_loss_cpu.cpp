// CPU implementation of pykd::kd_loss (checks and allocation are kd_loss.h's): the valid rows'
// count and the labels' check, the kernel for this CPU (cpu/cpu_capability.h), the reduction.
#include "kd_loss.h"
#include "cpu/cpu_capability.h"
#include "cpu/kd_loss_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace pykd::cpu {
namespace {

struct NoGuard {
  explicit NoGuard(const c10::Device&) {}
};

// The number of rows whose label is not ignore_index; with a hard-label term, every such label
// must be a class index.
int64_t count_valid_rows(const KdArgs& args) {
  if (!args.labels.defined()) {
    return args.student.size(0);
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
        args.hard_weight == 0 || (labels[r] >= 0 && labels[r] < cols),
        "kd_loss: labels must be class indices in [0, ", cols, ") or ignore_index (",
        args.ignore_index, "), got ", labels[r]);
  }
  return valid;
}

// sum(values) in double, in a fixed order whatever the number of threads.
double deterministic_sum(const at::Tensor& values) {
  constexpr int64_t kChunk = 4096;
  const int64_t n = values.numel();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "kd_loss_sum", [&] {
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

void launch(const KdArgs& args) {
  const int64_t valid = count_valid_rows(args);
  const double denominator =
      args.reduction == Reduction::BatchMean ? double(std::max<int64_t>(valid, 1)) : 1.0;
  const at::Tensor row_loss = args.reduction == Reduction::None
      ? args.loss
      : at::empty({args.student.size(0)}, args.loss.options());
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
      1.0 / denominator,
      row_loss.data_ptr(),
      args.grad_student.defined() ? args.grad_student.data_ptr() : nullptr,
      args.grad_teacher.defined() ? args.grad_teacher.data_ptr() : nullptr};
  use_avx2() ? AVX2::kd_loss_rows(kernel) : DEFAULT::kd_loss_rows(kernel);
  if (args.reduction != Reduction::None) {
    args.loss.fill_(deterministic_sum(row_loss) / denominator);
  }
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
