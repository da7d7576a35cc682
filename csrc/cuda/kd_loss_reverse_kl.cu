// The CUDA row kernel (kd_loss_rows.cuh) for ReverseKL (beta = 1, KL(p_s || p_t)), every dtype pair.
#include "cuda/kd_loss_rows.cuh"

namespace pykd::cuda {

template void launch_kd_rows<ReverseKL>(const KdRowProblem&, const ReverseKL&);

}  // namespace pykd::cuda
