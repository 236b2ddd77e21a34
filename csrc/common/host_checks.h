// Host-side argument checks and preparation shared by the CPU and CUDA
// backends (not compiled into device code). Messages name the argument, what
// was expected and what came; ValueError for bad values, TypeError for bad
// dtypes, RuntimeError for devices.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/all.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/floor.h>
#include <ATen/ops/stack.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>

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
  // Both verdicts in one small tensor: one read-back (one sync on CUDA).
  const at::Tensor idx = rois.select(1, 0);
  const at::Tensor finite = at::isfinite(rois).all();
  const at::Tensor index_ok =
      at::logical_and(
          at::logical_and(idx.ge(0), idx.lt(static_cast<double>(batch_size))),
          at::floor(idx).eq(idx))
          .all();
  const at::Tensor verdict = at::stack({finite, index_ok}).cpu();
  const bool* ok = verdict.const_data_ptr<bool>();
  TORCH_CHECK_VALUE(ok[0], op, ": rois must hold finite values (no NaN or inf)");
  TORCH_CHECK_VALUE(ok[1], op,
                    ": rois[:, 0] (batch index) must be whole numbers in [0, ",
                    batch_size, "), got values outside that set");
}

inline void check_positive(const char* op, const char* name, int64_t v) {
  TORCH_CHECK_VALUE(v > 0, op, ": ", name, " must be positive, got ", v);
}

inline void check_non_negative(const char* op, const char* name, int64_t v) {
  TORCH_CHECK_VALUE(v >= 0, op, ": ", name, " must be non-negative, got ", v);
}

// Shapes, dtypes and devices of the five operands, shared by
// the CPU and CUDA backends (the box values are checked separately).
inline void check_blend_operands(const char* op, const at::Tensor& base,
                                 const at::Tensor& base_logit, const at::Tensor& input,
                                 const at::Tensor& input_logit, const at::Tensor& rois) {
  check_input_and_rois(op, base, "base", 4, rois);
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"base_logit", &base_logit}, {"input", &input}, {"input_logit", &input_logit}};
  for (const auto& named : others) {
    const at::Tensor& t = *named.second;
    TORCH_CHECK_TYPE(t.scalar_type() == base.scalar_type(), op, ": ", named.first,
                     " must have base's dtype ", base.scalar_type(), ", got ",
                     t.scalar_type());
    TORCH_CHECK(t.device() == base.device(), op, ": ", named.first,
                " must be on base's device ", base.device(), ", got ", t.device());
  }
  const int64_t B = base.size(0), C = base.size(1), H = base.size(2), W = base.size(3);
  TORCH_CHECK_VALUE(base_logit.dim() == 3 && base_logit.size(0) == B &&
                        base_logit.size(1) == H && base_logit.size(2) == W,
                    op, ": base_logit must be Tensor[B, H, W] = [", B, ", ", H, ", ", W,
                    "] (from base), got Tensor", base_logit.sizes());
  TORCH_CHECK_VALUE(input.dim() == 4 && input.size(1) == C, op,
                    ": input must be Tensor[K, C, PH, PW] with C = ", C,
                    " (base's channels), got Tensor", input.sizes());
  const int64_t K = rois.size(0);
  TORCH_CHECK_VALUE(input.size(0) == K, op,
                    ": input must have one grid per ROI: input.shape[0] == ",
                    input.size(0), " but rois has ", K, " rows");
  TORCH_CHECK_VALUE(input.size(2) > 0 && input.size(3) > 0, op,
                    ": input must have a non-empty grid (PH, PW > 0), got Tensor",
                    input.sizes());
  TORCH_CHECK_VALUE(input_logit.dim() == 3 && input_logit.size(0) == K &&
                        input_logit.size(1) == input.size(2) &&
                        input_logit.size(2) == input.size(3),
                    op, ": input_logit must be Tensor[K, PH, PW] = [", K, ", ",
                    input.size(2), ", ", input.size(3), "] (from input), got Tensor",
                    input_logit.sizes());
}

// The incoming gradients of the blend's backward (grad_base_weight may be
// absent); returns whether grad_base_weight is present.
inline bool check_blend_grads(const char* op, const at::Tensor& grad_out,
                              const std::optional<at::Tensor>& grad_base_weight,
                              const at::Tensor& base, const at::Tensor& base_logit) {
  TORCH_CHECK_VALUE(grad_out.sizes() == base.sizes(), op,
                    ": grad_out must have base's shape ", base.sizes(), ", got ",
                    grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == base.scalar_type(), op,
                   ": grad_out must have base's dtype ", base.scalar_type(), ", got ",
                   grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == base.device(), op,
              ": grad_out must be on base's device ", base.device(), ", got ",
              grad_out.device());
  const bool has_gbw = grad_base_weight.has_value() && grad_base_weight->defined();
  if (has_gbw) {
    const at::Tensor& gbw = *grad_base_weight;
    TORCH_CHECK_VALUE(gbw.sizes() == base_logit.sizes(), op,
                      ": grad_base_weight must have base_logit's shape ",
                      base_logit.sizes(), ", got ", gbw.sizes());
    TORCH_CHECK_TYPE(gbw.scalar_type() == base.scalar_type(), op,
                     ": grad_base_weight must have base's dtype ", base.scalar_type(),
                     ", got ", gbw.scalar_type());
    TORCH_CHECK(gbw.device() == base.device(), op,
                ": grad_base_weight must be on base's device ", base.device(),
                ", got ", gbw.device());
  }
  return has_gbw;
}

// The memory format a kernel works in: channels_last when the tensor is
// (token-major diffusion states are), else contiguous.
inline bool use_channels_last(const at::Tensor& t) {
  return t.dim() == 4 &&
         t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// Per-op argument checks (shapes, dtypes, devices, sizes), shared by the CPU
// and CUDA host functions; box values are checked by check_roi_values.
inline void check_roi_align_args(const char* op, const at::Tensor& input,
                                 const at::Tensor& rois, int64_t pooled_height,
                                 int64_t pooled_width) {
  check_input_and_rois(op, input, "input", 4, rois);
  check_positive(op, "pooled_height", pooled_height);
  check_positive(op, "pooled_width", pooled_width);
}

inline void check_roi_align_backward_args(const char* op, const at::Tensor& grad,
                                          const at::Tensor& rois,
                                          int64_t pooled_height, int64_t pooled_width,
                                          int64_t batch_size, int64_t channels,
                                          int64_t height, int64_t width) {
  check_input_and_rois(op, grad, "grad", 4, rois);
  const int64_t K = rois.size(0);
  TORCH_CHECK_VALUE(grad.size(0) == K && grad.size(1) == channels &&
                        grad.size(2) == pooled_height && grad.size(3) == pooled_width,
                    op, ": grad must be Tensor[", K, ", ", channels, ", ",
                    pooled_height, ", ", pooled_width, "], got Tensor", grad.sizes());
  check_non_negative(op, "batch_size", batch_size);
  check_non_negative(op, "channels", channels);
  check_non_negative(op, "height", height);
  check_non_negative(op, "width", width);
}

inline void check_roi_unpool_args(const char* op, const at::Tensor& input,
                                  const at::Tensor& rois, int64_t height,
                                  int64_t width) {
  check_input_and_rois(op, input, "input", 4, rois);
  check_positive(op, "height", height);
  check_positive(op, "width", width);
  TORCH_CHECK_VALUE(input.size(0) == rois.size(0), op,
                    ": input must have one grid per ROI: input.shape[0] == ",
                    input.size(0), " but rois has ", rois.size(0), " rows");
}

inline void check_roi_unpool_backward_args(const char* op, const at::Tensor& grad,
                                           const at::Tensor& rois,
                                           int64_t pooled_height,
                                           int64_t pooled_width) {
  check_input_and_rois(op, grad, "grad", 4, rois);
  check_positive(op, "pooled_height", pooled_height);
  check_positive(op, "pooled_width", pooled_width);
  TORCH_CHECK_VALUE(grad.size(0) == rois.size(0), op,
                    ": grad.shape[0] must equal the ", rois.size(0),
                    " rows of rois, got ", grad.size(0));
}

inline at::MemoryFormat memory_format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast
                       : at::MemoryFormat::Contiguous;
}

// The memory format a kernel uses for (and allocates like) tensor t.
inline at::MemoryFormat memory_format_of(const at::Tensor& t) {
  return memory_format_of(use_channels_last(t));
}

// Calls f(coord_t{}) with coord_t = double or float (see coord_type_for).
template <typename F>
void dispatch_coord_type(at::ScalarType t, F&& f) {
  if (t == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

// Every host function's dispatch: calls f(scalar_t{}, coord_t{}, acc_t{}) for
// the value dtype (float, double, Half or BFloat16, checked before dispatch),
// the ROI coordinate dtype (see coord_type_for) and the accumulation type.
template <typename F>
void dispatch_value_and_coord_types(at::ScalarType value, at::ScalarType coord,
                                    F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value, "roi_ops", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_coord_type(coord, [&](auto coord_tag) {
      f(scalar_t{}, decltype(coord_tag){}, acc_t{});
    });
  });
}

}  // namespace roi_ops
