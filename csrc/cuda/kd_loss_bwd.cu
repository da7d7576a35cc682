// The CUDA backward: per element, from the forward's per-row statistics,
//   d/ds = grad/T * (p_s - p_t),   d/dt = grad/T * p_t * (log p_t - log p_s - KL)
// with log p = x/T - lse, taken in base 2 (kd_loss_common.cuh): one read of s and t and one write
// of each gradient asked for.
#include "cuda/kd_loss_common.cuh"
#include "cuda/kd_loss_cuda.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

namespace pykd::cuda {
namespace {

template <typename scalar_t>
struct BackwardParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* student;
  const scalar_t* teacher;
  int64_t rows, cols, student_stride, teacher_stride;
  acc_t inv_temp;
  acc_t scale;  // log2(e) / T
  const acc_t* kl;
  const acc_t* lse_s;
  const acc_t* lse_t;
  const acc_t* grad_kl;
  int64_t grad_stride;
  scalar_t* grad_s;  // contiguous [rows, cols], or null when not asked for
  scalar_t* grad_t;
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kBlockThreads)
    kd_backward_kernel(const BackwardParams<typename Traits::scalar_t> p) {
  using scalar_t = typename Traits::scalar_t;
  using acc_t = typename Traits::acc_t;
  using Pack = typename Traits::Pack;
  constexpr int kThreads = Traits::kThreadsPerRow;
  constexpr int kWidth = Traits::kWidth;
  const int64_t row = int64_t(blockIdx.x) * Traits::kRowsPerBlock + threadIdx.x / kThreads;
  if (row >= p.rows) {
    return;
  }
  const int lane = threadIdx.x % kThreads;
  const int64_t packs = p.cols / kWidth;
  const acc_t log2e = kLog2e, ln2 = kLn2;
  const acc_t lse2_s = p.lse_s[row] * log2e, lse2_t = p.lse_t[row] * log2e, kl = p.kl[row];
  const acc_t grad_scale = p.grad_kl[row * p.grad_stride] * p.inv_temp;
  const auto* s = p.student + row * p.student_stride;
  const auto* t = p.teacher + row * p.teacher_stride;
  auto* grad_s = p.grad_s ? reinterpret_cast<Pack*>(p.grad_s + row * p.cols) : nullptr;
  auto* grad_t = p.grad_t ? reinterpret_cast<Pack*>(p.grad_t + row * p.cols) : nullptr;

  for (int64_t first = lane; first < packs; first += kThreads * Traits::kUnroll) {
    acc_t vs[Traits::kChunk], vt[Traits::kChunk];
    load_chunk<Traits>(s, first, packs, vs);
    load_chunk<Traits>(t, first, packs, vt);
#pragma unroll
    for (int u = 0; u < Traits::kUnroll; ++u) {
      const int64_t pack = first + int64_t(u) * kThreads;
      if (pack >= packs) {
        break;
      }
      acc_t log2_ps[kWidth], log2_pt[kWidth], pt[kWidth];
#pragma unroll
      for (int w = 0; w < kWidth; ++w) {
        log2_ps[w] = vs[u * kWidth + w] * p.scale - lse2_s;
        log2_pt[w] = vt[u * kWidth + w] * p.scale - lse2_t;
        pt[w] = exp2_acc(log2_pt[w]);
      }
      if (grad_s) {
        Pack g;
#pragma unroll
        for (int w = 0; w < kWidth; ++w) {
          g.v[w] = static_cast<scalar_t>((exp2_acc(log2_ps[w]) - pt[w]) * grad_scale);
        }
        grad_s[pack] = g;
      }
      if (grad_t) {
        Pack g;
#pragma unroll
        for (int w = 0; w < kWidth; ++w) {
          // 0 * log 0 = 0 where the teacher gives no mass.
          const acc_t log_ratio = ln2 * (log2_pt[w] - log2_ps[w]);
          const acc_t d = pt[w] > 0 ? pt[w] * (log_ratio - kl) * grad_scale : acc_t(0);
          g.v[w] = static_cast<scalar_t>(d);
        }
        grad_t[pack] = g;
      }
    }
  }
}

}  // namespace

void launch_kd_backward(
    const KdInputs& in,
    const KdRowStats& stats,
    at::Tensor* grad_student,
    at::Tensor* grad_teacher) {
  const at::Tensor& s = in.student;
  const at::Tensor& t = in.teacher;
  const int64_t cols = s.size(1);
  const Layout layout = choose_layout(
      cols, s.element_size(),
      {{s.const_data_ptr(), s.stride(0)},
       {t.const_data_ptr(), t.stride(0)},
       {grad_student ? grad_student->const_data_ptr() : nullptr, cols},
       {grad_teacher ? grad_teacher->const_data_ptr() : nullptr, cols}});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "kd_loss_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardParams<scalar_t> params{
        s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), s.size(0), cols,
        s.stride(0), t.stride(0), static_cast<acc_t>(in.inv_temperature),
        static_cast<acc_t>(in.inv_temperature * kLog2e),
        stats.kl.const_data_ptr<acc_t>(), stats.student_lse.const_data_ptr<acc_t>(),
        stats.teacher_lse.const_data_ptr<acc_t>(), stats.grad_kl.const_data_ptr<acc_t>(),
        stats.grad_stride,
        grad_student ? grad_student->mutable_data_ptr<scalar_t>() : nullptr,
        grad_teacher ? grad_teacher->mutable_data_ptr<scalar_t>() : nullptr};
    // Nothing is reduced across a row here: 256 threads stream a long row as fast as 1024, with
    // more registers each.
    dispatch_layout<scalar_t, 256>(layout, [&](auto traits) {
      using Traits = decltype(traits);
      kd_backward_kernel<Traits>
          <<<grid_blocks<Traits>(params.rows), Traits::kBlockThreads, 0, stream>>>(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace pykd::cuda
