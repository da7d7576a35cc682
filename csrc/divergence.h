// The math of every divergence of the KD-loss family, written once for both backends.
//
// The CPU kernels instantiate it with M = a math policy over at::vec::Vectorized (one lane per
// class, or one lane per row for short rows); the CUDA kernels with a policy over float/double
// (one thread's element). A policy M provides:
//   using V = ...;                           the arithmetic type
//   static V unless_zero(V x, V value);      0 where x == 0, else value (0 * log 0 = 0; a NaN
//                                            probability stays NaN)
//   static V log(V x);
//   static V max(V a, V b);                  NaN where either is NaN
// and V supports + - * with V and construction from a scalar.
//
// Conventions (SPEC section 1): x' = x / T; p_t = softmax(t'), p_s = softmax(s'). For each class
// a divergence returns its term of the row's divergence and, per side, a vector w whose softmax
// backward is that side's gradient:
//     d div / d x'_j = w_j - prob_j * sum_k w_k            (prob = p_s for the student, p_t for
//                                                           the teacher)
// A side marked "direct" gives w with sum_k w_k = 0 exactly in exact arithmetic, so its gradient
// is w itself and needs no second look at the row. The driver multiplies by T (d x'/d x = 1/T,
// times the T^2 of the loss) and by the row's weight (soft_weight / D, 0 for a masked row).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define PYKD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PYKD_HOST_DEVICE inline
#endif

namespace pykd {

// What a divergence is given for one class (or one vector of classes).
template <typename V>
struct ClassTerms {
  V p_t, p_s;          // the two probabilities
  V log_p_t, log_p_s;  // their logarithms (-inf where the probability is 0)
  V log_ratio;         // log p_t - log p_s, taken from t - s (see the drivers)
};

// What it gives back.
template <typename V>
struct DivergenceTerms {
  V value;      // this class's term of the row's divergence
  V w_student;  // see the header comment
  V w_teacher;
};

// beta = 0: KL(p_t || p_s), Hinton's loss.
struct ForwardKL {
  static constexpr bool kStudentDirect = true;   // d/ds' = p_s - p_t
  static constexpr bool kTeacherDirect = false;  // d/dt' = p_t * (log_ratio - KL)
  template <typename M, typename V>
  PYKD_HOST_DEVICE DivergenceTerms<V> terms(const ClassTerms<V>& c) const {
    const V value = M::unless_zero(c.p_t, c.p_t * c.log_ratio);
    return {value, c.p_s - c.p_t, value};
  }
};

// beta = 1: KL(p_s || p_t).
struct ReverseKL {
  static constexpr bool kStudentDirect = false;  // d/ds' = p_s * (-log_ratio - KL)
  static constexpr bool kTeacherDirect = true;   // d/dt' = p_t - p_s
  template <typename M, typename V>
  PYKD_HOST_DEVICE DivergenceTerms<V> terms(const ClassTerms<V>& c) const {
    const V value = M::unless_zero(c.p_s, V(0) - c.p_s * c.log_ratio);
    return {value, value, c.p_t - c.p_s};
  }
};

// 0 < beta < 1: the generalized Jensen-Shannon divergence
//   beta * KL(p_t || m) + (1 - beta) * KL(p_s || m),   m = beta * p_t + (1 - beta) * p_s,
// whose side gradients are beta * p_t * (log(p_t/m) - KL(p_t||m)) and the same for the student
// with 1 - beta.
template <typename acc_t>
struct JensenShannon {
  static constexpr bool kStudentDirect = false;
  static constexpr bool kTeacherDirect = false;
  acc_t beta, log_beta, log_one_minus_beta;
  explicit JensenShannon(acc_t beta_)
      : beta(beta_), log_beta(std::log(beta_)), log_one_minus_beta(std::log1p(-beta_)) {}
  template <typename M, typename V>
  PYKD_HOST_DEVICE DivergenceTerms<V> terms(const ClassTerms<V>& c) const {
    const V b(beta), one_minus_b(acc_t(1) - beta);
    // log m is at least log(beta p_t) and log((1 - beta) p_s): taken from the log-probabilities,
    // those bounds stay finite where m itself underflows (a tiny p_t or p_s whose share of m
    // rounds to 0), which would otherwise give an infinite term and a NaN gradient.
    const V log_m = M::max(M::log(b * c.p_t + one_minus_b * c.p_s),
                           M::max(V(log_beta) + c.log_p_t, V(log_one_minus_beta) + c.log_p_s));
    const V teacher = M::unless_zero(c.p_t, b * c.p_t * (c.log_p_t - log_m));
    const V student = M::unless_zero(c.p_s, one_minus_b * c.p_s * (c.log_p_s - log_m));
    return {teacher + student, student, teacher};
  }
};

// Calls f(divergence) with the divergence that beta selects (beta in [0, 1], checked by the op).
template <typename acc_t, typename F>
decltype(auto) dispatch_divergence(double beta, const F& f) {
  if (beta == 0) {
    return f(ForwardKL{});
  }
  if (beta == 1) {
    return f(ReverseKL{});
  }
  return f(JensenShannon<acc_t>(static_cast<acc_t>(beta)));
}

}  // namespace pykd
