// The KD kernels with AVX2 and FMA. Only this file is compiled for those instructions, and it runs
// only where the CPU has them (kd_loss_cpu.cpp asks ATen), so the library stays loadable on any
// x86-64 machine. The pragma switches the instruction set without build-system flags; GCC does
// not define the ISA macros for it, so they are defined here for the headers (Sleef, ATen) that
// test them. AVX-512 is not built: the machines measured so far (AMD Zen 3) lack it, and ATen
// itself prefers its AVX2 kernels for this kind of loop.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx2,fma,f16c")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/kd_loss_kernel.h"
#else
// Not GCC on x86: only the portable kernels are built and kd_loss_cpu.cpp never calls these.
#include "cpu/kd_loss_cpu.h"
#include <c10/util/Exception.h>
namespace pykd::cpu::AVX2 {
void kd_forward(const KdForwardArgs&) { TORCH_INTERNAL_ASSERT(false, "no AVX2 kernels built"); }
void kd_backward(const KdBackwardArgs&) { TORCH_INTERNAL_ASSERT(false, "no AVX2 kernels built"); }
}  // namespace pykd::cpu::AVX2
#endif
