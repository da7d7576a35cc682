// The CUDA forward: per row, KL(p_t || p_s) and the two log-sum-exps in one read of s and t.
//
// Every thread keeps online sums of its share of the row, in the CPU kernel's formulation
// (cpu/kd_loss_kernel.h) but in base 2 (see kd_loss_common.cuh): with x2 = x * log2(e) / T and
// references ref = the running maximum of s2 (or t2), or 0 while that is -inf,
//   sum_s = sum exp2(s2 - ref_s),  sum_t = sum exp2(t2 - ref_t),
//   cross = sum exp2(t2 - ref_t) * ((t - s) * log2(e) / T - (ref_t - ref_s)),
// then threads merge their sums (warp shuffles, and shared memory across the warps of a block)
// and the row's first thread writes
//   KL = ln(2) * cross / sum_t + ln(sum_s / sum_t),   lse = ln(2) * (ref + log2(sum)).
#include "cuda/kd_loss_common.cuh"
#include "cuda/kd_loss_cuda.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

namespace pykd::cuda {
namespace {

template <typename acc_t>
struct OnlineSums {
  acc_t max_s, max_t;  // the largest s2 and t2 seen (base-2 scaled logits), -inf while none
  acc_t sum_s, sum_t, cross;
};

template <typename acc_t>
__device__ __forceinline__ OnlineSums<acc_t> empty_sums() {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  return OnlineSums<acc_t>{-kInf, -kInf, 0, 0, 0};
}

template <typename acc_t>
__device__ __forceinline__ acc_t max_of(acc_t a, acc_t b) {
  return a > b ? a : b;
}

template <typename acc_t>
__device__ __forceinline__ acc_t exp_reference(acc_t running_max) {
  return running_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : running_max;
}

// Moves the sums to new maxima (never below the current ones). Sums that have seen only -inf are
// 0 and stay so; skipping them also keeps exp2(-shift) from overflowing when the first finite
// maximum is very negative. A cross of +inf (a class the teacher gives mass and the student none)
// stays +inf, however small that mass becomes beside the new maximum (exp2(-shift) may be 0).
// A NaN or +inf maximum makes the shift NaN or inf, and the sums NaN, as the row's result must be.
template <typename acc_t>
__device__ __forceinline__ void rebase(OnlineSums<acc_t>& a, acc_t max_s, acc_t max_t) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  if (a.max_t != -kInf && max_t != a.max_t) {
    const acc_t shift = max_t - a.max_t;
    const acc_t rescale = exp2_acc(-shift);
    a.cross = a.cross == kInf ? kInf : (a.cross - a.sum_t * shift) * rescale;
    a.sum_t *= rescale;
  }
  if (a.max_s != -kInf && max_s != a.max_s) {
    const acc_t shift = max_s - a.max_s;
    a.cross += a.sum_t * shift;
    a.sum_s *= exp2_acc(-shift);
  }
  a.max_s = max_s;
  a.max_t = max_t;
}

template <typename acc_t>
__device__ __forceinline__ OnlineSums<acc_t> merge(OnlineSums<acc_t> a, OnlineSums<acc_t> b) {
  const acc_t max_s = max_of(a.max_s, b.max_s);
  const acc_t max_t = max_of(a.max_t, b.max_t);
  rebase(a, max_s, max_t);
  rebase(b, max_s, max_t);
  return OnlineSums<acc_t>{max_s, max_t, a.sum_s + b.sum_s, a.sum_t + b.sum_t, a.cross + b.cross};
}

// Adds a chunk of raw logits (padding -inf): one rebase for the chunk, two exp2 per element.
// scale = log2(e) / T.
template <int kChunk, typename acc_t>
__device__ __forceinline__ void accumulate(
    OnlineSums<acc_t>& a,
    const acc_t (&s)[kChunk],
    const acc_t (&t)[kChunk],
    acc_t scale) {
  acc_t chunk_max_s = s[0], chunk_max_t = t[0];
#pragma unroll
  for (int k = 1; k < kChunk; ++k) {
    chunk_max_s = max_of(chunk_max_s, s[k]);
    chunk_max_t = max_of(chunk_max_t, t[k]);
  }
  // scale > 0, so scaling commutes with the maximum.
  rebase(a, max_of(a.max_s, chunk_max_s * scale), max_of(a.max_t, chunk_max_t * scale));
  const acc_t ref_s = exp_reference(a.max_s), ref_t = exp_reference(a.max_t);
  const acc_t ref_diff = ref_t - ref_s;
#pragma unroll
  for (int k = 0; k < kChunk; ++k) {
    const acc_t es = exp2_acc(s[k] * scale - ref_s);
    const acc_t et = exp2_acc(t[k] * scale - ref_t);
    a.sum_s += es;
    a.sum_t += et;
    // 0 * log 0 = 0: a class the teacher gives no mass adds nothing, whatever the student says.
    // The log-ratio comes from t - s, exact for close logits however large they are.
    if (et > 0) {
      a.cross += et * ((t[k] - s[k]) * scale - ref_diff);
    }
  }
}

// Merges the sums of kLanes consecutive lanes (a power of two up to 32); every lane gets the
// result. All 32 lanes of the warp must call it.
template <int kLanes, typename acc_t>
__device__ __forceinline__ OnlineSums<acc_t> warp_merge(OnlineSums<acc_t> a) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    const OnlineSums<acc_t> b{
        __shfl_xor_sync(0xffffffffu, a.max_s, offset),
        __shfl_xor_sync(0xffffffffu, a.max_t, offset),
        __shfl_xor_sync(0xffffffffu, a.sum_s, offset),
        __shfl_xor_sync(0xffffffffu, a.sum_t, offset),
        __shfl_xor_sync(0xffffffffu, a.cross, offset)};
    a = merge(a, b);
  }
  return a;
}

template <typename scalar_t>
struct ForwardParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* student;
  const scalar_t* teacher;
  int64_t rows, cols, student_stride, teacher_stride;
  acc_t scale;  // log2(e) / T
  acc_t* kl;
  acc_t* lse_s;
  acc_t* lse_t;
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kBlockThreads)
    kd_forward_kernel(const ForwardParams<typename Traits::scalar_t> p) {
  using acc_t = typename Traits::acc_t;
  constexpr int kThreads = Traits::kThreadsPerRow;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const int lane = threadIdx.x % kThreads;
  const int64_t row = int64_t(blockIdx.x) * Traits::kRowsPerBlock + threadIdx.x / kThreads;
  const int64_t packs = p.cols / Traits::kWidth;

  // Threads past the last row keep empty sums: they must still take part in the shuffles.
  OnlineSums<acc_t> sums = empty_sums<acc_t>();
  if (row < p.rows) {
    const auto* s = p.student + row * p.student_stride;
    const auto* t = p.teacher + row * p.teacher_stride;
    for (int64_t first = lane; first < packs; first += kThreads * Traits::kUnroll) {
      acc_t vs[Traits::kChunk], vt[Traits::kChunk];
      load_chunk<Traits>(s, first, packs, vs);
      load_chunk<Traits>(t, first, packs, vt);
      accumulate(sums, vs, vt, p.scale);
    }
  }

  if constexpr (kThreads <= kWarpSize) {
    sums = warp_merge<kThreads>(sums);
  } else {
    constexpr int kWarps = kThreads / kWarpSize;
    __shared__ OnlineSums<acc_t> warp_sums[kWarps];
    sums = warp_merge<kWarpSize>(sums);
    const int warp = threadIdx.x / kWarpSize;
    if (threadIdx.x % kWarpSize == 0) {
      warp_sums[warp] = sums;
    }
    __syncthreads();
    if (warp == 0) {
      sums = threadIdx.x < kWarps ? warp_sums[threadIdx.x] : empty_sums<acc_t>();
      sums = warp_merge<kWarps>(sums);
    }
  }

  if (row < p.rows && lane == 0) {
    const acc_t ln2 = kLn2;
    const acc_t ref_s = exp_reference(sums.max_s), ref_t = exp_reference(sums.max_t);
    p.lse_s[row] = ln2 * (ref_s + log2_acc(sums.sum_s));
    p.lse_t[row] = ln2 * (ref_t + log2_acc(sums.sum_t));
    // A student that gives no mass anywhere the teacher does: KL = +inf (not inf - inf).
    p.kl[row] = (sums.sum_s == 0 && sums.sum_t > 0)
        ? kInf
        : ln2 * sums.cross / sums.sum_t + log_acc(sums.sum_s / sums.sum_t);
  }
}

}  // namespace

void launch_kd_forward(
    const KdInputs& in,
    at::Tensor& kl,
    at::Tensor& student_lse,
    at::Tensor& teacher_lse) {
  const at::Tensor& s = in.student;
  const at::Tensor& t = in.teacher;
  const Layout layout = choose_layout(
      s.size(1), s.element_size(),
      {{s.const_data_ptr(), s.stride(0)}, {t.const_data_ptr(), t.stride(0)}});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "kd_loss_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardParams<scalar_t> params{
        s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
        s.size(0), s.size(1), s.stride(0), t.stride(0),
        static_cast<acc_t>(in.inv_temperature * kLog2e), kl.mutable_data_ptr<acc_t>(),
        student_lse.mutable_data_ptr<acc_t>(), teacher_lse.mutable_data_ptr<acc_t>()};
    dispatch_layout<scalar_t>(layout, [&](auto traits) {
      using Traits = decltype(traits);
      kd_forward_kernel<Traits>
          <<<grid_blocks<Traits>(params.rows), Traits::kBlockThreads, 0, stream>>>(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace pykd::cuda
