// The sparse-teacher KD kernels for any CPU: portable code, picked when AVX2/FMA are absent.
#define CPU_CAPABILITY DEFAULT
#include "cpu/sparse_kd_loss_kernel.h"
