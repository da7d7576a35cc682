// Included first by the *_avx2.cpp files: compiles the rest of that translation unit for AVX2,
// FMA and F16C, with at::vec in its AVX2 namespace. Only those files get these instructions, and
// their kernels run only where the CPU has them (cpu_capability.h), so the library stays loadable
// on any x86-64 machine. The pragma switches the instruction set without build-system flags, so
// setup.py and CMakeLists.txt compile every file alike; GCC does not define the ISA macros for
// it, so they are defined here for the headers (Sleef, ATen) that test them.
//
// On other compilers or CPUs the same kernels are compiled as portable code in the AVX2
// namespace, and cpu_capability.h never picks them. avx512_target.h does the same for AVX-512.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx2,fma,f16c")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY_AVX2
#endif
#define CPU_CAPABILITY AVX2
