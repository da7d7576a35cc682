// The CPU kernel of pykd::scale_grads_. Included once per CPU capability
// (scale_grads_default.cpp, scale_grads_avx2.cpp), each defining CPU_CAPABILITY, so that
// at::vec::Vectorized compiles to that instruction set in its own namespace (bfloat16 / float16
// convert 8 elements per instruction with AVX2, one at a time in portable code).
#include "cpu/scale_grads_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace pykd::cpu {
namespace CPU_CAPABILITY {

void scale_in_place(c10::ScalarType dtype, void* data, int64_t n, double scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "scale_grads_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    auto* p = static_cast<scalar_t*>(data);
    const acc_t s = static_cast<acc_t>(scale);
    // For 16-bit types map converts to float vectors and back; the tail is a masked load.
    at::vec::map([s](Vec x) { return x * Vec(s); }, p, p, n);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace pykd::cpu
