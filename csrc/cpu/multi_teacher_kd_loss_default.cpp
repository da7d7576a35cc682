// The multi-teacher KD kernel for any CPU: portable code, picked when AVX2/FMA are absent.
#define CPU_CAPABILITY DEFAULT
#include "cpu/multi_teacher_kd_loss_kernel.h"
