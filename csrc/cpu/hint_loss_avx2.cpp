// The hint-loss kernels with AVX2, FMA and F16C, built as kd_loss_avx2.cpp is (see there): only
// this file is compiled for those instructions and it runs only where the CPU has them.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx2,fma,f16c")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/hint_loss_kernel.h"
#else
// Not GCC on x86: only the portable kernels are built and hint_loss_cpu.cpp never calls these.
#include "cpu/hint_loss_cpu.h"
#include <c10/util/Exception.h>
namespace pykd::cpu::AVX2 {
double hint_sum_squares(c10::ScalarType, const void*, const void*, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "no AVX2 kernels built");
}
void hint_scaled_difference(
    c10::ScalarType, const void*, const void*, int64_t, double, void*, void*) {
  TORCH_INTERNAL_ASSERT(false, "no AVX2 kernels built");
}
}  // namespace pykd::cpu::AVX2
#endif
