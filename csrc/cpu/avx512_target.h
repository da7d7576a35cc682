// Included first by the *_avx512.cpp files: compiles the rest of that translation unit for
// AVX-512 (F, BW, VL, DQ) with AVX2, FMA and F16C, with at::vec in its AVX512 namespace (16 float
// lanes). As with avx2_target.h, the pragma switches the instruction set without build-system
// flags and the ISA macros are defined here for the headers (Sleef, ATen) that test them; the
// kernels run only where the CPU has these instructions (cpu_capability.h).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY_AVX512
#endif
#define CPU_CAPABILITY AVX512
