// The CPU multi-teacher KD-loss kernel: loss and gradients in one pass. Included once per CPU
// capability (multi_teacher_kd_loss_default.cpp, multi_teacher_kd_loss_avx2.cpp), each defining
// CPU_CAPABILITY, so that at::vec::Vectorized compiles to that instruction set in its own
// namespace.
//
// Rows are split among threads (at::parallel_for). A row of the student and of each of the K
// teachers is read from memory once, in blocks of kBlock classes that stay in L1:
//   sweep 1, per block and per tensor (the student first, then each teacher): the block maximum,
//            then a = x/T - ref_b (one fused multiply-add, relative to the block's maximum) and
//            e = exp(a), kept in a per-thread scratch with the block's sum of e; for a teacher
//            also the block's sum of e_t * (a_t - a_s) (a_s kept for the block). K + 1
//            exponentials per class in all; nothing else of the row needs one.
//   then each tensor's log-sum-exp and each teacher's KL from the block sums alone:
//            KL_k = sum_j p_tk,j (a'_tk,j - a'_s,j) - log(total_tk / total_s)
//            with a' relative to the row's maxima (SPEC section 1's one-pass form);
//   sweep 2, only the scratch (no logits): d/ds = T/D (W p_s - sum_k w_k p_tk), p = e times a
//            per-block factor;
//   sweep 3, only when the teachers' gradients are wanted: the logits again (from cache for rows
//            that fit, else memory), d/dt_k = T/D w_k p_tk (log p_tk - log p_s - KL_k).
#include "cpu/multi_teacher_kd_loss_cpu.h"
#include "cpu/vec_rows.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
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

// What every row of a launch shares.
template <typename acc_t>
struct Launch {
  int64_t teachers;
  acc_t inv_temp;
  acc_t loss_scale;  // T^2
  acc_t grad_scale;  // T / D
  acc_t weight[kMaxTeachers];
  acc_t weight_sum;
};

// A thread's scratch, reused across rows.
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> es;       // [padded] the student's exponentials
  std::vector<acc_t> et;       // [K][padded] the teachers'
  std::vector<acc_t> a_s;      // [kBlock] the student's a of the current block
  std::vector<acc_t> s_ref;    // [blocks] per block: its reference,
  std::vector<acc_t> s_mult;   //          its sum of e, then the factor e -> p
  std::vector<acc_t> t_ref;    // [K][blocks] the same for every teacher,
  std::vector<acc_t> t_mult;
  std::vector<double> t_cross;  //          and its sum of e_t * (a_t - a_s)
  void fit(int64_t padded, int64_t blocks, int64_t teachers) {
    auto grow = [](auto& v, int64_t n) {
      if (int64_t(v.size()) < n) {
        v.resize(n);
      }
    };
    grow(es, padded);
    grow(et, padded * teachers);
    grow(a_s, kBlock);
    grow(s_ref, blocks);
    grow(s_mult, blocks);
    grow(t_ref, blocks * teachers);
    grow(t_mult, blocks * teachers);
    grow(t_cross, blocks * teachers);
  }
};

template <typename acc_t>
RowScratch<acc_t>& thread_scratch() {
  thread_local RowScratch<acc_t> scratch;
  return scratch;
}

// One block of one tensor in sweep 1: stores a (when a_out is set) and e = exp(a), returns the
// reference and the sum of e; with a_s set, also adds e * (a - a_s) to cross.
template <typename scalar_t, typename acc_t>
void block_exps(
    const scalar_t* x,
    int64_t n,
    acc_t inv_temp,
    acc_t* e_out,
    acc_t* a_out,
    const acc_t* a_s,
    acc_t& max,
    acc_t& ref,
    acc_t& sum,
    double& cross) {
  using S = Step<scalar_t>;
  using Vec = typename S::Vec;
  constexpr int64_t kSize = S::kSize, kWidth = S::kWidth;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  Vec vmax(-kInf);
  for (int64_t i = 0; i < n; i += kSize) {
    Vec x0, x1;
    load_step(x + i, n - i, x0, x1);
    vmax = at::vec::maximum(vmax, at::vec::maximum(x0, x1));
  }
  max = reduce_max(vmax);
  ref = exp_reference(max * inv_temp);
  const Vec vinv(inv_temp), vref(ref);
  Vec vsum(0), vcross(0);
  for (int64_t i = 0; i < n; i += kSize) {
    Vec v[2];
    load_step(x + i, n - i, v[0], v[1]);
    for (int h = 0; h < 2; ++h) {
      const Vec a = at::vec::fmsub(v[h], vinv, vref);
      const Vec e = a.exp_u20();
      e.store(e_out + i + h * kWidth);
      vsum = vsum + e;
      if (a_out != nullptr) {
        a.store(a_out + i + h * kWidth);
      }
      if (a_s != nullptr) {
        vcross = vcross + unless_zero(e, e * (a - Vec::loadu(a_s + i + h * kWidth)));
      }
    }
  }
  sum = reduce_sum(vsum);
  cross = a_s != nullptr ? double(reduce_sum(vcross)) : 0.0;
}

// One row of at least two classes. Returns the row's loss.
template <typename scalar_s, typename scalar_t>
typename Step<scalar_s>::acc_t row_loss_and_grads(
    const scalar_s* s,
    const scalar_t* const* t,
    int64_t cols,
    const Launch<typename Step<scalar_s>::acc_t>& L,
    scalar_s* grad_s,
    scalar_t* const* grad_t) {
  using SS = Step<scalar_s>;
  using ST = Step<scalar_t>;
  using acc_t = typename SS::acc_t;
  using Vec = typename SS::Vec;
  static_assert(SS::kSize == ST::kSize && std::is_same_v<acc_t, typename ST::acc_t>);
  static_assert(kBlock % SS::kSize == 0);
  constexpr int64_t kSize = SS::kSize, kWidth = SS::kWidth;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const int64_t K = L.teachers;
  const int64_t blocks = (cols + kBlock - 1) / kBlock;
  const int64_t padded = (cols + kSize - 1) / kSize * kSize;
  RowScratch<acc_t>& scratch = thread_scratch<acc_t>();
  scratch.fit(padded, blocks, K);
  acc_t* es = scratch.es.data();
  acc_t* et = scratch.et.data();
  acc_t* a_s = scratch.a_s.data();
  acc_t* s_ref = scratch.s_ref.data();
  acc_t* s_mult = scratch.s_mult.data();
  acc_t* t_ref = scratch.t_ref.data();
  acc_t* t_mult = scratch.t_mult.data();
  double* t_cross = scratch.t_cross.data();

  // Sweep 1.
  acc_t max_s = -kInf, max_t[kMaxTeachers];
  std::fill(max_t, max_t + K, -kInf);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kBlock, n = std::min(kBlock, cols - begin);
    acc_t m;
    double unused;
    block_exps(s + begin, n, L.inv_temp, es + begin, a_s, static_cast<const acc_t*>(nullptr), m,
               s_ref[b], s_mult[b], unused);
    max_s = nan_max(max_s, m);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t kb = k * blocks + b;
      block_exps(t[k] + begin, n, L.inv_temp, et + k * padded + begin,
                 static_cast<acc_t*>(nullptr), a_s, m, t_ref[kb], t_mult[kb], t_cross[kb]);
      max_t[k] = nan_max(max_t[k], m);
    }
  }

  // The row's statistics. a'_t - a'_s = (a_t - a_s) + (ref_t,b - ref_t) - (ref_s,b - ref_s) for a
  // class of block b, so each block's cross sum moves to the row's references by its teacher's
  // sum of e times that shift.
  acc_t ref_s, total_s;
  combine_blocks(s_ref, s_mult, blocks, max_s, L.inv_temp, ref_s, total_s);
  // A side without mass (every logit -inf) keeps probabilities 0 (and a teacher without mass
  // adds 0, as kd_loss does); a student without mass where a teacher has some gives +inf.
  const acc_t inv_s = total_s > 0 ? 1 / total_s : 0;
  const acc_t log_total_s = total_s > 0 ? std::log(total_s) : 0;
  for (int64_t b = 0; b < blocks; ++b) {
    s_mult[b] *= inv_s;
  }
  acc_t ref_t[kMaxTeachers], kl[kMaxTeachers], log_ratio[kMaxTeachers];
  double loss = 0;
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* refs = t_ref + k * blocks;
    acc_t* sums = t_mult + k * blocks;  // becomes the factors e -> p
    const double* cross_b = t_cross + k * blocks;
    ref_t[k] = exp_reference(max_t[k] * L.inv_temp);
    double total = 0, cross = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      if (sums[b] == 0) {  // no mass: the factor 0, never exp of a huge shift
        continue;
      }
      const double factor = std::exp(double(refs[b] - ref_t[k]));
      const double shift = double(refs[b] - ref_t[k]) - double(s_ref[b] - ref_s);
      total += double(sums[b]) * factor;
      cross += factor * (cross_b[b] + shift * double(sums[b]));
      sums[b] = static_cast<acc_t>(factor);
    }
    const acc_t total_t = static_cast<acc_t>(total);
    const acc_t inv_t = total_t > 0 ? 1 / total_t : 0;
    for (int64_t b = 0; b < blocks; ++b) {
      sums[b] *= inv_t;
    }
    log_ratio[k] = total_s > 0 && total_t > 0 ? std::log(total_t / total_s)
                                              : (total_t > 0 ? std::log(total_t) : 0) - log_total_s;
    kl[k] = total_t > 0 ? static_cast<acc_t>(cross / total - double(log_ratio[k])) : acc_t(0);
    loss += double(L.weight[k]) * double(kl[k]);
  }

  // Sweep 2: the student's gradient from the scratch.
  if (grad_s != nullptr) {
    acc_t coeff[kMaxTeachers];
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t begin = b * kBlock, n = std::min(kBlock, cols - begin);
      const Vec c_s(L.grad_scale * L.weight_sum * s_mult[b]);
      for (int64_t k = 0; k < K; ++k) {
        coeff[k] = L.grad_scale * L.weight[k] * t_mult[k * blocks + b];
      }
      for (int64_t i = 0; i < n; i += kSize) {
        const int64_t j = begin + i;
        Vec g0 = Vec::loadu(es + j) * c_s;
        Vec g1 = Vec::loadu(es + j + kWidth) * c_s;
        for (int64_t k = 0; k < K; ++k) {
          const acc_t* e = et + k * padded + j;
          const Vec c(coeff[k]);
          g0 = g0 - Vec::loadu(e) * c;
          g1 = g1 - Vec::loadu(e + kWidth) * c;
        }
        SS::store(grad_s + j, n - i, g0, g1);
      }
    }
  }

  // Sweep 3: the teachers' gradients, from their logits and the student's again.
  if (grad_t != nullptr) {
    const Vec vinv(L.inv_temp), vref_s(ref_s);
    for (int64_t k = 0; k < K; ++k) {
      const Vec vref_t(ref_t[k]), vlog_ratio(log_ratio[k]), vkl(kl[k]);
      const acc_t scale = L.grad_scale * L.weight[k];
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t begin = b * kBlock, n = std::min(kBlock, cols - begin);
        const Vec vmult(t_mult[k * blocks + b]), vscale(scale);
        for (int64_t i = 0; i < n; i += kSize) {
          const int64_t j = begin + i;
          Vec vs[2], vt[2], g[2];
          load_step(s + j, n - i, vs[0], vs[1]);
          load_step(t[k] + j, n - i, vt[0], vt[1]);
          for (int h = 0; h < 2; ++h) {
            const Vec p_t = Vec::loadu(et + k * padded + j + h * kWidth) * vmult;
            const Vec lr = (at::vec::fmsub(vt[h], vinv, vref_t) -
                            at::vec::fmsub(vs[h], vinv, vref_s)) - vlog_ratio;
            g[h] = (unless_zero(p_t, p_t * lr) - p_t * vkl) * vscale;
          }
          ST::store(grad_t[k] + j, n - i, g[0], g[1]);
        }
      }
    }
  }
  return L.loss_scale * static_cast<acc_t>(loss);
}

template <typename scalar_s, typename scalar_t>
void run(const MultiTeacherKernelArgs& a) {
  using acc_t = typename Step<scalar_s>::acc_t;
  const int64_t K = a.teacher_count;
  const auto* s = static_cast<const scalar_s*>(a.student);
  auto* grad_s = static_cast<scalar_s*>(a.grad_student);
  const bool teacher_grad = a.grad_teachers[0] != nullptr;
  auto* row_loss = static_cast<acc_t*>(a.row_loss);
  Launch<acc_t> L{};
  L.teachers = K;
  L.inv_temp = static_cast<acc_t>(1.0 / a.temperature);
  L.loss_scale = static_cast<acc_t>(a.temperature * a.temperature);
  L.grad_scale = static_cast<acc_t>(a.temperature * a.inv_denominator);
  double weight_sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    L.weight[k] = static_cast<acc_t>(a.weights[k]);
    weight_sum += a.weights[k];
  }
  L.weight_sum = static_cast<acc_t>(weight_sum);
  auto valid = [&](int64_t r) { return !a.labels || a.labels[r] != a.ignore_index; };

  at::parallel_for(0, a.rows, grain_rows(a.cols * (K + 1)), [&](int64_t begin, int64_t end) {
    const scalar_t* t[kMaxTeachers];
    scalar_t* gt[kMaxTeachers];
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t k = 0; k < K; ++k) {
        t[k] = static_cast<const scalar_t*>(a.teachers[k]) + r * a.teacher_strides[k];
        gt[k] = teacher_grad ? static_cast<scalar_t*>(a.grad_teachers[k]) + r * a.cols : nullptr;
      }
      scalar_s* gs = grad_s ? grad_s + r * a.cols : nullptr;
      const scalar_s* sr = s + r * a.student_stride;
      if (!valid(r)) {
        row_loss[r] = 0;
        if (gs) {
          std::memset(static_cast<void*>(gs), 0, a.cols * sizeof(scalar_s));
        }
        for (int64_t k = 0; teacher_grad && k < K; ++k) {
          std::memset(static_cast<void*>(gt[k]), 0, a.cols * sizeof(scalar_t));
        }
        continue;
      }
      if (a.cols == 1) {
        // One class: every softmax is exactly 1, so every KL and every gradient is 0 (NaN for a
        // NaN or infinite logit, as the formulas give), without rounding noise.
        const acc_t x = static_cast<acc_t>(sr[0]);
        acc_t zero = x - x;
        for (int64_t k = 0; k < K; ++k) {
          const acc_t y = static_cast<acc_t>(t[k][0]);
          zero += y - y;
          if (teacher_grad) {
            gt[k][0] = static_cast<scalar_t>((y - y) * 0);
          }
        }
        row_loss[r] = zero;
        if (gs) {
          gs[0] = static_cast<scalar_s>((x - x) * 0);
        }
        continue;
      }
      row_loss[r] = row_loss_and_grads<scalar_s, scalar_t>(
          sr, t, a.cols, L, gs, teacher_grad ? gt : nullptr);
    }
  });
}

}  // namespace

void multi_teacher_kd_loss_rows(const MultiTeacherKernelArgs& args) {
  dispatch_dtype_pair(args.student_dtype, args.teacher_dtype, "multi_teacher_kd_loss",
                      [&](auto student, auto teacher) {
                        run<decltype(student), decltype(teacher)>(args);
                      });
}

}  // namespace CPU_CAPABILITY
}  // namespace pykd::cpu
