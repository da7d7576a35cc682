// The CPU KD-loss kernels. Included once per CPU capability (kd_loss_default.cpp,
// kd_loss_avx2.cpp), each defining CPU_CAPABILITY, so that at::vec::Vectorized compiles to that
// instruction set in its own namespace.
//
// Work per element: forward reads s and t once from memory (a row is walked in L1-sized blocks:
// block maxima first, then two exponentials per element against the running maxima), backward
// reads them once more and takes two exponentials to write the gradient(s).
#include "cpu/kd_loss_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace pykd::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Logits are handled in steps of two accumulation-type vectors. Lanes past the end of a row read
// as -inf, which carries no probability mass in either softmax.
template <typename scalar_t, typename = void>
struct Step {
  using acc_t = scalar_t;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kWidth = Vec::size();
  static constexpr int64_t kSize = 2 * kWidth;

  static void load(const scalar_t* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kWidth);
  }
  static void load_partial(const scalar_t* p, int64_t n, Vec& a, Vec& b) {
    const int64_t na = std::min(n, kWidth);
    a = Vec::loadu(p, na);
    b = n > na ? Vec::loadu(p + kWidth, n - na) : Vec(0);
    mask_tail(n, a, b);
  }
  static void store(scalar_t* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + kWidth);
  }
  static void store_partial(scalar_t* p, int64_t n, const Vec& a, const Vec& b) {
    const int64_t na = std::min(n, kWidth);
    a.store(p, na);
    if (n > na) {
      b.store(p + kWidth, n - na);
    }
  }
  static void mask_tail(int64_t n, Vec& a, Vec& b) {
    const Vec neg_inf(-std::numeric_limits<acc_t>::infinity());
    a = Vec::set(neg_inf, a, std::min(n, kWidth));
    b = Vec::set(neg_inf, b, std::max<int64_t>(n - kWidth, 0));
  }
};

// bfloat16 / float16: one 16-bit vector holds exactly two float vectors.
template <typename scalar_t>
struct Step<
    scalar_t,
    std::enable_if_t<std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>>> {
  using acc_t = float;
  using Vec = Vectorized<float>;
  using Raw = Vectorized<scalar_t>;
  static constexpr int64_t kWidth = Vec::size();
  static constexpr int64_t kSize = Raw::size();
  static_assert(kSize == 2 * kWidth, "a 16-bit vector must convert to two float vectors");

  static void load(const scalar_t* p, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<scalar_t>(Raw::loadu(p));
  }
  static void load_partial(const scalar_t* p, int64_t n, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<scalar_t>(Raw::loadu(p, n));
    Step<float>::mask_tail(n, a, b);
  }
  static void store(scalar_t* p, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
  static void store_partial(scalar_t* p, int64_t n, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<scalar_t>(a, b).store(p, n);
  }
};

// Calls body(s_vec, t_vec) on every vector of a pair of rows of length n (a partial last step
// padded with -inf).
template <typename S, typename scalar_t, typename Body>
inline void for_each_vec(const scalar_t* s, const scalar_t* t, int64_t n, const Body& body) {
  using Vec = typename S::Vec;
  Vec s0, s1, t0, t1;
  int64_t i = 0;
  for (; i + S::kSize <= n; i += S::kSize) {
    S::load(s + i, s0, s1);
    S::load(t + i, t0, t1);
    body(s0, t0);
    body(s1, t1);
  }
  if (i < n) {
    S::load_partial(s + i, n - i, s0, s1);
    S::load_partial(t + i, n - i, t0, t1);
    body(s0, t0);
    body(s1, t1);
  }
}

template <typename acc_t>
inline acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || std::isnan(a)) ? a : b;
}

template <typename acc_t>
inline acc_t reduce_max(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& x, Vectorized<acc_t>& y) { return at::vec::maximum(x, y); }, v);
}

template <typename acc_t>
inline acc_t reduce_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& x, Vectorized<acc_t>& y) { return x + y; }, v);
}

// Exponentials are taken relative to the running maximum, or to 0 while every logit seen is -inf
// (so that -inf - ref is -inf, never NaN). NaN and +inf pass through and poison the row.
template <typename acc_t>
inline acc_t exp_reference(acc_t running_max) {
  return running_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : running_max;
}

// Long rows are walked in blocks that stay in L1 between the max pass and the exp pass.
constexpr int64_t kBlock = 2048;

// One row: KL(p_t || p_s) and the two log-sum-exps, in a single read of each row from memory.
//   es = exp(s/T - ref_s), et = exp(t/T - ref_t)
//   KL = sum(et * ((t - s)/T - (ref_t - ref_s))) / sum(et) + log(sum(es) / sum(et))
// which avoids the cancellation of lse_t - lse_s when the logits are large.
template <typename scalar_t>
void forward_row(
    const scalar_t* s,
    const scalar_t* t,
    int64_t cols,
    typename Step<scalar_t>::acc_t inv_temp,
    typename Step<scalar_t>::acc_t* kl,
    typename Step<scalar_t>::acc_t* lse_s,
    typename Step<scalar_t>::acc_t* lse_t) {
  using S = Step<scalar_t>;
  using Vec = typename S::Vec;
  using acc_t = typename S::acc_t;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const Vec zero(0), vinv(inv_temp);

  acc_t max_s = -kInf, max_t = -kInf, ref_s = 0, ref_t = 0;
  Vec sum_s(0), sum_t(0), cross(0);  // cross = sum(et * log(p_t / p_s)) up to a row constant
  for (int64_t begin = 0; begin < cols; begin += kBlock) {
    const int64_t n = std::min(kBlock, cols - begin);
    Vec block_max_s(-kInf), block_max_t(-kInf);
    for_each_vec<S>(s + begin, t + begin, n, [&](const Vec& vs, const Vec& vt) {
      block_max_s = at::vec::maximum(block_max_s, vs);
      block_max_t = at::vec::maximum(block_max_t, vt);
    });
    // Accumulators that have seen only -inf are 0 and need no rescaling; skipping them also keeps
    // exp(-shift) from overflowing (0 * inf = NaN) when the first finite maximum is below -88.
    const bool empty_s = max_s == -kInf, empty_t = max_t == -kInf;
    max_s = nan_max(max_s, reduce_max(block_max_s) * inv_temp);
    max_t = nan_max(max_t, reduce_max(block_max_t) * inv_temp);

    // Move the accumulators to the new references (a no-op for rows that fit in one block).
    const acc_t new_ref_t = exp_reference(max_t);
    if (new_ref_t != ref_t && !empty_t) {
      const acc_t shift = new_ref_t - ref_t;
      const Vec rescale(std::exp(-shift));
      // A cross of +inf (a class the teacher gives mass and the student none) stays +inf even
      // where rescale underflows to 0.
      const Vec inf(kInf);
      cross = Vec::blendv((cross - sum_t * Vec(shift)) * rescale, inf, cross == inf);
      sum_t = sum_t * rescale;
    }
    ref_t = new_ref_t;
    const acc_t new_ref_s = exp_reference(max_s);
    if (new_ref_s != ref_s && !empty_s) {
      const acc_t shift = new_ref_s - ref_s;
      cross = cross + sum_t * Vec(shift);
      sum_s = sum_s * Vec(std::exp(-shift));
    }
    ref_s = new_ref_s;

    const Vec vref_s(ref_s), vref_t(ref_t), vref_diff(ref_t - ref_s);
    for_each_vec<S>(s + begin, t + begin, n, [&](const Vec& vs, const Vec& vt) {
      const Vec es = at::vec::fmsub(vs, vinv, vref_s).exp_u20();
      const Vec et = at::vec::fmsub(vt, vinv, vref_t).exp_u20();
      sum_s = sum_s + es;
      sum_t = sum_t + et;
      // yt - ys from t - s, which is exact for close logits however large they are.
      const Vec log_ratio = at::vec::fmsub(vt - vs, vinv, vref_diff);
      // 0 * log 0 = 0: a class the teacher gives no mass adds nothing, whatever the student says.
      cross = cross + Vec::blendv(zero, et * log_ratio, et > zero);
    });
  }
  const acc_t total_s = reduce_sum(sum_s), total_t = reduce_sum(sum_t);
  *lse_s = ref_s + std::log(total_s);
  *lse_t = ref_t + std::log(total_t);
  // A student that gives no mass anywhere the teacher does: KL = +inf (not inf - inf).
  *kl = (total_s == 0 && total_t > 0)
      ? kInf
      : reduce_sum(cross) / total_t + std::log(total_s / total_t);
}

// One row of gradients of grad * KL:
//   d/ds = grad/T * (p_s - p_t),   d/dt = grad/T * p_t * (log p_t - log p_s - KL)
template <typename scalar_t, bool kStudent, bool kTeacher>
void backward_row(
    const scalar_t* s,
    const scalar_t* t,
    int64_t cols,
    typename Step<scalar_t>::acc_t inv_temp,
    typename Step<scalar_t>::acc_t lse_s,
    typename Step<scalar_t>::acc_t lse_t,
    typename Step<scalar_t>::acc_t kl,
    typename Step<scalar_t>::acc_t grad,
    scalar_t* grad_s,
    scalar_t* grad_t) {
  using S = Step<scalar_t>;
  using Vec = typename S::Vec;
  const Vec zero(0), vinv(inv_temp), vlse_s(lse_s), vlse_t(lse_t), vkl(kl),
      vscale(grad * inv_temp);
  auto gradients = [&](const Vec& vs, const Vec& vt, Vec& ds, Vec& dt) {
    const Vec log_ps = at::vec::fmsub(vs, vinv, vlse_s);
    const Vec log_pt = at::vec::fmsub(vt, vinv, vlse_t);
    const Vec pt = log_pt.exp_u20();
    if constexpr (kStudent) {
      ds = (log_ps.exp_u20() - pt) * vscale;
    }
    if constexpr (kTeacher) {
      dt = Vec::blendv(zero, pt * (log_pt - log_ps - vkl) * vscale, pt > zero);
    }
  };
  Vec s0, s1, t0, t1, ds0, ds1, dt0, dt1;
  int64_t i = 0;
  for (; i + S::kSize <= cols; i += S::kSize) {
    S::load(s + i, s0, s1);
    S::load(t + i, t0, t1);
    gradients(s0, t0, ds0, dt0);
    gradients(s1, t1, ds1, dt1);
    if constexpr (kStudent) {
      S::store(grad_s + i, ds0, ds1);
    }
    if constexpr (kTeacher) {
      S::store(grad_t + i, dt0, dt1);
    }
  }
  if (i < cols) {
    const int64_t n = cols - i;
    S::load_partial(s + i, n, s0, s1);
    S::load_partial(t + i, n, t0, t1);
    gradients(s0, t0, ds0, dt0);
    gradients(s1, t1, ds1, dt1);
    if constexpr (kStudent) {
      S::store_partial(grad_s + i, n, ds0, ds1);
    }
    if constexpr (kTeacher) {
      S::store_partial(grad_t + i, n, dt0, dt1);
    }
  }
}

// Short rows (image classifiers' C = 10): one vector lane per row instead of per class, so a
// group of kLanes rows needs no horizontal reductions. The group is first transposed into a
// column-major scratch of the accumulation type; lanes past the last row repeat it and their
// results are dropped.
constexpr int64_t kMaxShortCols = 32;

template <typename scalar_t>
struct ShortRows {
  using acc_t = typename Step<scalar_t>::acc_t;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kLanes = Vec::size();
  static constexpr int64_t kScratch = kMaxShortCols * kLanes;

  static void transpose_in(
      const scalar_t* x, int64_t stride, int64_t rows, int64_t cols, acc_t* out) {
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      const scalar_t* row = x + std::min(lane, rows - 1) * stride;
      for (int64_t c = 0; c < cols; ++c) {
        out[c * kLanes + lane] = static_cast<acc_t>(row[c]);
      }
    }
  }
  static void transpose_out(const acc_t* in, int64_t rows, int64_t cols, scalar_t* x) {
    for (int64_t lane = 0; lane < rows; ++lane) {
      for (int64_t c = 0; c < cols; ++c) {
        x[lane * cols + c] = static_cast<scalar_t>(in[c * kLanes + lane]);
      }
    }
  }
  // Lane-wise version of exp_reference: the maximum, or 0 where it is -inf.
  static Vec exp_reference(const Vec& scaled_max) {
    const Vec neg_inf(-std::numeric_limits<acc_t>::infinity());
    return Vec::blendv(scaled_max, Vec(0), scaled_max == neg_inf);
  }
};

// The forward of forward_row, for up to kLanes rows of at most kMaxShortCols classes.
template <typename scalar_t>
void forward_short_rows(
    const scalar_t* s,
    const scalar_t* t,
    int64_t s_stride,
    int64_t t_stride,
    int64_t rows,
    int64_t cols,
    typename Step<scalar_t>::acc_t inv_temp,
    typename Step<scalar_t>::acc_t* kl,
    typename Step<scalar_t>::acc_t* lse_s,
    typename Step<scalar_t>::acc_t* lse_t) {
  using G = ShortRows<scalar_t>;
  using Vec = typename G::Vec;
  using acc_t = typename G::acc_t;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  alignas(64) acc_t xs[G::kScratch], xt[G::kScratch];
  G::transpose_in(s, s_stride, rows, cols, xs);
  G::transpose_in(t, t_stride, rows, cols, xt);

  Vec max_s(-kInf), max_t(-kInf);
  for (int64_t c = 0; c < cols; ++c) {
    max_s = at::vec::maximum(max_s, Vec::loadu(xs + c * G::kLanes));
    max_t = at::vec::maximum(max_t, Vec::loadu(xt + c * G::kLanes));
  }
  const Vec zero(0), vinv(inv_temp);
  const Vec ref_s = G::exp_reference(max_s * vinv), ref_t = G::exp_reference(max_t * vinv);
  const Vec ref_diff = ref_t - ref_s;
  Vec sum_s(0), sum_t(0), cross(0);
  for (int64_t c = 0; c < cols; ++c) {
    const Vec vs = Vec::loadu(xs + c * G::kLanes), vt = Vec::loadu(xt + c * G::kLanes);
    const Vec es = at::vec::fmsub(vs, vinv, ref_s).exp_u20();
    const Vec et = at::vec::fmsub(vt, vinv, ref_t).exp_u20();
    sum_s = sum_s + es;
    sum_t = sum_t + et;
    cross = cross + Vec::blendv(zero, et * at::vec::fmsub(vt - vs, vinv, ref_diff), et > zero);
  }
  (ref_s + sum_s.log()).store(lse_s, rows);
  (ref_t + sum_t.log()).store(lse_t, rows);
  const Vec no_student_mass = (sum_s == zero) & (sum_t > zero);
  Vec::blendv(cross / sum_t + (sum_s / sum_t).log(), Vec(kInf), no_student_mass).store(kl, rows);
}

// The backward of backward_row, for up to kLanes rows of at most kMaxShortCols classes.
template <typename scalar_t, bool kStudent, bool kTeacher>
void backward_short_rows(
    const scalar_t* s,
    const scalar_t* t,
    int64_t s_stride,
    int64_t t_stride,
    int64_t rows,
    int64_t cols,
    typename Step<scalar_t>::acc_t inv_temp,
    const typename Step<scalar_t>::acc_t* lse_s,
    const typename Step<scalar_t>::acc_t* lse_t,
    const typename Step<scalar_t>::acc_t* kl,
    const typename Step<scalar_t>::acc_t* grad,
    int64_t grad_stride,
    scalar_t* grad_s,
    scalar_t* grad_t) {
  using G = ShortRows<scalar_t>;
  using Vec = typename G::Vec;
  using acc_t = typename G::acc_t;
  alignas(64) acc_t xs[G::kScratch], xt[G::kScratch], scale[G::kLanes];
  G::transpose_in(s, s_stride, rows, cols, xs);
  G::transpose_in(t, t_stride, rows, cols, xt);
  for (int64_t lane = 0; lane < G::kLanes; ++lane) {
    scale[lane] = grad[std::min(lane, rows - 1) * grad_stride] * inv_temp;
  }
  const Vec zero(0), vinv(inv_temp), vscale = Vec::loadu(scale);
  const Vec vlse_s = Vec::loadu(lse_s, rows), vlse_t = Vec::loadu(lse_t, rows);
  const Vec vkl = Vec::loadu(kl, rows);
  for (int64_t c = 0; c < cols; ++c) {
    acc_t* ps = xs + c * G::kLanes;
    acc_t* pt = xt + c * G::kLanes;
    const Vec log_ps = at::vec::fmsub(Vec::loadu(ps), vinv, vlse_s);
    const Vec log_pt = at::vec::fmsub(Vec::loadu(pt), vinv, vlse_t);
    const Vec prob_t = log_pt.exp_u20();
    // The scratch is overwritten with the gradients, column by column.
    if constexpr (kStudent) {
      ((log_ps.exp_u20() - prob_t) * vscale).store(ps);
    }
    if constexpr (kTeacher) {
      Vec::blendv(zero, prob_t * (log_pt - log_ps - vkl) * vscale, prob_t > zero).store(pt);
    }
  }
  if constexpr (kStudent) {
    G::transpose_out(xs, rows, cols, grad_s);
  }
  if constexpr (kTeacher) {
    G::transpose_out(xt, rows, cols, grad_t);
  }
}

// Rows per parallel task: enough elements that a task outweighs its scheduling.
inline int64_t grain_rows(int64_t cols) {
  return std::max<int64_t>(1, 32768 / cols);
}

template <typename scalar_t>
void forward_impl(const KdForwardArgs& a) {
  using acc_t = typename Step<scalar_t>::acc_t;
  const auto* s = static_cast<const scalar_t*>(a.student);
  const auto* t = static_cast<const scalar_t*>(a.teacher);
  auto* kl = static_cast<acc_t*>(a.kl);
  auto* lse_s = static_cast<acc_t*>(a.student_lse);
  auto* lse_t = static_cast<acc_t*>(a.teacher_lse);
  const auto inv_temp = static_cast<acc_t>(a.inv_temperature);
  if (a.cols <= kMaxShortCols) {
    constexpr int64_t kLanes = ShortRows<scalar_t>::kLanes;
    const int64_t groups = (a.rows + kLanes - 1) / kLanes;
    at::parallel_for(0, groups, grain_rows(a.cols) / kLanes, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin * kLanes; r < std::min(end * kLanes, a.rows); r += kLanes) {
        forward_short_rows<scalar_t>(
            s + r * a.student_stride, t + r * a.teacher_stride, a.student_stride,
            a.teacher_stride, std::min(kLanes, a.rows - r), a.cols, inv_temp, kl + r, lse_s + r,
            lse_t + r);
      }
    });
    return;
  }
  at::parallel_for(0, a.rows, grain_rows(a.cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      forward_row<scalar_t>(
          s + r * a.student_stride, t + r * a.teacher_stride, a.cols, inv_temp, kl + r,
          lse_s + r, lse_t + r);
    }
  });
}

template <typename scalar_t, bool kStudent, bool kTeacher>
void backward_impl(const KdBackwardArgs& a) {
  using acc_t = typename Step<scalar_t>::acc_t;
  const KdForwardArgs& f = a.fwd;
  const auto* s = static_cast<const scalar_t*>(f.student);
  const auto* t = static_cast<const scalar_t*>(f.teacher);
  const auto* kl = static_cast<const acc_t*>(f.kl);
  const auto* lse_s = static_cast<const acc_t*>(f.student_lse);
  const auto* lse_t = static_cast<const acc_t*>(f.teacher_lse);
  const auto* grad = static_cast<const acc_t*>(a.grad_kl);
  auto* grad_s = static_cast<scalar_t*>(a.grad_student);
  auto* grad_t = static_cast<scalar_t*>(a.grad_teacher);
  const auto inv_temp = static_cast<acc_t>(f.inv_temperature);
  if (f.cols <= kMaxShortCols) {
    constexpr int64_t kLanes = ShortRows<scalar_t>::kLanes;
    const int64_t groups = (f.rows + kLanes - 1) / kLanes;
    at::parallel_for(0, groups, grain_rows(f.cols) / kLanes, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin * kLanes; r < std::min(end * kLanes, f.rows); r += kLanes) {
        backward_short_rows<scalar_t, kStudent, kTeacher>(
            s + r * f.student_stride, t + r * f.teacher_stride, f.student_stride,
            f.teacher_stride, std::min(kLanes, f.rows - r), f.cols, inv_temp, lse_s + r,
            lse_t + r, kl + r, grad + r * a.grad_stride, a.grad_stride, grad_s + r * f.cols,
            grad_t + r * f.cols);
      }
    });
    return;
  }
  at::parallel_for(0, f.rows, grain_rows(f.cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      backward_row<scalar_t, kStudent, kTeacher>(
          s + r * f.student_stride, t + r * f.teacher_stride, f.cols, inv_temp, lse_s[r],
          lse_t[r], kl[r], grad[r * a.grad_stride], grad_s + r * f.cols, grad_t + r * f.cols);
    }
  });
}

}  // namespace

void kd_forward(const KdForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, args.dtype, "kd_loss_fwd", [&] { forward_impl<scalar_t>(args); });
}

void kd_backward(const KdBackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.fwd.dtype, "kd_loss_bwd", [&] {
    if (args.grad_student && args.grad_teacher) {
      backward_impl<scalar_t, true, true>(args);
    } else if (args.grad_student) {
      backward_impl<scalar_t, true, false>(args);
    } else if (args.grad_teacher) {
      backward_impl<scalar_t, false, true>(args);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace pykd::cpu
