// The CPU KD-loss kernel: loss and gradients in one pass. Included once per CPU capability
// (kd_loss_default.cpp, kd_loss_avx2.cpp), each defining CPU_CAPABILITY, so that
// at::vec::Vectorized compiles to that instruction set in its own namespace.
//
// The math of each divergence is csrc/divergence.h's; this file only decides how a row is walked.
// A row is read from memory once, in blocks of kBlock classes that stay in L1:
//   sweep 1, per block: block maxima, then es = exp(s/T - ref_b) and et = exp(t/T - ref_t,b),
//            two exponentials per element, kept in a per-thread scratch (with the block's sums);
//   then the row's log-sum-exps from the block sums (no element is touched);
//   sweep 2, over the row again (from L1/L2: it was just read): the probabilities from the
//            scratch (p = e * a per-block factor, no exponential), the divergence's terms, the
//            loss, and the gradient, written straight away for a "direct" side;
//   sweep 3, only for a side that is not direct (reverse KL's student, JSD, forward KL's
//            teacher): subtracts prob * sum(w) from the gradient kept in the scratch.
// The hard-label cross-entropy at T != 1 costs two more exponentials per element (its softmax
// at T = 1). Rows of at most kMaxShortCols classes put one row per vector lane instead.
//
// Precision: log p = (x * (1/T) - ref) - log(sum), the first term one fused multiply-add relative
// to the row's maximum, so that logits of any magnitude keep the accuracy of their differences;
// the loss of a row is summed per block in vector lanes and across blocks in double.
#include "cpu/kd_loss_cpu.h"
#include "cpu/vec_rows.h"
#include "divergence.h"

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

// divergence.h's math policy over vectors.
template <typename Vec>
struct VecMath {
  using V = Vec;
  static V unless_zero(const V& x, const V& value) {
    return CPU_CAPABILITY::unless_zero(x, value);
  }
  static V log(const V& x) {
    return x.log();
  }
  static V max(const V& a, const V& b) {
    return at::vec::maximum(a, b);
  }
};

template <typename Vec>
inline Vec lane_exp_reference(const Vec& maximum) {
  using acc_t = typename Vec::value_type;
  return Vec::blendv(maximum, Vec(0), maximum == Vec(-std::numeric_limits<acc_t>::infinity()));
}

// What every row of a launch shares.
template <typename acc_t>
struct Launch {
  acc_t inv_temp;
  acc_t soft_scale;   // soft_weight * T^2: a row's divergence in its loss
  acc_t grad_soft;    // soft_weight * T / D: a class's soft gradient is grad_soft * (w - p * sum w)
  acc_t grad_hard;    // hard_weight / D
  acc_t hard_weight;
  bool hard;          // hard_weight > 0
  bool unit_temperature;
  bool student_grad, teacher_grad;
};

// A thread's scratch, reused across rows: the exponentials of sweep 1 and, for a side that is not
// direct, its gradient before sweep 3.
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> es, et, gs, gt;
  // Per block: the reference of its exponentials, their sum, and then the factor that turns them
  // into probabilities (for the student, the teacher, and the student at T = 1).
  std::vector<acc_t> ref_s, ref_t, ref1, sum_s, sum_t, sum1;
  void fit(int64_t padded_cols, int64_t blocks) {
    for (auto* v : {&es, &et, &gs, &gt}) {
      if (int64_t(v->size()) < padded_cols) {
        v->resize(padded_cols);
      }
    }
    for (auto* v : {&ref_s, &ref_t, &ref1, &sum_s, &sum_t, &sum1}) {
      v->resize(blocks);
    }
  }
};

template <typename acc_t>
RowScratch<acc_t>& thread_scratch() {
  thread_local RowScratch<acc_t> scratch;
  return scratch;
}

// One row of more than kMaxShortCols classes. Returns the row's loss.
template <typename scalar_s, typename scalar_t, typename Div>
typename Step<scalar_s>::acc_t long_row(
    const scalar_s* s,
    const scalar_t* t,
    int64_t cols,
    int64_t label,
    const Div& div,
    const Launch<typename Step<scalar_s>::acc_t>& L,
    scalar_s* grad_s,
    scalar_t* grad_t) {
  using SS = Step<scalar_s>;
  using ST = Step<scalar_t>;
  using acc_t = typename SS::acc_t;
  using Vec = typename SS::Vec;
  using M = VecMath<Vec>;
  static_assert(SS::kSize == ST::kSize && std::is_same_v<acc_t, typename ST::acc_t>);
  constexpr int64_t kSize = SS::kSize, kWidth = SS::kWidth;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const int64_t blocks = (cols + kBlock - 1) / kBlock;
  const int64_t padded = (cols + kSize - 1) / kSize * kSize;
  RowScratch<acc_t>& scratch = thread_scratch<acc_t>();
  scratch.fit(padded, blocks);
  acc_t* es = scratch.es.data();
  acc_t* et = scratch.et.data();
  const Vec vinv(L.inv_temp);
  const bool hard_exp = L.hard && !L.unit_temperature;

  // Sweep 1. Per block: the raw maxima m (the student's also serves the cross-entropy at T = 1),
  // the references ref = m / T, and the sums of e relative to them.
  acc_t max_s = -kInf, max_t = -kInf;
  std::vector<acc_t>&ref_s_b = scratch.ref_s, &ref_t_b = scratch.ref_t, &ref1_b = scratch.ref1;
  std::vector<acc_t>&mult_s = scratch.sum_s, &mult_t = scratch.sum_t, &sum1_b = scratch.sum1;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kBlock, n = std::min(kBlock, cols - begin);
    Vec vmax_s(-kInf), vmax_t(-kInf);
    for (int64_t i = 0; i < n; i += kSize) {
      Vec s0, s1, t0, t1;
      load_step(s + begin + i, n - i, s0, s1);
      load_step(t + begin + i, n - i, t0, t1);
      vmax_s = at::vec::maximum(vmax_s, at::vec::maximum(s0, s1));
      vmax_t = at::vec::maximum(vmax_t, at::vec::maximum(t0, t1));
    }
    const acc_t m_s = reduce_max(vmax_s), m_t = reduce_max(vmax_t);
    max_s = nan_max(max_s, m_s);
    max_t = nan_max(max_t, m_t);
    ref_s_b[b] = exp_reference(m_s * L.inv_temp);
    ref_t_b[b] = exp_reference(m_t * L.inv_temp);
    const Vec vref_s(ref_s_b[b]), vref_t(ref_t_b[b]);
    const acc_t r1 = exp_reference(m_s);
    const Vec vref1(r1);
    Vec sum_s(0), sum_t(0), sum1(0);
    for (int64_t i = 0; i < n; i += kSize) {
      Vec s0, s1, t0, t1;
      load_step(s + begin + i, n - i, s0, s1);
      load_step(t + begin + i, n - i, t0, t1);
      const Vec es0 = at::vec::fmsub(s0, vinv, vref_s).exp_u20();
      const Vec es1 = at::vec::fmsub(s1, vinv, vref_s).exp_u20();
      const Vec et0 = at::vec::fmsub(t0, vinv, vref_t).exp_u20();
      const Vec et1 = at::vec::fmsub(t1, vinv, vref_t).exp_u20();
      es0.store(es + begin + i);
      es1.store(es + begin + i + kWidth);
      et0.store(et + begin + i);
      et1.store(et + begin + i + kWidth);
      sum_s = sum_s + es0 + es1;
      sum_t = sum_t + et0 + et1;
      if (hard_exp) {
        sum1 = sum1 + (s0 - vref1).exp_u20() + (s1 - vref1).exp_u20();
      }
    }
    mult_s[b] = reduce_sum(sum_s);
    mult_t[b] = reduce_sum(sum_t);
    ref1_b[b] = r1;
    sum1_b[b] = hard_exp ? reduce_sum(sum1) : acc_t(0);
  }

  // The row's statistics: each block's sums become its factor to the row's reference.
  auto combine = [&](const std::vector<acc_t>& refs, std::vector<acc_t>& sums, acc_t row_max,
                     acc_t scale, acc_t& ref, acc_t& total) {
    combine_blocks(refs.data(), sums.data(), blocks, row_max, scale, ref, total);
  };
  acc_t ref_s, ref_t, total_s, total_t;
  combine(ref_s_b, mult_s, max_s, L.inv_temp, ref_s, total_s);
  combine(ref_t_b, mult_t, max_t, L.inv_temp, ref_t, total_t);
  // A student without mass (every logit -inf) keeps probabilities 0 and log-probabilities -inf,
  // so that it gives +inf where the teacher has mass, not NaN. A teacher without mass is no
  // distribution: its row is NaN (loss and gradients), as log_softmax makes it.
  constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
  const acc_t inv_s = total_s > 0 ? 1 / total_s : 0, inv_t = total_t > 0 ? 1 / total_t : kNaN;
  for (int64_t b = 0; b < blocks; ++b) {
    mult_s[b] *= inv_s;
    mult_t[b] *= inv_t;
  }
  const acc_t log_total_s = total_s > 0 ? std::log(total_s) : 0;
  const acc_t log_total_t = total_t > 0 ? std::log(total_t) : kNaN;
  const acc_t log_total_ratio =
      total_s > 0 && total_t > 0 ? std::log(total_t / total_s) : log_total_t - log_total_s;
  acc_t lse1 = ref_s + log_total_s;  // at T = 1
  if (hard_exp) {
    acc_t ref1, total1;
    combine(ref1_b, sum1_b, max_s, acc_t(1), ref1, total1);
    lse1 = ref1 + (total1 > 0 ? std::log(total1) : acc_t(0));  // no mass: as at T = 1
  }

  // Sweep 2.
  const bool fix_s = L.student_grad && !Div::kStudentDirect;
  const bool fix_t = L.teacher_grad && !Div::kTeacherDirect;
  acc_t* gs = scratch.gs.data();
  acc_t* gt = scratch.gt.data();
  const Vec vref_s(ref_s), vref_t(ref_t), vlog_s(log_total_s), vlog_t(log_total_t),
      vlog_ratio(log_total_ratio), vgrad_soft(L.grad_soft), vgrad_hard(L.grad_hard),
      vlse1(lse1);
  double value = 0, w_sum_s = 0, w_sum_t = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kBlock, n = std::min(kBlock, cols - begin);
    const Vec vmult_s(mult_s[b]), vmult_t(mult_t[b]);
    Vec block_value(0), block_w_s(0), block_w_t(0);
    for (int64_t i = 0; i < n; i += kSize) {
      Vec vs[2], vt[2], out_s[2], out_t[2];
      load_step(s + begin + i, n - i, vs[0], vs[1]);
      load_step(t + begin + i, n - i, vt[0], vt[1]);
      for (int h = 0; h < 2; ++h) {
        const int64_t j = begin + i + h * kWidth;
        const Vec a_s = at::vec::fmsub(vs[h], vinv, vref_s);
        const Vec a_t = at::vec::fmsub(vt[h], vinv, vref_t);
        const ClassTerms<Vec> c{
            Vec::loadu(et + j) * vmult_t, Vec::loadu(es + j) * vmult_s, a_t - vlog_t,
            a_s - vlog_s, (a_t - a_s) - vlog_ratio};
        const DivergenceTerms<Vec> d = div.template terms<M>(c);
        block_value = block_value + d.value;
        if (L.student_grad) {
          Vec g = d.w_student * vgrad_soft;
          if (L.hard) {
            const Vec p1 = L.unit_temperature ? c.p_s : (vs[h] - vlse1).exp_u20();
            g = at::vec::fmadd(p1, vgrad_hard, g);
          }
          out_s[h] = g;
          if (fix_s) {
            g.store(gs + j);
            block_w_s = block_w_s + d.w_student;
          }
        }
        if (L.teacher_grad) {
          out_t[h] = d.w_teacher * vgrad_soft;
          if (fix_t) {
            out_t[h].store(gt + j);
            block_w_t = block_w_t + d.w_teacher;
          }
        }
      }
      if (L.student_grad && !fix_s) {
        SS::store(grad_s + begin + i, n - i, out_s[0], out_s[1]);
      }
      if (L.teacher_grad && !fix_t) {
        ST::store(grad_t + begin + i, n - i, out_t[0], out_t[1]);
      }
    }
    value += reduce_sum(block_value);
    w_sum_s += reduce_sum(block_w_s);
    w_sum_t += reduce_sum(block_w_t);
  }

  // Sweep 3: gradient = kept - prob * sum(w) (times the row's soft scale).
  auto fix = [&](const acc_t* kept, const acc_t* e, const std::vector<acc_t>& mult,
                 double w_sum, auto* grad) {
    using Out = std::remove_pointer_t<decltype(grad)>;
    const Vec vw(static_cast<acc_t>(w_sum) * L.grad_soft);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t begin = b * kBlock, n = std::min(kBlock, cols - begin);
      const Vec vmult(mult[b]);
      for (int64_t i = 0; i < n; i += kSize) {
        const int64_t j = begin + i;
        const Vec g0 = Vec::loadu(kept + j) - Vec::loadu(e + j) * vmult * vw;
        const Vec g1 = Vec::loadu(kept + j + kWidth) - Vec::loadu(e + j + kWidth) * vmult * vw;
        Step<Out>::store(grad + j, n - i, g0, g1);
      }
    }
  };
  if (fix_s) {
    fix(gs, es, mult_s, w_sum_s, grad_s);
  }
  if (fix_t) {
    fix(gt, et, mult_t, w_sum_t, grad_t);
  }

  acc_t loss = L.soft_scale > 0 ? L.soft_scale * static_cast<acc_t>(value) : acc_t(0);
  if (L.hard) {
    loss += L.hard_weight * (lse1 - static_cast<acc_t>(s[label]));
    if (L.student_grad) {
      grad_s[label] = static_cast<scalar_s>(static_cast<acc_t>(grad_s[label]) - L.grad_hard);
    }
  }
  return loss;
}

// Short rows (image classifiers' C = 10): one vector lane per row instead of per class, so a
// group of kLanes rows needs no horizontal reductions. The group is first transposed into a
// column-major scratch of the accumulation type; lanes past the last row repeat it and their
// results are dropped.
constexpr int64_t kMaxShortCols = 32;

template <typename scalar_s, typename scalar_t, typename Div>
void short_rows(
    const scalar_s* s,
    const scalar_t* t,
    int64_t s_stride,
    int64_t t_stride,
    int64_t rows,
    int64_t cols,
    const int64_t* labels,  // of these rows, or null
    int64_t ignore_index,
    const Div& div,
    const Launch<typename Step<scalar_s>::acc_t>& L,
    typename Step<scalar_s>::acc_t* row_loss,
    scalar_s* grad_s,
    scalar_t* grad_t) {
  using acc_t = typename Step<scalar_s>::acc_t;
  using Vec = Vectorized<acc_t>;
  using M = VecMath<Vec>;
  constexpr int64_t kLanes = Vec::size();
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  alignas(64) acc_t xs[kMaxShortCols * kLanes], xt[kMaxShortCols * kLanes];
  alignas(64) acc_t es[kMaxShortCols * kLanes], et[kMaxShortCols * kLanes];
  alignas(64) acc_t valid[kLanes], label_logit[kLanes], out[kLanes];
  auto transpose_in = [&](const auto* x, int64_t stride, acc_t* to) {
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      const auto* row = x + std::min(lane, rows - 1) * stride;
      for (int64_t c = 0; c < cols; ++c) {
        to[c * kLanes + lane] = static_cast<acc_t>(row[c]);
      }
    }
  };
  transpose_in(s, s_stride, xs);
  transpose_in(t, t_stride, xt);
  int64_t lane_label[kLanes];
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    const int64_t label = labels && lane < rows ? labels[lane] : ignore_index + 1;
    const bool ok = lane < rows && (!labels || label != ignore_index);
    valid[lane] = ok ? acc_t(1) : acc_t(0);
    lane_label[lane] = ok && L.hard ? label : -1;
    label_logit[lane] = lane_label[lane] >= 0 ? xs[label * kLanes + lane] : acc_t(0);
  }
  const Vec zero(0), vinv(L.inv_temp);
  const Vec is_valid = Vec::loadu(valid) > zero;

  Vec max_s(-kInf), max_t(-kInf);
  for (int64_t c = 0; c < cols; ++c) {
    max_s = at::vec::maximum(max_s, Vec::loadu(xs + c * kLanes));
    max_t = at::vec::maximum(max_t, Vec::loadu(xt + c * kLanes));
  }
  const Vec ref_s = lane_exp_reference(max_s * vinv), ref_t = lane_exp_reference(max_t * vinv);
  const Vec ref1 = lane_exp_reference(max_s);
  const bool hard_exp = L.hard && !L.unit_temperature;
  Vec total_s(0), total_t(0), total1(0);
  for (int64_t c = 0; c < cols; ++c) {
    const Vec vs = Vec::loadu(xs + c * kLanes);
    const Vec e_s = at::vec::fmsub(vs, vinv, ref_s).exp_u20();
    const Vec e_t = at::vec::fmsub(Vec::loadu(xt + c * kLanes), vinv, ref_t).exp_u20();
    e_s.store(es + c * kLanes);
    e_t.store(et + c * kLanes);
    total_s = total_s + e_s;
    total_t = total_t + e_t;
    if (hard_exp) {
      total1 = total1 + (vs - ref1).exp_u20();
    }
  }
  // As in long_row: a student without mass keeps probabilities 0 and log-probabilities -inf; a
  // teacher without mass makes its row NaN.
  const Vec has_s = total_s > zero, has_t = total_t > zero;
  const Vec nan(std::numeric_limits<acc_t>::quiet_NaN());
  const Vec inv_s = Vec::blendv(zero, Vec(1) / total_s, has_s);
  const Vec inv_t = Vec::blendv(nan, Vec(1) / total_t, has_t);
  const Vec log_s = Vec::blendv(zero, total_s.log(), has_s);
  const Vec log_t = Vec::blendv(nan, total_t.log(), has_t);
  const Vec log_ratio = Vec::blendv(log_t - log_s, (total_t / total_s).log(), has_s & has_t);
  const Vec lse1 =
      hard_exp ? ref1 + Vec::blendv(zero, total1.log(), total1 > zero) : ref_s + log_s;
  const Vec grad_soft(L.grad_soft), grad_hard(L.grad_hard);

  // Sweep 2: the loss, the gradients of direct sides, and the sums of w of the others. The
  // transposed logits are overwritten with the gradients, column by column.
  Vec value(0), w_sum_s(0), w_sum_t(0);
  for (int64_t c = 0; c < cols; ++c) {
    acc_t* ps = xs + c * kLanes;
    acc_t* pt = xt + c * kLanes;
    const Vec vs = Vec::loadu(ps);
    const Vec a_s = at::vec::fmsub(vs, vinv, ref_s);
    const Vec a_t = at::vec::fmsub(Vec::loadu(pt), vinv, ref_t);
    const ClassTerms<Vec> ct{
        Vec::loadu(et + c * kLanes) * inv_t, Vec::loadu(es + c * kLanes) * inv_s, a_t - log_t,
        a_s - log_s, (a_t - a_s) - log_ratio};
    const DivergenceTerms<Vec> d = div.template terms<M>(ct);
    value = value + d.value;
    w_sum_s = w_sum_s + d.w_student;
    w_sum_t = w_sum_t + d.w_teacher;
    if (L.student_grad) {
      Vec g = d.w_student * grad_soft;  // finished in sweep 3
      if (L.hard) {
        const Vec p1 = hard_exp ? (vs - lse1).exp_u20() : ct.p_s;
        g = at::vec::fmadd(p1, grad_hard, g);
      }
      g.store(ps);
    }
    if (L.teacher_grad) {
      (d.w_teacher * grad_soft).store(pt);
    }
  }
  // Sweep 3 for sides that are not direct, and zero gradients in masked lanes.
  for (int64_t c = 0; c < cols; ++c) {
    acc_t* ps = xs + c * kLanes;
    acc_t* pt = xt + c * kLanes;
    if (L.student_grad) {
      Vec g = Vec::loadu(ps);
      if (!Div::kStudentDirect) {
        g = g - Vec::loadu(es + c * kLanes) * inv_s * w_sum_s * grad_soft;
      }
      Vec::blendv(zero, g, is_valid).store(ps);
    }
    if (L.teacher_grad) {
      Vec g = Vec::loadu(pt);
      if (!Div::kTeacherDirect) {
        g = g - Vec::loadu(et + c * kLanes) * inv_t * w_sum_t * grad_soft;
      }
      Vec::blendv(zero, g, is_valid).store(pt);
    }
  }

  Vec loss = L.soft_scale > 0 ? value * Vec(L.soft_scale) : zero;
  if (L.hard) {
    loss = at::vec::fmadd(lse1 - Vec::loadu(label_logit), Vec(L.hard_weight), loss);
  }
  Vec::blendv(zero, loss, is_valid).store(out);
  for (int64_t lane = 0; lane < rows; ++lane) {
    row_loss[lane] = out[lane];
    if (L.student_grad && lane_label[lane] >= 0) {
      xs[lane_label[lane] * kLanes + lane] -= L.grad_hard;
    }
  }
  auto transpose_out = [&](const acc_t* from, auto* x) {
    for (int64_t lane = 0; lane < rows; ++lane) {
      for (int64_t c = 0; c < cols; ++c) {
        x[lane * cols + c] = static_cast<std::remove_pointer_t<decltype(x)>>(from[c * kLanes + lane]);
      }
    }
  };
  if (L.student_grad) {
    transpose_out(xs, grad_s);
  }
  if (L.teacher_grad) {
    transpose_out(xt, grad_t);
  }
}

template <typename scalar_s, typename scalar_t, typename Div>
void run(const KdKernelArgs& a, const Div& div) {
  using acc_t = typename Step<scalar_s>::acc_t;
  const auto* s = static_cast<const scalar_s*>(a.student);
  const auto* t = static_cast<const scalar_t*>(a.teacher);
  auto* grad_s = static_cast<scalar_s*>(a.grad_student);
  auto* grad_t = static_cast<scalar_t*>(a.grad_teacher);
  auto* row_loss = static_cast<acc_t*>(a.row_loss);
  const Launch<acc_t> L{
      static_cast<acc_t>(1.0 / a.temperature),
      static_cast<acc_t>(a.soft_weight * a.temperature * a.temperature),
      static_cast<acc_t>(a.soft_weight * a.temperature * a.inv_denominator),
      static_cast<acc_t>(a.hard_weight * a.inv_denominator),
      static_cast<acc_t>(a.hard_weight),
      a.hard_weight > 0,
      a.temperature == 1.0,
      grad_s != nullptr,
      grad_t != nullptr};

  if (a.cols == 1) {
    // One class: both softmaxes are exactly 1, so every divergence and the cross-entropy are 0
    // (NaN for a NaN or infinite logit, as the formulas give), and so are the gradients.
    at::parallel_for(0, a.rows, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const bool valid = !a.labels || a.labels[r] != a.ignore_index;
        const acc_t x = static_cast<acc_t>(s[r * a.student_stride]);
        const acc_t y = static_cast<acc_t>(t[r * a.teacher_stride]);
        const acc_t zero = (x - x) + (y - y);
        row_loss[r] = valid ? zero : acc_t(0);
        if (grad_s) {
          grad_s[r] = static_cast<scalar_s>(valid ? (x - x) * 0 : acc_t(0));
        }
        if (grad_t) {
          grad_t[r] = static_cast<scalar_t>(valid ? (y - y) * 0 : acc_t(0));
        }
      }
    });
    return;
  }
  if (a.cols <= kMaxShortCols) {
    constexpr int64_t kLanes = Vectorized<acc_t>::size();
    const int64_t groups = (a.rows + kLanes - 1) / kLanes;
    at::parallel_for(0, groups, grain_rows(a.cols * kLanes), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin * kLanes; r < std::min(end * kLanes, a.rows); r += kLanes) {
        short_rows<scalar_s, scalar_t>(
            s + r * a.student_stride, t + r * a.teacher_stride, a.student_stride,
            a.teacher_stride, std::min(kLanes, a.rows - r), a.cols,
            a.labels ? a.labels + r : nullptr, a.ignore_index, div, L, row_loss + r,
            grad_s ? grad_s + r * a.cols : nullptr, grad_t ? grad_t + r * a.cols : nullptr);
      }
    });
    return;
  }
  at::parallel_for(0, a.rows, grain_rows(a.cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_s* gs = grad_s ? grad_s + r * a.cols : nullptr;
      scalar_t* gt = grad_t ? grad_t + r * a.cols : nullptr;
      if (a.labels && a.labels[r] == a.ignore_index) {
        row_loss[r] = 0;
        if (gs) {
          std::memset(static_cast<void*>(gs), 0, a.cols * sizeof(scalar_s));
        }
        if (gt) {
          std::memset(static_cast<void*>(gt), 0, a.cols * sizeof(scalar_t));
        }
        continue;
      }
      row_loss[r] = long_row<scalar_s, scalar_t>(
          s + r * a.student_stride, t + r * a.teacher_stride, a.cols,
          a.labels ? a.labels[r] : 0, div, L, gs, gt);
    }
  });
}

}  // namespace

void kd_loss_rows(const KdKernelArgs& args) {
  auto with_dtypes = [&](auto student, auto teacher) {
    using scalar_s = decltype(student);
    using scalar_t = decltype(teacher);
    using acc_t = typename Step<scalar_s>::acc_t;
    dispatch_divergence<acc_t>(
        args.beta, [&](const auto& div) { run<scalar_s, scalar_t>(args, div); });
  };
  dispatch_dtype_pair(args.student_dtype, args.teacher_dtype, "kd_loss", with_dtypes);
}

}  // namespace CPU_CAPABILITY
}  // namespace pykd::cpu
