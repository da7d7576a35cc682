// The KD-loss kernels compiled for AVX-512 (see avx512_target.h).
#include "cpu/avx512_target.h"
#include "cpu/kd_loss_kernel.h"
