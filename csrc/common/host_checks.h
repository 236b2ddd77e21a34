// Host-side argument checks and preparation shared by the CPU and CUDA
// backends (not compiled into device code). Messages name the argument, what
// was expected and what came; ValueError for bad values, TypeError for bad
// dtypes, RuntimeError for devices.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/all.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/floor.h>
#include <c10/util/Exception.h>

namespace roi_ops {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf ||
         t == at::kBFloat16;
}

// Box arithmetic runs in float64 when either tensor is float64, else float32.
inline at::ScalarType coord_type_for(const at::Tensor& input,
                                     const at::Tensor& rois) {
  return (input.scalar_type() == at::kDouble ||
          rois.scalar_type() == at::kDouble)
             ? at::kDouble
             : at::kFloat;
}

inline void check_input_and_rois(const char* op, const at::Tensor& input,
                                 const char* input_name, int64_t input_dim,
                                 const at::Tensor& rois) {
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()), op, ": ",
                   input_name,
                   " must be float16, bfloat16, float32 or float64, got ",
                   input.scalar_type());
  TORCH_CHECK_TYPE(is_supported_float(rois.scalar_type()), op,
                   ": rois must be a floating tensor, got ",
                   rois.scalar_type());
  TORCH_CHECK_VALUE(input.dim() == input_dim, op, ": ", input_name, " must be a ",
                    input_dim, "-D tensor, got ", input.dim(), "-D tensor of shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(rois.dim() == 2 && rois.size(1) == 5, op,
                    ": rois must be Tensor[K, 5] (batch_index, x1, y1, x2, y2), "
                    "got Tensor",
                    rois.sizes());
  TORCH_CHECK(input.device() == rois.device(), op, ": ", input_name,
              " and rois must be on the same device, got ", input.device(),
              " and ", rois.device());
}

// Value checks that keep kernels in bounds: finite coordinates and integral
// batch indices in [0, batch_size). One small reduction over rois (a device
// sync on CUDA, negligible next to the kernels).
inline void check_roi_values(const char* op, const at::Tensor& rois,
                             int64_t batch_size) {
  if (rois.size(0) == 0) return;
  TORCH_CHECK_VALUE(at::isfinite(rois).all().item<bool>(), op,
                    ": rois must hold finite values (no NaN or inf)");
  const at::Tensor idx = rois.select(1, 0);
  const bool in_range =
      at::logical_and(idx.ge(0), idx.lt(static_cast<double>(batch_size)))
          .all()
          .item<bool>();
  const bool integral = at::floor(idx).eq(idx).all().item<bool>();
  TORCH_CHECK_VALUE(in_range && integral, op,
                    ": rois[:, 0] (batch index) must be whole numbers in [0, ",
                    batch_size, "), got values outside that set");
}

inline void check_positive(const char* op, const char* name, int64_t v) {
  TORCH_CHECK_VALUE(v > 0, op, ": ", name, " must be positive, got ", v);
}

inline void check_non_negative(const char* op, const char* name, int64_t v) {
  TORCH_CHECK_VALUE(v >= 0, op, ": ", name, " must be non-negative, got ", v);
}

// The memory format a kernel works in: channels_last when the tensor is
// (token-major diffusion states are), else contiguous.
inline bool use_channels_last(const at::Tensor& t) {
  return t.dim() == 4 &&
         t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

}  // namespace roi_ops
