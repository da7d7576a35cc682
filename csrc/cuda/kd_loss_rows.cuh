// The CUDA row kernel of pykd::kd_loss: per row, the loss and the gradient(s) in one kernel.
//
// Threads and rows. threads_per_row (tpr, a power of two from 4 to 512, chosen at run time for
// about 4 packs per thread) threads share a row; a block holds max(tpr, 256) threads, so short
// rows are several to a warp, medium rows a few warps each and long rows one 512-thread block.
// tpr is a kernel argument, not a template parameter: the row reductions (butterfly shuffles
// over min(tpr, 32) lanes, then the row's warps through shared memory) take it at run time, and
// the kernel is compiled once per divergence and (student, teacher) dtype pair.
//
// Three sweeps over a row (SPEC section 3, one pass):
//   1. Statistics, from the one read of s and t in global memory. Each tensor is read in 16-byte
//      vectors of its own dtype from its first 16-byte boundary on (a scalar head before it and a
//      scalar tail after the last whole vector, so any length and any slice stays vectorised),
//      and each thread keeps online sums in base 2: with scale = log2(e) / T, the running maximum
//      m of the raw logits and ref = m * scale,
//          sum = sum_j exp2(fma(x_j, scale, -ref))     (rescaled when m grows),
//      and for the student also sum1, the same at T = 1 (only when hard_weight > 0 and T != 1;
//      at T = 1 the two coincide). The sums of the row's threads are then merged.
//   2. From those, per class, log2 p = fma(x, scale, -ref) - log2(sum): the logit relative to the
//      row maximum in one multiply-add (never x/T - lse, a difference of large numbers), then
//      p = exp2(log2 p), log p = ln2 * log2 p and log_ratio = ln2 * (log2 p_t - log2 p_s). The
//      divergence (divergence.h, with the math policy CudaMath) gives the class's term and the
//      vectors w of both sides; the row's divergence and, for a side that is not "direct", the
//      row's sum of w are accumulated, and a direct side's gradient
//          T * soft_weight / D * w_j   (+ hard_weight / D * (softmax(s)_j - [j == label]))
//      is written right away.
//   3. Only when a non-direct side's gradient is wanted (every divergence but one side of each
//      KL): the same per-class terms again, now writing T * soft_weight / D * (w_j - p_j * sum w).
// Sweeps 2 and 3 walk the row in common packs of kW classes (16 bytes of the wider dtype, at most
// 4 classes) from the boundary where most of the tensors they touch in global memory are aligned;
// a tensor whose alignment differs from that one is read or written element by element there
// (sweep 1 still reads it in vectors). Contiguous logits and gradients always agree.
//
// Where sweeps 2 and 3 read the row. When the block's rows fit in kMaxStageBytes (44 KiB) of
// dynamic shared memory, both tensors in their own dtypes, sweep 1 also stages the row there and
// sweeps 2 and 3 read it from shared memory: s and t come from global memory exactly once. With
// about 4 packs per thread that holds for every row up to ~5600 classes of a float32 pair
// (~11000 of a 16-bit pair; float64 rows from ~1400 classes on are not staged). The long-row path: a row that does not fit is
// read from global memory again by sweeps 2 and 3. Sweep 1 reads it front to back, sweep 2 back to
// front and sweep 3 front to back again, so that each re-read starts with the part of the row read
// most recently, the part most likely still in L2 (a 512-thread block per row, two per SM: for
// 32000 bfloat16 classes, 128 KB a row, the rows in flight on an H100/H200 take ~34 MB of its
// 50 MB L2; for 128256 float32 classes, 1 MB a row, they do not fit and part of each re-read
// comes from HBM).
//
// Masked rows (label == ignore_index) read nothing and write zero gradients and a zero loss.
// Every thread of a block runs every reduction and barrier, whatever its row (past the last row,
// masked or not), so that the barriers are uniform.
#pragma once

#include "cuda/acc_math.cuh"
#include "cuda/dtype_dispatch.cuh"
#include "cuda/kd_loss_cuda.h"
#include "divergence.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace pykd::cuda {

constexpr int kWarpSize = 32;
constexpr int kVectorBytes = 16;
constexpr int kMaxThreadsPerRow = 512;  // also the largest block
constexpr int kMinBlockThreads = 256;
constexpr int kMaxWarps = kMaxThreadsPerRow / kWarpSize;
// Packs per tensor a thread loads before using any, in sweep 1 (which reads global memory) and in
// sweeps 2 and 3. 1 and 1 keep every reduced-precision kernel within the 64 registers of two
// 512-thread blocks per SM without spills in its loops (ptxas -v and the SASS, CUDA 13.0, sm_90);
// 2 in sweep 1 needs ~90 registers for bfloat16 pairs.
constexpr int kUnroll = 1;
constexpr int kSweepUnroll = 1;
// Classes per common pack in sweeps 2 and 3: 16 bytes of the wider dtype, at most 4 (8 classes of
// a 16-bit pair make the Jensen-Shannon kernels spill inside their loops).
constexpr int kMaxCommonPack = 4;
// Dynamic shared memory for staged rows, per block: under the 48 KiB that needs no opt-in, with
// room for the reductions' static shared memory.
constexpr int64_t kMaxStageBytes = 44 * 1024;
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// divergence.h's math policy for one thread's element.
template <typename acc_t>
struct CudaMath {
  using V = acc_t;
  static __host__ __device__ __forceinline__ V unless_zero(V x, V value) {
    return x == V(0) ? V(0) : value;
  }
  static __host__ __device__ __forceinline__ V log(V x) {
    return log_acc(x);
  }
  static __host__ __device__ __forceinline__ V max(V a, V b) {
    return max_nan(a, b);
  }
};

// One tensor's online sums over part of a row (see the header).
template <typename acc_t>
struct Online {
  acc_t max;   // of the raw logits, -inf while none
  acc_t sum;   // sum exp2(fma(x, scale, -reference(max, scale)))
  acc_t sum1;  // the same with log2(e) for scale (the student at T = 1), when with_sum1
};

template <typename acc_t>
__device__ __forceinline__ Online<acc_t> empty_online() {
  return Online<acc_t>{-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc_t(0)};
}

// Moves the sums to a maximum new_max >= o.max (or NaN). Sums that have seen only -inf are 0 and
// stay so. A NaN or +inf maximum makes the sums NaN or 0 here and the row NaN in the end (a +inf
// logit adds exp2(inf - inf)), as softmax does.
template <typename acc_t>
__device__ __forceinline__ void rebase(
    Online<acc_t>& o,
    acc_t new_max,
    acc_t scale,
    bool with_sum1) {
  if (o.max != new_max) {
    if (o.max != -std::numeric_limits<acc_t>::infinity()) {
      o.sum *= exp2_acc(reference(o.max, scale) - reference(new_max, scale));
      if (with_sum1) {
        const acc_t log2e = kLog2e;
        o.sum1 *= exp2_acc(reference(o.max, log2e) - reference(new_max, log2e));
      }
    }
    o.max = new_max;
  }
}

// Adds N logits: one rescale for all of them, one exp2 each (two with sum1).
template <int N, typename acc_t>
__device__ __forceinline__ void accumulate(
    Online<acc_t>& o,
    const acc_t (&x)[N],
    acc_t scale,
    bool with_sum1) {
  acc_t m = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) {
    m = max_nan(m, x[k]);
  }
  rebase(o, max_nan(o.max, m), scale, with_sum1);
  const acc_t ref = reference(o.max, scale);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    o.sum += exp2_acc(fma_acc(x[k], scale, -ref));
  }
  if (with_sum1) {
    const acc_t log2e = kLog2e;
    const acc_t ref1 = reference(o.max, log2e);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      o.sum1 += exp2_acc(fma_acc(x[k], log2e, -ref1));
    }
  }
}

// Commutative (bit for bit), so every lane of a butterfly ends with the same sums.
template <typename acc_t>
__device__ __forceinline__ Online<acc_t> merge(
    Online<acc_t> a,
    Online<acc_t> b,
    acc_t scale,
    bool with_sum1) {
  const acc_t m = max_nan(a.max, b.max);
  rebase(a, m, scale, with_sum1);
  rebase(b, m, scale, with_sum1);
  return Online<acc_t>{m, a.sum + b.sum, a.sum1 + b.sum1};
}

// Sweep 1's result: both tensors' sums.
template <typename acc_t>
struct RowStats {
  Online<acc_t> s, t;
};

template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> shfl_xor(const RowStats<acc_t>& a, int offset) {
  auto shfl = [offset](acc_t v) { return __shfl_xor_sync(0xffffffffu, v, offset); };
  return RowStats<acc_t>{
      {shfl(a.s.max), shfl(a.s.sum), shfl(a.s.sum1)}, {shfl(a.t.max), shfl(a.t.sum), acc_t(0)}};
}

// Sweep 2's result: the row's divergence and the sums of w of the non-direct sides.
template <typename acc_t>
struct RowSums {
  acc_t value, w_student, w_teacher;
};

template <typename acc_t>
__device__ __forceinline__ RowSums<acc_t> shfl_xor(const RowSums<acc_t>& a, int offset) {
  return RowSums<acc_t>{
      __shfl_xor_sync(0xffffffffu, a.value, offset),
      __shfl_xor_sync(0xffffffffu, a.w_student, offset),
      __shfl_xor_sync(0xffffffffu, a.w_teacher, offset)};
}

// Merges v over the tpr threads of each row; every one of them gets the result. Every thread of
// the block must call it (shuffles over whole warps; for tpr > 32 two __syncthreads). partials:
// one slot per warp of the block.
template <typename T, typename Merge>
__device__ __forceinline__ T reduce_row(T v, int tpr, T* partials, const Merge& merge_fn) {
  const int lanes = tpr < kWarpSize ? tpr : kWarpSize;
  #pragma unroll 1
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    v = merge_fn(v, shfl_xor(v, offset));
  }
  if (tpr > kWarpSize) {
    const int warp = threadIdx.x / kWarpSize;
    if (threadIdx.x % kWarpSize == 0) {
      partials[warp] = v;
    }
    __syncthreads();
    const int warps_per_row = tpr / kWarpSize;
    const int first = warp / warps_per_row * warps_per_row;
    v = partials[first];
    for (int w = 1; w < warps_per_row; ++w) {
      v = merge_fn(v, partials[first + w]);
    }
    __syncthreads();  // the slots may be written again
  }
  return v;
}

// Elements before p + head lie before the first kN * sizeof(T)-byte boundary (at most n).
template <int kN, typename T>
__device__ __forceinline__ int aligned_head(const T* p, int n) {
  constexpr uintptr_t kBytes = sizeof(T) * kN;
  const uintptr_t misaligned = reinterpret_cast<uintptr_t>(p) % kBytes;
  const int head = misaligned == 0 ? 0 : int((kBytes - misaligned) / sizeof(T));
  return head < n ? head : n;
}

// The element phase of p among kN-element packs: p + j starts an aligned pack iff
// (phase + j) % kN == 0.
template <int kN, typename T>
__device__ __forceinline__ int phase(const T* p) {
  return static_cast<int>(reinterpret_cast<uintptr_t>(p) / sizeof(T) % kN);
}

template <typename acc_t>
struct RowParams {
  const void* student;
  const void* teacher;
  void* grad_student;  // contiguous [rows, cols], or null
  void* grad_teacher;
  const int64_t* labels;       // or null
  const int64_t* valid_count;  // or null: divisor
  acc_t* row_loss;
  int64_t rows, cols, student_stride, teacher_stride, ignore_index, divisor;
  acc_t scale;        // log2(e) / T
  acc_t soft_factor;  // soft_weight * T^2
  double temperature, soft_weight, hard_weight;
  int threads_per_row;
  int stage_row_bytes;       // shared memory per staged row, 0 for the long-row path
  int stage_teacher_offset;  // where the teacher's part of a staged row starts
  bool hard;                 // hard_weight > 0 (labels are given)
  bool same_scale;           // T == 1: the cross-entropy's softmax is p_s
};

// The phase (among kW-element packs) that most of the tensors sweeps 2 and 3 touch in global
// memory share (the gradients, and on the long-row path the logits); ties go to the earlier.
// Sweeps 2 and 3 walk the row in packs aligned for it, and a staged row is stored with the same
// phase in shared memory.
template <int kW, typename s_t, typename t_t>
__device__ __forceinline__ int pack_phase(
    const s_t* s,
    const t_t* t,
    const s_t* grad_s,
    const t_t* grad_t,
    bool staged) {
  // Candidates in order of preference; an absent one has phase -1 and never counts.
  const int c[4] = {
      grad_s != nullptr ? phase<kW>(grad_s) : -1,
      grad_t != nullptr ? phase<kW>(grad_t) : -1,
      staged ? -1 : phase<kW>(s),
      staged ? -1 : phase<kW>(t)};
  int best = 0, best_count = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int count = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      count += c[i] >= 0 && c[k] == c[i];
    }
    if (count > best_count) {
      best = c[i];
      best_count = count;
    }
  }
  return best;
}

// ---- sweep 1 ----

template <int N, typename T>
__device__ __forceinline__ void stage_store(T* stage, const Vec<T, N>& v, bool vector) {
  if (N > 1 && vector) {
    *reinterpret_cast<Vec<T, N>*>(stage) = v;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      stage[k] = v.v[k];
    }
  }
}

template <int N, typename T, typename acc_t>
__device__ __forceinline__ void add(
    Online<acc_t>& o,
    const Vec<T, N>& v,
    acc_t scale,
    bool with_sum1) {
  acc_t x[N];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    x[k] = static_cast<acc_t>(v.v[k]);
  }
  accumulate<N>(o, x, scale, with_sum1);
}

// One tensor's head or tail classes [begin, end), one by one.
template <typename T, typename acc_t>
__device__ __forceinline__ void add_elements(
    Online<acc_t>& o,
    const T* row,
    T* stage,
    bool staged,
    int begin,
    int end,
    int tpr,
    int lane,
    int offset,
    acc_t scale,
    bool with_sum1) {
  #pragma unroll 1
  for (int j = begin + lane; j < end; j += tpr) {
    const Vec<T, 1> v{{row[j]}};
    add<1>(o, v, scale, with_sum1);
    if (staged) {
      stage[j + offset] = v.v[0];
    }
  }
}

// Sweep 1 over a thread's share of a row: both tensors' online sums, each read in 16-byte vectors
// of its own dtype between a scalar head and tail; when `staged`, the copy in shared memory
// (element j at stage[j + offset]).
template <typename s_t, typename t_t, typename acc_t>
__device__ RowStats<acc_t> row_statistics(
    const s_t* s,
    const t_t* t,
    s_t* s_stage,
    t_t* t_stage,
    bool staged,
    int cols,
    int tpr,
    int lane,
    int offset,
    acc_t scale,
    bool with_sum1) {
  constexpr int kWs = kVectorBytes / int(sizeof(s_t));
  constexpr int kWt = kVectorBytes / int(sizeof(t_t));
  RowStats<acc_t> st{empty_online<acc_t>(), empty_online<acc_t>()};
  const int s_head = aligned_head<kWs>(s, cols), t_head = aligned_head<kWt>(t, cols);
  const int s_packs = (cols - s_head) / kWs, t_packs = (cols - t_head) / kWt;
  // Whether a loaded pack is also aligned where it goes in shared memory.
  const bool s_stage_vector = (s_head + offset) % kWs == 0;
  const bool t_stage_vector = (t_head + offset) % kWt == 0;
  add_elements(st.s, s, s_stage, staged, 0, s_head, tpr, lane, offset, scale, with_sum1);
  add_elements(st.t, t, t_stage, staged, 0, t_head, tpr, lane, offset, scale, false);
  const int step = tpr * kUnroll;
  const int n = s_packs > t_packs ? s_packs : t_packs;
  const auto* s_packed = reinterpret_cast<const Vec<s_t, kWs>*>(s + s_head);
  const auto* t_packed = reinterpret_cast<const Vec<t_t, kWt>*>(t + t_head);
  #pragma unroll 1
  for (int base = lane; base < n; base += step) {
    Vec<s_t, kWs> sv[kUnroll];
    Vec<t_t, kWt> tv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int p = base + u * tpr;
      if (p < s_packs) {
        sv[u] = s_packed[p];
      }
      if (p < t_packs) {
        tv[u] = t_packed[p];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int p = base + u * tpr;
      if (p < s_packs) {
        add<kWs>(st.s, sv[u], scale, with_sum1);
        if (staged) {
          stage_store<kWs>(s_stage + s_head + p * kWs + offset, sv[u], s_stage_vector);
        }
      }
      if (p < t_packs) {
        add<kWt>(st.t, tv[u], scale, false);
        if (staged) {
          stage_store<kWt>(t_stage + t_head + p * kWt + offset, tv[u], t_stage_vector);
        }
      }
    }
  }
  add_elements(st.s, s, s_stage, staged, s_head + s_packs * kWs, cols, tpr, lane, offset, scale, with_sum1);
  add_elements(st.t, t, t_stage, staged, t_head + t_packs * kWt, cols, tpr, lane, offset, scale, false);
  return st;
}

// ---- sweeps 2 and 3 ----

// One row's geometry and constants for sweeps 2 and 3 (see the header), set up after sweep 1 so
// that none of it is live during sweep 1's loads.
template <typename Div, typename s_t, typename t_t>
struct Row {
  using acc_t = at::opmath_type<s_t>;
  static constexpr int kW =
      std::min({kVectorBytes / int(sizeof(s_t)), kVectorBytes / int(sizeof(t_t)), kMaxCommonPack});

  Div div;
  const s_t* s;  // the row's logits
  const t_t* t;
  s_t* grad_s;  // the row's gradients, or null
  t_t* grad_t;
  const s_t* s_stage;  // the staged row (shared memory; not read on the long-row path)
  const t_t* t_stage;
  bool staged;
  int cols;  // < 2^31 - 32 (launch_rows_typed checks), so in-row indices are int
  int tpr, lane;

  // Classes [0, head) and [tail, cols) one by one, packs of kW between; element j is at
  // stage[j + offset] in shared memory, so that the packs are aligned there too.
  int head, packs, tail;
  int offset;
  bool s_vector, t_vector, grad_s_vector, grad_t_vector;  // aligned at the packs in global memory

  // Row constants: log2 p = fma(x, scale, -ref) - lse2.
  acc_t scale, ref_s, lse2_s, ref_t, lse2_t, ref1, lse2_1;
  acc_t soft_grad, hard_grad;          // T * soft_weight / D, hard_weight / D
  acc_t sum_w_student, sum_w_teacher;  // sweep 2's sums, for sweep 3
  int label;                           // -1 without labels or outside [0, cols)
  bool hard, same_scale;
  bool write_s2, write_t2, write_s3, write_t3;  // which gradient which sweep writes

  __device__ __forceinline__ void set_packs(int phase_) {
    offset = phase_;
    head = (kW - phase_) % kW;
    head = head < cols ? head : cols;
    packs = (cols - head) / kW;
    tail = head + packs * kW;
    s_vector = phase<kW>(s) == phase_;
    t_vector = phase<kW>(t) == phase_;
    grad_s_vector = grad_s != nullptr && phase<kW>(grad_s) == phase_;
    grad_t_vector = grad_t != nullptr && phase<kW>(grad_t) == phase_;
  }

  // log2 of a sum, or `empty` for a side without mass (every logit -inf). As on the CPU: 0 for
  // the student, whose probabilities then stay 0 and log-probabilities -inf (a student without
  // mass where the teacher has some gives +inf, not NaN); NaN for the teacher, which is then no
  // distribution and makes its row NaN, as log_softmax does. A NaN sum stays NaN.
  __device__ __forceinline__ static acc_t log2_sum(acc_t sum, acc_t empty) {
    return sum == acc_t(0) ? empty : log2_acc(sum);
  }

  // Sets the row constants from the merged statistics.
  __device__ __forceinline__ void set_constants(const RowStats<acc_t>& st) {
    ref_s = reference(st.s.max, scale);
    lse2_s = log2_sum(st.s.sum, acc_t(0));
    ref_t = reference(st.t.max, scale);
    lse2_t = log2_sum(st.t.sum, std::numeric_limits<acc_t>::quiet_NaN());
    if (same_scale) {
      ref1 = ref_s;
      lse2_1 = lse2_s;
    } else {
      ref1 = reference(st.s.max, acc_t(kLog2e));
      lse2_1 = log2_sum(st.s.sum1, acc_t(0));
    }
  }

  // Elements [j, j + N) of a row for sweeps 2 and 3: from shared memory when staged (aligned
  // there for N = kW), else from global memory, in one vector when `vector`.
  template <int N, typename T>
  __device__ __forceinline__ Vec<T, N> load(const T* row, const T* stage, int j, bool vector)
      const {
    if (staged) {
      return *reinterpret_cast<const Vec<T, N>*>(stage + j + offset);
    }
    if (N > 1 && vector) {
      return *reinterpret_cast<const Vec<T, N>*>(row + j);
    }
    Vec<T, N> v;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      v.v[k] = row[j + k];
    }
    return v;
  }

  template <int N, typename T>
  __device__ __forceinline__ static void store(T* row, int j, const Vec<T, N>& v, bool vector) {
    if (N > 1 && vector) {
      *reinterpret_cast<Vec<T, N>*>(row + j) = v;
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        row[j + k] = v.v[k];
      }
    }
  }

  // Classes [j, j + N): sweep kPass's sums and gradient writes.
  template <int kPass, int N>
  __device__ __forceinline__ void process(
      int j,
      const Vec<s_t, N>& sv,
      const Vec<t_t, N>& tv,
      bool in_packs,
      RowSums<acc_t>& sums) const {
    const bool write_s = kPass == 2 ? write_s2 : write_s3;
    const bool write_t = kPass == 2 ? write_t2 : write_t3;
    const acc_t ln2 = kLn2, log2e = kLog2e;
    Vec<s_t, N> gs;
    Vec<t_t, N> gt;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const acc_t x_s = static_cast<acc_t>(sv.v[k]);
      const acc_t x_t = static_cast<acc_t>(tv.v[k]);
      const acc_t log2_ps = fma_acc(x_s, scale, -ref_s) - lse2_s;
      const acc_t log2_pt = fma_acc(x_t, scale, -ref_t) - lse2_t;
      const acc_t p_s = exp2_acc(log2_ps);
      const acc_t p_t = exp2_acc(log2_pt);
      const ClassTerms<acc_t> c{
          p_t, p_s, ln2 * log2_pt, ln2 * log2_ps, ln2 * (log2_pt - log2_ps)};
      const DivergenceTerms<acc_t> d = div.template terms<CudaMath<acc_t>>(c);
      if constexpr (kPass == 2) {
        sums.value += d.value;
        if (write_s3) {
          sums.w_student += d.w_student;
        }
        if (write_t3) {
          sums.w_teacher += d.w_teacher;
        }
      }
      if (write_s) {
        const acc_t w = kPass == 2 ? d.w_student : d.w_student - p_s * sum_w_student;
        acc_t g = soft_grad * w;
        if (hard) {
          const acc_t softmax1 =
              same_scale ? p_s : exp2_acc(fma_acc(x_s, log2e, -ref1) - lse2_1);
          g += hard_grad * (j + k == label ? softmax1 - acc_t(1) : softmax1);
        }
        gs.v[k] = static_cast<s_t>(g);
      }
      if (write_t) {
        const acc_t w = kPass == 2 ? d.w_teacher : d.w_teacher - p_t * sum_w_teacher;
        gt.v[k] = static_cast<t_t>(soft_grad * w);
      }
    }
    if (write_s) {
      store<N>(grad_s, j, gs, in_packs && grad_s_vector);
    }
    if (write_t) {
      store<N>(grad_t, j, gt, in_packs && grad_t_vector);
    }
  }

  // Sweep 2 (kPass = 2, its packs from the row's end) or 3 (from its start).
  template <int kPass>
  __device__ void sweep(RowSums<acc_t>& sums) const {
    #pragma unroll 1
    for (int j = lane; j < head; j += tpr) {
      process<kPass, 1>(
          j, load<1>(s, s_stage, j, false), load<1>(t, t_stage, j, false), false, sums);
    }
    const int step = tpr * kSweepUnroll;
    const int chunks = (packs + step - 1) / step;
    #pragma unroll 1
    for (int c = 0; c < chunks; ++c) {
      const int base = (kPass == 2 ? chunks - 1 - c : c) * step + lane;
      Vec<s_t, kW> sv[kSweepUnroll];
      Vec<t_t, kW> tv[kSweepUnroll];
#pragma unroll
      for (int u = 0; u < kSweepUnroll; ++u) {
        const int p = base + u * tpr;
        if (p < packs) {
          sv[u] = load<kW>(s, s_stage, head + p * kW, s_vector);
          tv[u] = load<kW>(t, t_stage, head + p * kW, t_vector);
        }
      }
#pragma unroll
      for (int u = 0; u < kSweepUnroll; ++u) {
        const int p = base + u * tpr;
        if (p < packs) {
          process<kPass, kW>(head + p * kW, sv[u], tv[u], true, sums);
        }
      }
    }
    #pragma unroll 1
    for (int j = tail + lane; j < cols; j += tpr) {
      process<kPass, 1>(
          j, load<1>(s, s_stage, j, false), load<1>(t, t_stage, j, false), false, sums);
    }
  }
};

// Zeros a masked row's gradient: 16-byte stores from its first 16-byte boundary.
template <typename T>
__device__ void zero_row(T* row, int cols, int tpr, int lane) {
  constexpr int kN = kVectorBytes / int(sizeof(T));
  const int head = aligned_head<kN>(row, cols);
  const int packs = (cols - head) / kN;
  for (int j = lane; j < head; j += tpr) {
    row[j] = T(0);
  }
  Vec<T, kN> zero;
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    zero.v[k] = T(0);
  }
  auto* packed = reinterpret_cast<Vec<T, kN>*>(row + head);
  for (int p = lane; p < packs; p += tpr) {
    packed[p] = zero;
  }
  for (int j = head + packs * kN + lane; j < cols; j += tpr) {
    row[j] = T(0);
  }
}

template <typename Div, typename s_t, typename t_t>
__global__ void __launch_bounds__(kMaxThreadsPerRow, sizeof(at::opmath_type<s_t>) == 4 ? 2 : 1)
    kd_rows_kernel(const RowParams<at::opmath_type<s_t>> p, const Div div) {
  using acc_t = at::opmath_type<s_t>;
  using RowT = Row<Div, s_t, t_t>;
  static_assert(std::is_same_v<acc_t, at::opmath_type<t_t>>);
  __shared__ RowStats<acc_t> stats_partials[kMaxWarps];
  __shared__ RowSums<acc_t> sums_partials[kMaxWarps];
  extern __shared__ __align__(16) unsigned char stage_memory[];

  const int tpr = p.threads_per_row;
  const int lane = static_cast<int>(threadIdx.x) & (tpr - 1);
  const int row_in_block = static_cast<int>(threadIdx.x) / tpr;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / tpr) + row_in_block;
  const int cols = static_cast<int>(p.cols);
  const bool in_range = row < p.rows;
  const bool valid =
      in_range && (p.labels == nullptr || p.labels[row] != p.ignore_index);
  const int64_t r = in_range ? row : 0;  // rows past the end point at row 0 and touch nothing
  const auto* s = static_cast<const s_t*>(p.student) + r * p.student_stride;
  const auto* t = static_cast<const t_t*>(p.teacher) + r * p.teacher_stride;
  auto grad_s_row = [&] {
    return p.grad_student != nullptr ? static_cast<s_t*>(p.grad_student) + r * p.cols : nullptr;
  };
  auto grad_t_row = [&] {
    return p.grad_teacher != nullptr ? static_cast<t_t*>(p.grad_teacher) + r * p.cols : nullptr;
  };
  // Always shared-memory addresses (the compiler then uses shared loads); only used if staged.
  const bool staged = p.stage_row_bytes != 0;
  unsigned char* stage = stage_memory + row_in_block * p.stage_row_bytes;
  s_t* s_stage = reinterpret_cast<s_t*>(stage);
  t_t* t_stage = reinterpret_cast<t_t*>(stage + p.stage_teacher_offset);
  const int offset = pack_phase<RowT::kW>(s, t, grad_s_row(), grad_t_row(), staged);
  const acc_t scale = p.scale;
  const bool with_sum1 = p.hard && !p.same_scale;

  // Sweep 1: statistics (and the staged copy).
  RowStats<acc_t> st{empty_online<acc_t>(), empty_online<acc_t>()};
  if (valid) {
    st = row_statistics(
        s, t, s_stage, t_stage, staged, cols, tpr, lane, offset, scale, with_sum1);
  }
  st = reduce_row(st, tpr, stats_partials, [scale, with_sum1](const auto& a, const auto& b) {
    return RowStats<acc_t>{merge(a.s, b.s, scale, with_sum1), merge(a.t, b.t, scale, false)};
  });
  if (staged) {
    __syncthreads();  // the staged row, written by all of its threads, is read by all of them
  }

  const bool want_s = p.grad_student != nullptr, want_t = p.grad_teacher != nullptr;
  RowT w{div, s, t, grad_s_row(), grad_t_row(), s_stage, t_stage, staged, cols, tpr, lane};
  w.set_packs(offset);
  w.scale = scale;
  w.hard = p.hard;
  w.same_scale = p.same_scale;
  w.set_constants(st);
  w.write_s2 = want_s && Div::kStudentDirect;
  w.write_t2 = want_t && Div::kTeacherDirect;
  w.write_s3 = want_s && !Div::kStudentDirect;
  w.write_t3 = want_t && !Div::kTeacherDirect;
  const int64_t label = valid && p.labels != nullptr ? p.labels[row] : -1;
  w.label = label >= 0 && label < cols ? static_cast<int>(label) : -1;
  {
    const int64_t count = p.valid_count != nullptr ? *p.valid_count : p.divisor;
    const double d = static_cast<double>(count > 1 ? count : 1);
    w.soft_grad = static_cast<acc_t>(p.temperature * p.soft_weight / d);
    w.hard_grad = static_cast<acc_t>(p.hard_weight / d);
  }

  // Sweep 2: the divergence, the sums of w, the direct sides' gradients.
  RowSums<acc_t> sums{acc_t(0), acc_t(0), acc_t(0)};
  if (valid) {
    w.template sweep<2>(sums);
  } else if (in_range) {
    if (want_s) {
      zero_row(w.grad_s, cols, tpr, lane);
    }
    if (want_t) {
      zero_row(w.grad_t, cols, tpr, lane);
    }
  }
  sums = reduce_row(sums, tpr, sums_partials, [](const auto& a, const auto& b) {
    return RowSums<acc_t>{a.value + b.value, a.w_student + b.w_student, a.w_teacher + b.w_teacher};
  });
  w.sum_w_student = sums.w_student;
  w.sum_w_teacher = sums.w_teacher;

  // Sweep 3: the non-direct sides' gradients (the same condition in every thread).
  if (valid && (w.write_s3 || w.write_t3)) {
    RowSums<acc_t> unused{acc_t(0), acc_t(0), acc_t(0)};
    w.template sweep<3>(unused);
  }

  if (in_range && lane == 0) {
    acc_t loss = 0;
    if (valid) {
      // A zero soft weight drops the divergence (never 0 * inf), as on the CPU.
      if (p.soft_factor > 0) {
        loss = p.soft_factor * sums.value;
      }
      if (p.hard) {
        // cross_entropy = -log softmax(s)[label], relative to the row maximum like every log p.
        // A label outside [0, cols) is a device-side assert, as in F.cross_entropy.
        CUDA_KERNEL_ASSERT(label >= 0 && label < p.cols);
        const acc_t x = w.label >= 0 ? static_cast<acc_t>(s[w.label])
                                     : std::numeric_limits<acc_t>::quiet_NaN();
        const acc_t ce = -acc_t(kLn2) * (fma_acc(x, acc_t(kLog2e), -w.ref1) - w.lse2_1);
        loss += static_cast<acc_t>(p.hard_weight) * ce;
      }
    }
    p.row_loss[row] = loss;
  }
}

// Whether divergence Div runs with accumulation type acc_t (JensenShannon carries its own).
template <typename Div, typename acc_t>
constexpr bool kRunsWith = true;
template <typename beta_t, typename acc_t>
constexpr bool kRunsWith<JensenShannon<beta_t>, acc_t> = std::is_same_v<beta_t, acc_t>;

template <typename Div, typename s_t, typename t_t>
void launch_rows_typed(const KdRowProblem& pr, const Div& div) {
  using acc_t = at::opmath_type<s_t>;
  using RowT = Row<Div, s_t, t_t>;
  constexpr int kW = RowT::kW;
  const int64_t packs = (pr.cols + kW - 1) / kW;
  int tpr = 4;
  while (tpr < kMaxThreadsPerRow && int64_t(tpr) * 4 < packs) {
    tpr *= 2;
  }
  const int block = tpr > kMinBlockThreads ? tpr : kMinBlockThreads;
  const int rows_per_block = block / tpr;
  auto round16 = [](int64_t bytes) { return (bytes + 15) / 16 * 16; };
  // A staged row: element j at j + offset, offset < kW, each tensor from a 16-byte boundary.
  const int64_t stage_s = round16((pr.cols + kW) * int64_t(sizeof(s_t)));
  const int64_t stage_t = round16((pr.cols + kW) * int64_t(sizeof(t_t)));
  const bool staged = rows_per_block * (stage_s + stage_t) <= kMaxStageBytes;
  const int64_t blocks = (pr.rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK_VALUE(
      pr.cols <= std::numeric_limits<int32_t>::max() - 2 * kVectorBytes,
      "kd_loss: at most ", std::numeric_limits<int32_t>::max() - 2 * kVectorBytes,
      " classes are supported on CUDA, got ", pr.cols);
  TORCH_CHECK(
      blocks <= std::numeric_limits<int32_t>::max(), "kd_loss: too many rows for one launch: ",
      pr.rows);
  const double T = pr.temperature;
  const RowParams<acc_t> params{
      pr.student,
      pr.teacher,
      pr.grad_student,
      pr.grad_teacher,
      pr.labels,
      pr.valid_count,
      static_cast<acc_t*>(pr.row_loss),
      pr.rows,
      pr.cols,
      pr.student_stride,
      pr.teacher_stride,
      pr.ignore_index,
      pr.divisor,
      static_cast<acc_t>(kLog2e / T),
      static_cast<acc_t>(pr.soft_weight * T * T),
      T,
      pr.soft_weight,
      pr.hard_weight,
      tpr,
      staged ? static_cast<int>(stage_s + stage_t) : 0,
      staged ? static_cast<int>(stage_s) : 0,
      pr.hard_weight > 0,
      T == 1.0};
  const size_t shared_bytes = staged ? size_t(rows_per_block) * size_t(stage_s + stage_t) : 0;
  kd_rows_kernel<Div, s_t, t_t>
      <<<static_cast<unsigned int>(blocks), block, shared_bytes, pr.stream>>>(params, div);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Div>
void launch_kd_rows(const KdRowProblem& problem, const Div& divergence) {
  dispatch_dtype_pair(problem.student_dtype, problem.teacher_dtype, "kd_loss", [&](auto s, auto t) {
    using s_t = decltype(s);
    using t_t = decltype(t);
    if constexpr (kRunsWith<Div, at::opmath_type<s_t>>) {
      launch_rows_typed<Div, s_t, t_t>(problem, divergence);
    } else {
      TORCH_INTERNAL_ASSERT(false, "kd_loss: divergence of the wrong accumulation type");
    }
  });
}

}  // namespace pykd::cuda
