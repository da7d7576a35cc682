// The choice among the portable kernels and the ones compiled for AVX2 or AVX-512
// (avx2_target.h, avx512_target.h, whose compiler condition this repeats): ATen's own choice, so
// ATEN_CPU_CAPABILITY=default or =avx2 forces the portable or the AVX2 ones.
#pragma once

#include <ATen/Version.h>

#include <string>

namespace pykd::cpu {

enum class Isa { kDefault, kAvx2, kAvx512 };

inline Isa cpu_isa() {
  static const Isa isa = [] {
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512" && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("f16c")) {
      return Isa::kAvx512;
    }
    if ((capability == "AVX2" || capability == "AVX512") && __builtin_cpu_supports("f16c")) {
      return Isa::kAvx2;
    }
#endif
    return Isa::kDefault;
  }();
  return isa;
}

template <typename F>
F pick_kernel(F portable, F avx2, F avx512) {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return avx512;
    case Isa::kAvx2:
      return avx2;
    default:
      return portable;
  }
}

}  // namespace pykd::cpu

// This CPU's build of a kernel function declared in the DEFAULT, AVX2 and AVX512 namespaces.
#define PYKD_CPU_KERNEL(name) \
  ::pykd::cpu::pick_kernel(DEFAULT::name, AVX2::name, AVX512::name)
