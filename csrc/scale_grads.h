// Argument checks of pykd::scale_grads_, shared by the CPU and CUDA implementations
// (csrc/cpu/scale_grads_cpu.cpp, csrc/cuda/scale_grads_cuda.cu).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace pykd {

// The number of rows of a gradient [..., C]: the product of its leading sizes.
inline int64_t scale_rows(const at::Tensor& grad) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < grad.dim(); ++d) {
    rows *= grad.size(d);
  }
  return rows;
}

// Each gradient floating point, dense (any memory format: with one scale for all, it is scaled as
// the flat span of memory it covers), on scale's device. scale floating point: one value, or one
// per row of every gradient [..., C] (each then contiguous with scale.numel() rows; scale of any
// shape with that many elements, any strides). Returns whether the scale is per row.
inline bool check_scale_grads(at::TensorList grads, const at::Tensor& scale) {
  TORCH_CHECK_TYPE(
      at::isFloatingType(scale.scalar_type()),
      "scale_grads_: scale must be a floating-point tensor, got ", scale.scalar_type());
  const bool per_row = scale.numel() != 1;
  for (size_t k = 0; k < grads.size(); ++k) {
    const at::Tensor& g = grads[k];
    TORCH_CHECK_TYPE(
        at::isFloatingType(g.scalar_type()), "scale_grads_: grads[", k,
        "] must be a floating-point tensor, got ", g.scalar_type());
    TORCH_CHECK_VALUE(
        g.device() == scale.device(), "scale_grads_: grads[", k,
        "] and scale must be on one device, got ", g.device(), " and ", scale.device());
    TORCH_CHECK_VALUE(
        g.is_non_overlapping_and_dense(), "scale_grads_: grads[", k,
        "] must be dense (a gradient that a loss wrote), got sizes ", g.sizes(), " and strides ",
        g.strides());
    if (per_row) {
      TORCH_CHECK_VALUE(
          g.dim() >= 1 && scale.numel() == scale_rows(g),
          "scale_grads_: scale must hold one value, or one per row of each gradient, got shape ",
          scale.sizes(), " for grads[", k, "] of shape ", g.sizes());
      TORCH_CHECK_VALUE(
          g.is_contiguous(), "scale_grads_: grads[", k,
          "] is scaled per row and must be contiguous, got strides ", g.strides());
    }
  }
  return per_row;
}

}  // namespace pykd
