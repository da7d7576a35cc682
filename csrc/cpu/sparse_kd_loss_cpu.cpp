// CPU implementation of pykd::sparse_kd_loss (checks and allocation are sparse_kd_loss.h's): the
// valid rows' count, the kernel for this CPU (cpu/cpu_capability.h), the reduction.
#include "sparse_kd_loss.h"
#include "cpu/cpu_capability.h"
#include "cpu/sparse_kd_loss_cpu.h"

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

int64_t count_valid_rows(const SparseKdArgs& args) {
  if (!args.labels.defined()) {
    return args.student.size(0);
  }
  const int64_t* labels = args.labels.const_data_ptr<int64_t>();
  const int64_t rows = args.labels.numel();
  return std::count_if(
      labels, labels + rows, [&](int64_t label) { return label != args.ignore_index; });
}

// sum(values) in double, in a fixed order whatever the number of threads (as kd_loss_cpu.cpp).
double deterministic_sum(const at::Tensor& values) {
  constexpr int64_t kChunk = 4096;
  const int64_t n = values.numel();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparse_kd_loss_sum", [&] {
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

void launch(const SparseKdArgs& args) {
  const int64_t valid = count_valid_rows(args);
  const double denominator =
      args.reduction == Reduction::BatchMean ? double(std::max<int64_t>(valid, 1)) : 1.0;
  const at::Tensor row_loss = args.reduction == Reduction::None
      ? args.loss
      : at::empty({args.student.size(0)}, args.loss.options());
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
      1.0 / denominator,
      row_loss.data_ptr(),
      args.grad_student.defined() ? args.grad_student.data_ptr() : nullptr};
  use_avx2() ? AVX2::sparse_kd_loss_rows(kernel) : DEFAULT::sparse_kd_loss_rows(kernel);
  if (args.reduction != Reduction::None) {
    args.loss.fill_(deterministic_sum(row_loss) / denominator);
  }
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
