// The hint-loss kernels compiled for AVX-512 (see avx512_target.h).
#include "cpu/avx512_target.h"
#include "cpu/hint_loss_kernel.h"
