// The hint-loss kernels compiled for AVX2 (see avx2_target.h).
#include "cpu/avx2_target.h"
#include "cpu/hint_loss_kernel.h"
