// The sparse-teacher KD kernels compiled for AVX-512 (see avx512_target.h).
#include "cpu/avx512_target.h"
#include "cpu/sparse_kd_loss_kernel.h"
