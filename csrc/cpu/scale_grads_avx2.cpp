// The scale_grads_ kernel compiled for AVX2 (see avx2_target.h).
#include "cpu/avx2_target.h"
#include "cpu/scale_grads_kernel.h"
