// The CUDA row kernel (kd_loss_rows.cuh) for JensenShannon (0 < beta < 1, the generalized
// Jensen-Shannon divergence): float accumulation for every float16/bfloat16/float32 pair, double
// for float64.
#include "cuda/kd_loss_rows.cuh"

namespace pykd::cuda {

template void launch_kd_rows<JensenShannon<float>>(
    const KdRowProblem&, const JensenShannon<float>&);
template void launch_kd_rows<JensenShannon<double>>(
    const KdRowProblem&, const JensenShannon<double>&);

}  // namespace pykd::cuda
