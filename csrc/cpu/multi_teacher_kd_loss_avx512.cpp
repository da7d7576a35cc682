// The multi-teacher KD kernel compiled for AVX-512 (see avx512_target.h).
#include "cpu/avx512_target.h"
#include "cpu/multi_teacher_kd_loss_kernel.h"
