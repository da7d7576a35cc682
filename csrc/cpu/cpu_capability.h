// The choice between the portable kernels and the ones compiled for AVX2 (kd_loss_avx2.cpp,
// hint_loss_avx2.cpp): ATen's own choice, so ATEN_CPU_CAPABILITY=default forces the portable ones.
#pragma once

#include <ATen/Version.h>

#include <string>

namespace pykd::cpu {

inline bool use_avx2() {
  static const bool avx2 = [] {
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
    const std::string capability = at::get_cpu_capability();
    return (capability == "AVX2" || capability == "AVX512") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
  }();
  return avx2;
}

}  // namespace pykd::cpu
