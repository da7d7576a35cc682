// The CPU sparse-teacher KD kernel: loss and student gradient in one pass (the math is
// csrc/sparse_kd_loss.h's). Included once per CPU capability (sparse_kd_loss_default.cpp,
// sparse_kd_loss_avx2.cpp), each defining CPU_CAPABILITY, so that at::vec::Vectorized compiles
// to that instruction set in its own namespace. Rows are shared among the threads; a row is
// walked like kd_loss_kernel.h's long rows, in blocks of kBlock classes that stay in L1:
//   sweep 1, per block: the block maximum, then es = exp(s/T - ref_b), one exponential per
//            element, kept in a per-thread scratch with the block's sum;
//   then the row's log-sum-exp from the block sums, and the K teacher entries' terms (scalar code:
//            their log p_s[idx] from the logits themselves). The classes the indices name are
//            marked in the scratch (es = -1), which also counts the distinct ones;
//   with teacher_lse and a tail (r > 0): the student's tail mass q, summed over the unmarked
//            classes of the scratch (no exponential); where that sum is so small that its terms
//            may have underflowed relative to the blocks' maxima (below kSmallTail relative to
//            the row's), the tail is summed again relative to its own maximum (one exponential
//            per element, in such rows only);
//   sweep 2: the gradient from the scratch (p = es * a per-block factor), written once per class;
//            the named classes are then overwritten with u p_s - sum of their entries' p_k, the
//            sum taken in the scratch in the accumulation type (so repeated indices add up
//            exactly).
#include "cpu/sparse_kd_loss_cpu.h"
#include "cpu/vec_rows.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace pykd::cpu {
namespace CPU_CAPABILITY {
namespace {

// Below this tail sum (relative to the row's maximum, whose own term is 1) the tail's largest
// terms may be < 2^-40 / kBlock of their block's maximum, and its smaller terms subnormal or 0
// in the blocks' exponentials: the tail is then summed again relative to its own maximum.
constexpr double kSmallTail = 0x1p-40;
// Marks a class named by the teacher's indices in the scratch of exponentials (never an exp).
constexpr int kMarked = -1;

// One teacher entry of a row: its class, and log p_k / p_k; then the student's at that class.
template <typename acc_t>
struct Entry {
  int64_t index;
  acc_t log_p, p;
  acc_t log_ps, ps;
};

template <typename acc_t>
struct Scratch {
  std::vector<acc_t> es;
  std::vector<acc_t> ref, factor, tail;  // per block
  std::vector<Entry<acc_t>> entries;
  void fit(int64_t padded_cols, int64_t blocks, int64_t k) {
    if (int64_t(es.size()) < padded_cols) {
      es.resize(padded_cols);
    }
    ref.resize(blocks);
    factor.resize(blocks);
    tail.resize(blocks);
    entries.resize(k);
  }
};

template <typename acc_t>
Scratch<acc_t>& thread_scratch() {
  thread_local Scratch<acc_t> scratch;
  return scratch;
}

// What every row of a launch shares.
template <typename acc_t>
struct Launch {
  acc_t inv_temp;
  acc_t loss_scale;  // T^2
  acc_t grad_scale;  // T / D
  int64_t cols, k;
  bool with_lse;
};

// The teacher's K entries of one row: checks the indices, and computes log p_k, p_k (the
// renormalised softmax of v / T over the K entries, or exp(v / T - lse) with lse non-null).
template <typename acc_t, typename scalar_v, typename index_t>
void load_entries(
    const scalar_v* v,
    const index_t* idx,
    const acc_t* lse,
    const Launch<acc_t>& L,
    int64_t row,
    Entry<acc_t>* entries) {
  for (int64_t k = 0; k < L.k; ++k) {
    const int64_t j = static_cast<int64_t>(idx[k]);
    TORCH_CHECK_VALUE(
        j >= 0 && j < L.cols, "sparse_kd_loss: teacher_indices must be class indices in [0, ",
        L.cols, "), got ", j, " (row ", row, ", entry ", k, ")");
    entries[k].index = j;
    entries[k].log_p = static_cast<acc_t>(v[k]);  // finished below
  }
  if (lse != nullptr) {
    for (int64_t k = 0; k < L.k; ++k) {
      entries[k].log_p = entries[k].log_p * L.inv_temp - *lse;
    }
  } else {
    // log p_k = (v_k / T - ref) - log(sum), relative to the maximum in one multiply-add.
    acc_t maximum = -std::numeric_limits<acc_t>::infinity();
    for (int64_t k = 0; k < L.k; ++k) {
      maximum = nan_max(maximum, entries[k].log_p);
    }
    const acc_t ref = exp_reference(maximum * L.inv_temp);
    double sum = 0;
    for (int64_t k = 0; k < L.k; ++k) {
      entries[k].log_p = std::fma(entries[k].log_p, L.inv_temp, -ref);
      sum += std::exp(entries[k].log_p);
    }
    // A teacher without mass (every value -inf) keeps probabilities 0, as in kd_loss.
    const acc_t log_sum = sum > 0 ? static_cast<acc_t>(std::log(sum)) : acc_t(0);
    for (int64_t k = 0; k < L.k; ++k) {
      entries[k].log_p -= log_sum;
    }
  }
  for (int64_t k = 0; k < L.k; ++k) {
    entries[k].p = std::exp(entries[k].log_p);
  }
}

// One valid row: returns its loss and writes its gradient (when grad is non-null).
template <typename scalar_s>
typename Step<scalar_s>::acc_t sparse_row(
    const scalar_s* s,
    Entry<typename Step<scalar_s>::acc_t>* entries,
    const Launch<typename Step<scalar_s>::acc_t>& L,
    Scratch<typename Step<scalar_s>::acc_t>& scratch,
    scalar_s* grad) {
  using S = Step<scalar_s>;
  using acc_t = typename S::acc_t;
  using Vec = typename S::Vec;
  constexpr int64_t kSize = S::kSize, kWidth = S::kWidth;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const int64_t cols = L.cols;
  const int64_t blocks = (cols + kBlock - 1) / kBlock;
  acc_t* es = scratch.es.data();
  const Vec vinv(L.inv_temp);

  // Sweep 1.
  acc_t max_s = -kInf;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kBlock, n = std::min(kBlock, cols - begin);
    Vec vmax(-kInf);
    for (int64_t i = 0; i < n; i += kSize) {
      Vec x0, x1;
      load_step(s + begin + i, n - i, x0, x1);
      vmax = at::vec::maximum(vmax, at::vec::maximum(x0, x1));
    }
    const acc_t m = reduce_max(vmax);
    max_s = nan_max(max_s, m);
    scratch.ref[b] = exp_reference(m * L.inv_temp);
    const Vec vref(scratch.ref[b]);
    Vec sum(0);
    for (int64_t i = 0; i < n; i += kSize) {
      Vec x0, x1;
      load_step(s + begin + i, n - i, x0, x1);
      const Vec e0 = at::vec::fmsub(x0, vinv, vref).exp_u20();
      const Vec e1 = at::vec::fmsub(x1, vinv, vref).exp_u20();
      e0.store(es + begin + i);
      e1.store(es + begin + i + kWidth);
      sum = sum + e0 + e1;
    }
    scratch.factor[b] = reduce_sum(sum);  // the block's sum, until combine_blocks
  }
  acc_t ref_s, z;
  combine_blocks(scratch.ref.data(), scratch.factor.data(), blocks, max_s, L.inv_temp, ref_s, z);
  // A student without mass keeps p_s = 0 and log p_s = -inf (a loss of +inf where p_k > 0).
  const acc_t log_z = z > 0 ? std::log(z) : acc_t(0);
  const acc_t inv_z = z > 0 ? acc_t(1) / z : acc_t(0);

  // The entries' terms, and the marks.
  double value = 0, teacher_mass = 0;
  int64_t distinct = 0;
  for (int64_t k = 0; k < L.k; ++k) {
    Entry<acc_t>& e = entries[k];
    e.log_ps = std::fma(static_cast<acc_t>(s[e.index]), L.inv_temp, -ref_s) - log_z;
    e.ps = std::exp(e.log_ps);
    if (e.p != 0) {  // 0 log 0 = 0 (a NaN p_k stays NaN)
      value += double(e.p) * double(e.log_p - e.log_ps);
    }
    teacher_mass += e.p;
    if (es[e.index] != acc_t(kMarked)) {
      es[e.index] = acc_t(kMarked);
      ++distinct;
    }
  }

  // The tail bucket.
  acc_t r = 0, u = 1;
  acc_t tail_ref = ref_s, tail_log_z = 0, tail_z = 0;
  bool own_tail_reference = false;  // the tail summed again relative to its own maximum
  if (L.with_lse) {
    r = distinct == cols ? acc_t(0) : std::max(acc_t(0), static_cast<acc_t>(1.0 - teacher_mass));
    u = static_cast<acc_t>(teacher_mass) + r;
  }
  if (r > 0) {
    const Vec zero(0);
    double tail_total = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t begin = b * kBlock, n = std::min(kBlock, cols - begin);
      Vec sum(0);
      for (int64_t i = 0; i < n; i += kSize) {  // lanes past the row hold 0
        sum = sum + at::vec::maximum(Vec::loadu(es + begin + i), zero) +
            at::vec::maximum(Vec::loadu(es + begin + i + kWidth), zero);
      }
      tail_total += double(reduce_sum(sum)) * scratch.factor[b];
    }
    tail_z = static_cast<acc_t>(tail_total);
    if (!(tail_total >= kSmallTail)) {
      own_tail_reference = true;
      const Vec marked(kMarked), neg_inf(-kInf);
      auto unmarked = [&](int64_t j, const Vec& x) {
        return Vec::blendv(x, neg_inf, Vec::loadu(es + j) == marked);
      };
      Vec vmax(-kInf);
      for (int64_t i = 0; i < cols; i += kSize) {
        Vec x0, x1;
        load_step(s + i, cols - i, x0, x1);
        vmax = at::vec::maximum(vmax, at::vec::maximum(unmarked(i, x0), unmarked(i + kWidth, x1)));
      }
      tail_ref = exp_reference(reduce_max(vmax) * L.inv_temp);
      const Vec vref(tail_ref);
      Vec sum(0);
      for (int64_t i = 0; i < cols; i += kSize) {
        Vec x0, x1;
        load_step(s + i, cols - i, x0, x1);
        sum = sum + at::vec::fmsub(unmarked(i, x0), vinv, vref).exp_u20() +
            at::vec::fmsub(unmarked(i + kWidth, x1), vinv, vref).exp_u20();
      }
      tail_z = reduce_sum(sum);
    }
    tail_log_z = std::log(tail_z);  // -inf without tail mass: q = 0, a loss of +inf
    const acc_t log_q = (tail_ref - ref_s) + (tail_log_z - log_z);
    value += double(r) * double(std::log(r) - log_q);
  }
  const acc_t loss = L.loss_scale * static_cast<acc_t>(value);
  if (grad == nullptr) {
    return loss;
  }

  // Sweep 2: g_j = T / D * (u p_j - r p_j / q) for every class, the named ones fixed after.
  const bool tail_grad = r > 0 && tail_z > 0;
  const acc_t tail_coef = tail_grad && !own_tail_reference ? r / tail_z : acc_t(0);
  const Vec vtail_ref(tail_ref), vtail_scale(tail_grad ? L.grad_scale * r / tail_z : acc_t(0));
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kBlock, n = std::min(kBlock, cols - begin);
    const Vec coef(scratch.factor[b] * L.grad_scale * (u * inv_z - tail_coef));
    for (int64_t i = 0; i < n; i += kSize) {
      const int64_t j = begin + i;
      Vec g0 = Vec::loadu(es + j) * coef, g1 = Vec::loadu(es + j + kWidth) * coef;
      if (own_tail_reference && tail_grad) {
        Vec x0, x1;
        load_step(s + j, n - i, x0, x1);
        g0 = g0 - at::vec::fmsub(x0, vinv, vtail_ref).exp_u20() * vtail_scale;
        g1 = g1 - at::vec::fmsub(x1, vinv, vtail_ref).exp_u20() * vtail_scale;
      }
      S::store(grad + j, n - i, g0, g1);
    }
  }
  for (int64_t k = 0; k < L.k; ++k) {
    es[entries[k].index] = 0;
  }
  for (int64_t k = 0; k < L.k; ++k) {
    es[entries[k].index] += entries[k].p;
  }
  for (int64_t k = 0; k < L.k; ++k) {
    const int64_t j = entries[k].index;
    grad[j] = static_cast<scalar_s>(L.grad_scale * (u * entries[k].ps - es[j]));
  }
  return loss;
}

template <typename scalar_s, typename scalar_v, typename index_t>
void run(const SparseKdKernelArgs& a) {
  using acc_t = typename Step<scalar_s>::acc_t;
  const auto* s = static_cast<const scalar_s*>(a.student);
  const auto* v = static_cast<const scalar_v*>(a.values);
  const auto* idx = static_cast<const index_t*>(a.indices);
  const auto* lse = static_cast<const acc_t*>(a.lse);
  auto* grad = static_cast<scalar_s*>(a.grad_student);
  auto* row_loss = static_cast<acc_t*>(a.row_loss);
  const Launch<acc_t> L{
      static_cast<acc_t>(1.0 / a.temperature),
      static_cast<acc_t>(a.temperature * a.temperature),
      static_cast<acc_t>(a.temperature * a.inv_denominator),
      a.cols,
      a.k,
      lse != nullptr};
  const int64_t padded = (a.cols + Step<scalar_s>::kSize - 1) / Step<scalar_s>::kSize *
      Step<scalar_s>::kSize;
  const int64_t blocks = (a.cols + kBlock - 1) / kBlock;
  at::parallel_for(0, a.rows, grain_rows(a.cols), [&](int64_t begin, int64_t end) {
    Scratch<acc_t>& scratch = thread_scratch<acc_t>();
    scratch.fit(padded, blocks, a.k);
    for (int64_t r = begin; r < end; ++r) {
      scalar_s* g = grad ? grad + r * a.cols : nullptr;
      if (a.labels && a.labels[r] == a.ignore_index) {
        row_loss[r] = 0;
        if (g) {
          std::memset(static_cast<void*>(g), 0, a.cols * sizeof(scalar_s));
        }
        continue;
      }
      load_entries<acc_t>(
          v + r * a.values_stride, idx + r * a.indices_stride, lse ? lse + r : nullptr, L, r,
          scratch.entries.data());
      row_loss[r] = sparse_row<scalar_s>(
          s + r * a.student_stride, scratch.entries.data(), L, scratch, g);
    }
  });
}

}  // namespace

void sparse_kd_loss_rows(const SparseKdKernelArgs& args) {
  auto with_index = [&](auto student, auto values) {
    using scalar_s = decltype(student);
    using scalar_v = decltype(values);
    if (args.indices_dtype == c10::ScalarType::Int) {
      run<scalar_s, scalar_v, int32_t>(args);
    } else {
      run<scalar_s, scalar_v, int64_t>(args);
    }
  };
  dispatch_dtype_pair(args.student_dtype, args.values_dtype, "sparse_kd_loss", with_index);
}

}  // namespace CPU_CAPABILITY
}  // namespace pykd::cpu
