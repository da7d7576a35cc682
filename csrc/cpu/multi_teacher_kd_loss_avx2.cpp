// The multi-teacher KD kernel compiled for AVX2 (see avx2_target.h).
#include "cpu/avx2_target.h"
#include "cpu/multi_teacher_kd_loss_kernel.h"
