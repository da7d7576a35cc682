// The CPU hint-loss kernel. Included once per CPU capability (hint_loss_default.cpp,
// hint_loss_avx2.cpp), each defining CPU_CAPABILITY, so that at::vec::Vectorized compiles to that
// instruction set in its own namespace. The loss is bound by memory bandwidth for float32, but
// converting bfloat16 / float16 one element at a time (all that portable x86-64 code can do) is
// slower than memory: the AVX2 build converts 8 elements per instruction.
#include "cpu/hint_loss_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <tuple>
#include <type_traits>

namespace pykd::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Elements are handled in steps of two accumulation-type vectors (one 16-bit vector converts to
// exactly two float vectors); the last partial step of a chunk is plain scalar code.
template <typename scalar_t>
struct Step {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr bool kReduced = at::is_reduced_floating_point_v<scalar_t>;
  static constexpr int64_t kSize = 2 * Vec::size();
  static_assert(!kReduced || Vectorized<scalar_t>::size() == kSize);

  static void load(const scalar_t* p, Vec& a, Vec& b) {
    if constexpr (kReduced) {
      std::tie(a, b) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    } else {
      a = Vec::loadu(p);
      b = Vec::loadu(p + Vec::size());
    }
  }
  static void store(scalar_t* p, const Vec& a, const Vec& b) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(a, b).store(p);
    } else {
      a.store(p);
      b.store(p + Vec::size());
    }
  }
};

// sum((s - t)^2) over n elements and, in the same pass, the gradients that are asked for:
// grad_s = scale * (s - t), grad_t = -grad_s. With neither, the forward-only kernel. The sum is
// the same, in the same order, whichever gradients are written.
template <typename scalar_t, bool kStudent, bool kTeacher>
double sum_squares_and_grads(
    const scalar_t* s, const scalar_t* t, int64_t n, double scale, scalar_t* grad_s,
    scalar_t* grad_t) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using Vec = typename S::Vec;
  // -(scale * d) == (-scale) * d exactly: rounding is symmetric.
  const acc_t scale_s = static_cast<acc_t>(scale), scale_t = -scale_s;
  const Vec vscale_s(scale_s), vscale_t(scale_t);
  Vec sum0(0), sum1(0), s0, s1, t0, t1;
  int64_t i = 0;
  for (; i + S::kSize <= n; i += S::kSize) {
    S::load(s + i, s0, s1);
    S::load(t + i, t0, t1);
    const Vec d0 = s0 - t0, d1 = s1 - t1;
    sum0 = at::vec::fmadd(d0, d0, sum0);
    sum1 = at::vec::fmadd(d1, d1, sum1);
    if constexpr (kStudent) {
      S::store(grad_s + i, d0 * vscale_s, d1 * vscale_s);
    }
    if constexpr (kTeacher) {
      S::store(grad_t + i, d0 * vscale_t, d1 * vscale_t);
    }
  }
  acc_t sum = at::vec::vec_reduce_all<acc_t>(
      [](Vec& x, Vec& y) { return x + y; }, sum0 + sum1);
  for (; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(s[i]) - static_cast<acc_t>(t[i]);
    sum += d * d;
    if constexpr (kStudent) {
      grad_s[i] = static_cast<scalar_t>(d * scale_s);
    }
    if constexpr (kTeacher) {
      grad_t[i] = static_cast<scalar_t>(d * scale_t);
    }
  }
  return sum;
}

}  // namespace

double hint_chunk(
    c10::ScalarType dtype, const void* s, const void* t, int64_t n, double scale, void* grad_s,
    void* grad_t) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "hint_loss", [&] {
    const auto* ps = static_cast<const scalar_t*>(s);
    const auto* pt = static_cast<const scalar_t*>(t);
    auto* gs = static_cast<scalar_t*>(grad_s);
    auto* gt = static_cast<scalar_t*>(grad_t);
    if (gs && gt) {
      return sum_squares_and_grads<scalar_t, true, true>(ps, pt, n, scale, gs, gt);
    }
    if (gs) {
      return sum_squares_and_grads<scalar_t, true, false>(ps, pt, n, scale, gs, gt);
    }
    if (gt) {
      return sum_squares_and_grads<scalar_t, false, true>(ps, pt, n, scale, gs, gt);
    }
    return sum_squares_and_grads<scalar_t, false, false>(ps, pt, n, scale, gs, gt);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace pykd::cpu
