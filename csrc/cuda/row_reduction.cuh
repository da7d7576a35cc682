// What the CUDA drivers of the row losses (kd_loss_cuda.cu, multi_teacher_kd_loss_cuda.cu,
// sparse_kd_loss_cuda.cu) share around their row kernels, with no host sync (so that they run
// under CUDA graphs): the valid rows' count on the device, the per-row losses and their
// reduction in a fixed order.
#pragma once

#include "kd_loss.h"  // Reduction

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cub/block/block_reduce.cuh>

#include <cuda_runtime.h>

#include <cstdint>

namespace pykd::cuda {
namespace {

constexpr int kReduceThreads = 512;

// The number of rows whose label is not ignore_index, by one block in a fixed order.
__global__ void __launch_bounds__(kReduceThreads) count_valid_kernel(
    const int64_t* __restrict__ labels,
    int64_t rows,
    int64_t ignore_index,
    int64_t* __restrict__ count) {
  int64_t n = 0;
  for (int64_t i = threadIdx.x; i < rows; i += kReduceThreads) {
    n += labels[i] != ignore_index;
  }
  using BlockReduce = cub::BlockReduce<int64_t, kReduceThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  n = BlockReduce(temp).Sum(n);
  if (threadIdx.x == 0) {
    *count = n;
  }
}

// loss = sum of the row losses / D, the sum in float64 and in an order fixed by `rows`.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) reduce_kernel(
    const acc_t* __restrict__ row_loss,
    int64_t rows,
    const int64_t* __restrict__ valid_count,
    int64_t divisor,
    acc_t* __restrict__ loss) {
  double sum = 0;
  for (int64_t i = threadIdx.x; i < rows; i += kReduceThreads) {
    sum += static_cast<double>(row_loss[i]);
  }
  using BlockReduce = cub::BlockReduce<double, kReduceThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  sum = BlockReduce(temp).Sum(sum);
  if (threadIdx.x == 0) {
    const int64_t d = valid_count != nullptr ? *valid_count : divisor;
    *loss = static_cast<acc_t>(sum / static_cast<double>(d > 1 ? d : 1));
  }
}

// The reduction around a row kernel. D, the divisor of the gradients and of the loss, is the
// valid rows counted on the device (labels under "batchmean"; valid_count()), else `divisor`
// (the rows under "batchmean", 1 under "sum" and "none"). The row kernel writes row_loss, which
// is `loss` itself under "none"; finish() reduces it into `loss` otherwise.
class RowReduction {
 public:
  RowReduction(Reduction reduction, const at::Tensor& labels, int64_t rows, int64_t ignore_index,
               const at::Tensor& loss, cudaStream_t stream)
      : reduction_(reduction), rows_(rows), loss_(loss), stream_(stream) {
    const bool labelled = labels.defined();
    if (labelled && reduction == Reduction::BatchMean) {
      valid_count_ = at::empty({}, labels.options());
      count_valid_kernel<<<1, kReduceThreads, 0, stream>>>(
          labels.const_data_ptr<int64_t>(), rows, ignore_index,
          valid_count_.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    divisor = reduction == Reduction::BatchMean && !labelled ? rows : 1;
    row_loss = reduction == Reduction::None ? loss : at::empty({rows}, loss.options());
  }

  const int64_t* valid_count() const {
    return valid_count_.defined() ? valid_count_.const_data_ptr<int64_t>() : nullptr;
  }

  void finish() const {
    if (reduction_ == Reduction::None) {
      return;
    }
    if (loss_.scalar_type() == at::kDouble) {
      reduce_kernel<double><<<1, kReduceThreads, 0, stream_>>>(
          row_loss.const_data_ptr<double>(), rows_, valid_count(), divisor,
          loss_.mutable_data_ptr<double>());
    } else {
      reduce_kernel<float><<<1, kReduceThreads, 0, stream_>>>(
          row_loss.const_data_ptr<float>(), rows_, valid_count(), divisor,
          loss_.mutable_data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  int64_t divisor;
  at::Tensor row_loss;

 private:
  Reduction reduction_;
  int64_t rows_;
  at::Tensor loss_, valid_count_;
  cudaStream_t stream_;
};

}  // namespace
}  // namespace pykd::cuda
