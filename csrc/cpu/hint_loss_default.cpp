// The hint-loss kernels for any CPU: portable code, picked when AVX2/FMA/F16C are absent.
#define CPU_CAPABILITY DEFAULT
#include "cpu/hint_loss_kernel.h"
