// The CUDA row kernel (kd_loss_rows.cuh) for ForwardKL (beta = 0, KL(p_t || p_s)), every dtype pair.
#include "cuda/kd_loss_rows.cuh"

namespace pykd::cuda {

template void launch_kd_rows<ForwardKL>(const KdRowProblem&, const ForwardKL&);

}  // namespace pykd::cuda
