// The sparse-teacher KD kernels compiled for AVX2 (see avx2_target.h).
#include "cpu/avx2_target.h"
#include "cpu/sparse_kd_loss_kernel.h"
