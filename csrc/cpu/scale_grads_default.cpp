// The scale_grads_ kernel for any CPU: portable code, picked when AVX2/FMA/F16C are absent.
#define CPU_CAPABILITY DEFAULT
#include "cpu/scale_grads_kernel.h"
