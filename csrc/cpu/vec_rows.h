// What the CPU row kernels (kd_loss_kernel.h, multi_teacher_kd_loss_kernel.h,
// sparse_kd_loss_kernel.h) share: loading logits in vector steps, reductions, the references of
// exponentials, how a row's blocks combine, the rows per task and the dtype dispatch. Included
// by those kernel headers, so like them once per CPU capability (CPU_CAPABILITY defined by the
// including .cpp); the anonymous namespace gives each translation unit its own copy, compiled
// for its instruction set.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace pykd::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Logits are loaded in steps of two accumulation-type vectors (kSize elements, the same for
// float16, bfloat16 and float32, so that a student and teachers of different dtypes step
// together). Lanes past the end of a row read as -inf, which carries no mass in a softmax.
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
  static void store(scalar_t* p, int64_t n, const Vec& a, const Vec& b) {
    if (n >= kSize) {
      a.store(p);
      b.store(p + kWidth);
      return;
    }
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
  static void store(scalar_t* p, int64_t n, const Vec& a, const Vec& b) {
    const Raw raw = at::vec::convert_from_float<scalar_t>(a, b);
    n >= kSize ? raw.store(p) : raw.store(p, n);
  }
};

template <typename scalar_t>
void load_step(const scalar_t* p, int64_t n, typename Step<scalar_t>::Vec& a,
               typename Step<scalar_t>::Vec& b) {
  n >= Step<scalar_t>::kSize ? Step<scalar_t>::load(p, a, b)
                             : Step<scalar_t>::load_partial(p, n, a, b);
}

// 0 where x == 0, else value (0 * log 0 = 0; a NaN x keeps the NaN value).
template <typename Vec>
inline Vec unless_zero(const Vec& x, const Vec& value) {
  return Vec::blendv(value, Vec(0), x == Vec(0));
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

// Exponentials are taken relative to a maximum, or to 0 while that is -inf (so that -inf - ref
// is -inf, never NaN). NaN and +inf pass through and poison the row.
template <typename acc_t>
inline acc_t exp_reference(acc_t maximum) {
  return maximum == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : maximum;
}

// Long rows are walked in blocks of kBlock classes that stay in L1 between a tensor's max sweep
// and its exp sweep.
constexpr int64_t kBlock = 2048;

// A row's blocks, each with its reference and its sum of exponentials relative to it, moved to
// the row's reference (from the row's maximum logit): each sum is replaced by its block's factor
// exp(ref_b - ref), 0 for a block without mass (never exp of a huge shift). Sets the row's
// reference and its total (the sum of exponentials relative to ref).
template <typename acc_t>
void combine_blocks(const acc_t* refs, acc_t* sums, int64_t blocks, acc_t row_max,
                    acc_t inv_temp, acc_t& ref, acc_t& total) {
  ref = exp_reference(row_max * inv_temp);
  double sum = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const acc_t factor = sums[b] == 0 ? acc_t(0) : std::exp(refs[b] - ref);
    sum += double(sums[b]) * factor;
    sums[b] = factor;
  }
  total = static_cast<acc_t>(sum);
}

// Rows per parallel task: enough elements that a task outweighs its scheduling.
inline int64_t grain_rows(int64_t elements_per_row) {
  return std::max<int64_t>(1, 32768 / elements_per_row);
}

// Calls f(scalar_s{}, scalar_t{}) for a pair of dtypes that the op has checked: both among
// float32, bfloat16 and float16, or both float64. `op` names the caller in an internal error.
template <typename F>
void dispatch_dtype_pair(c10::ScalarType ds, c10::ScalarType dt, const char* op, const F& f) {
  auto second = [&](auto first) {
    switch (dt) {
      case c10::ScalarType::Float:
        return f(first, float{});
      case c10::ScalarType::BFloat16:
        return f(first, at::BFloat16{});
      case c10::ScalarType::Half:
        return f(first, at::Half{});
      default:
        TORCH_INTERNAL_ASSERT(false, op, ": unexpected dtype ", dt);
    }
  };
  switch (ds) {
    case c10::ScalarType::Double:
      TORCH_INTERNAL_ASSERT(dt == c10::ScalarType::Double, op, ": float64 pairs with ", dt);
      return f(double{}, double{});
    case c10::ScalarType::Float:
      return second(float{});
    case c10::ScalarType::BFloat16:
      return second(at::BFloat16{});
    case c10::ScalarType::Half:
      return second(at::Half{});
    default:
      TORCH_INTERNAL_ASSERT(false, op, ": unexpected dtype ", ds);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace pykd::cpu
