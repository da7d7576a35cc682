// CPU implementation of pykd::scale_grads_ (the backward of the fused losses): each gradient is
// multiplied in place by the scale read from the CPU tensor, in one at::parallel_for region over
// runs of at most kRun elements of all the gradients (one region per gradient for a per-row
// scale); nothing is touched where the scale is exactly 1 (an upstream gradient of 1: the usual
// loss.backward()).
#include "scale_grads.h"
#include "cpu/cpu_capability.h"
#include "cpu/scale_grads_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace pykd::cpu {
namespace {

constexpr int64_t kRun = int64_t{1} << 16;

// Element i of a CPU tensor of any floating dtype and any shape, as a double (exact).
double element(const at::Tensor& flat, int64_t i) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, flat.scalar_type(), "scale_grads_", [&] {
    return static_cast<double>(flat.const_data_ptr<scalar_t>()[i * flat.stride(0)]);
  });
}

void scale_grads_cpu(at::TensorList grads, const at::Tensor& scale) {
  const bool per_row = check_scale_grads(grads, scale);
  const auto kernel = PYKD_CPU_KERNEL(scale_in_place);
  if (per_row) {
    const at::Tensor flat = scale.reshape({-1});  // a view when it can be (an expanded 1 too)
    for (const at::Tensor& g : grads) {
      const int64_t cols = g.size(-1), rows = flat.numel();
      if (g.numel() == 0) {
        continue;
      }
      char* data = static_cast<char*>(g.mutable_data_ptr());
      const int64_t row_bytes = cols * g.element_size();
      const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / cols);
      at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const double s = element(flat, r);
          if (s != 1.0) {
            kernel(g.scalar_type(), data + r * row_bytes, cols, s);
          }
        }
      });
    }
    return;
  }
  if (grads.empty()) {
    return;
  }
  const double s = element(scale.reshape({-1}), 0);
  if (s == 1.0) {
    return;
  }
  struct Run {
    size_t grad;
    int64_t begin, end;
  };
  std::vector<Run> runs;
  int64_t total = 0;
  for (size_t k = 0; k < grads.size(); ++k) {
    const int64_t n = grads[k].numel();
    for (int64_t begin = 0; begin < n; begin += kRun) {
      runs.push_back({k, begin, std::min(begin + kRun, n)});
    }
    total += n;
  }
  // Dense gradients (channels_last too) are scaled as the flat span of memory they cover.
  const int64_t n = static_cast<int64_t>(runs.size());
  at::parallel_for(0, n, total < at::internal::GRAIN_SIZE ? n + 1 : 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const at::Tensor& g = grads[runs[i].grad];
      kernel(
          g.scalar_type(),
          static_cast<char*>(g.mutable_data_ptr()) + runs[i].begin * g.element_size(),
          runs[i].end - runs[i].begin, s);
    }
  });
}

}  // namespace
}  // namespace pykd::cpu

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("scale_grads_", &pykd::cpu::scale_grads_cpu);
}
