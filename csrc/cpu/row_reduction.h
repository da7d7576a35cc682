// What the CPU drivers of the row losses (kd_loss_cpu.cpp, multi_teacher_kd_loss_cpu.cpp,
// sparse_kd_loss_cpu.cpp) share around their kernels: the valid rows' count, the per-row losses
// and their reduction in a fixed order.
#pragma once

#include "kd_loss.h"  // Reduction

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace pykd::cpu {

// The ops' shared checks take a device guard type; the CPU needs none.
struct NoGuard {
  explicit NoGuard(const c10::Device&) {}
};

// The number of rows whose label (int64, one per row, or undefined) is not ignore_index.
inline int64_t count_valid_rows(const at::Tensor& labels, int64_t rows, int64_t ignore_index) {
  if (!labels.defined()) {
    return rows;
  }
  const int64_t* l = labels.const_data_ptr<int64_t>();
  return std::count_if(l, l + labels.numel(), [&](int64_t x) { return x != ignore_index; });
}

// sum(values) in double, in a fixed order whatever the number of threads.
inline double deterministic_sum(const at::Tensor& values) {
  constexpr int64_t kChunk = 4096;
  const int64_t n = values.numel();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "pykd_row_loss_sum", [&] {
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

// Runs kernel(row_loss, inv_denominator) over `rows` rows of which `valid` count, then reduces:
// "none" lets the kernel write `loss` itself; "sum" and "batchmean" (over the valid rows, at
// least 1) fill `loss` from the per-row losses.
template <typename Kernel>
void reduce_rows(Reduction reduction, int64_t rows, int64_t valid, const at::Tensor& loss,
                 const Kernel& kernel) {
  const double denominator =
      reduction == Reduction::BatchMean ? double(std::max<int64_t>(valid, 1)) : 1.0;
  const at::Tensor row_loss =
      reduction == Reduction::None ? loss : at::empty({rows}, loss.options());
  kernel(row_loss.mutable_data_ptr(), 1.0 / denominator);
  if (reduction != Reduction::None) {
    loss.fill_(deterministic_sum(row_loss) / denominator);
  }
}

}  // namespace pykd::cpu
