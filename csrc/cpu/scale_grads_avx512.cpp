// The scale_grads_ kernel compiled for AVX-512 (see avx512_target.h).
#include "cpu/avx512_target.h"
#include "cpu/scale_grads_kernel.h"
