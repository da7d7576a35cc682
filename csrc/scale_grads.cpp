// The backend-independent part of pykd::scale_grads_: like every in-place ATen op, it bumps the
// version counter of each tensor it modifies (the ADInplaceOrView kernel that PyTorch generates
// for its own ops; custom ops get none). Autograd then refuses a gradient that was saved before
// and scaled since: a second backward through a graph whose fused loss already scaled its saved
// gradient in place raises "modified by an inplace operation" instead of using it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace pykd {
namespace {

void scale_grads_ad_inplace_or_view(
    c10::DispatchKeySet keys, at::TensorList grads, const at::Tensor& scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pykd::scale_grads_", "")
                             .typed<void(at::TensorList, const at::Tensor&)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, grads, scale);
  }
  for (const at::Tensor& g : grads) {
    g.unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace
}  // namespace pykd

TORCH_LIBRARY_IMPL(pykd, ADInplaceOrView, m) {
  m.impl("scale_grads_", TORCH_FN(pykd::scale_grads_ad_inplace_or_view));
}
