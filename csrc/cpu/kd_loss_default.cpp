// The KD kernels for any CPU: portable code, picked when AVX2/FMA are absent.
#define CPU_CAPABILITY DEFAULT
#include "cpu/kd_loss_kernel.h"
