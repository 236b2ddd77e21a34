// The prologue every host function shares (CPU and CUDA, forward and
// backward of every op): it validates the operands and prepares them as the
// kernels read them, into one operands struct per op (AlignOperands,
// UnpoolOperands, BlendOperands), in this order, so that both backends raise
// the same error first and return the same empty results:
//   1. the op's argument checks: shapes, dtypes, devices, sizes
//      (host_checks.h);
//   2. the box values (check_box_operands: one host copy of rois);
//   3. the memory format the kernels work in, that of the feature operand:
//      channels_last when it is (token-major diffusion states are), else
//      contiguous;
//   4. the results in that format, zeros when there is no work (an empty K,
//      C, B, H, W or grid): the host function then returns them and launches
//      nothing;
//   5. with work, the operands as the kernels read them and the boxes in the
//      coordinate dtype (coord_type_for).
// The host function then dispatches the dtypes (dispatch) and runs its
// kernels. A CUDA host function constructs its launcher (the device guard)
// before the prologue. Host code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <cstdint>
#include <optional>
#include <utility>

#include "dtype_dispatch.h"
#include "host_checks.h"

namespace roi_ops {

// The memory format a kernel works in: channels_last when the tensor is
// (token-major diffusion states are), else contiguous.
inline bool use_channels_last(const at::Tensor& t) {
  return t.dim() == 4 &&
         t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

inline at::MemoryFormat memory_format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast
                       : at::MemoryFormat::Contiguous;
}

// The memory format a kernel uses for (and allocates like) tensor t.
inline at::MemoryFormat memory_format_of(const at::Tensor& t) {
  return memory_format_of(use_channels_last(t));
}

// The output of an op whose size comes from a size argument (`what` names
// it): an element count that overflows int64, or memory the allocator
// refuses, is reported as that argument's error before any work starts.
inline at::Tensor empty_output(const char* op, const char* what, at::IntArrayRef sizes,
                               const at::TensorOptions& options,
                               at::MemoryFormat format, bool zeroed = false) {
  int64_t numel = 1;
  for (const int64_t s : sizes) {
    TORCH_CHECK_VALUE(!c10::mul_overflows(numel, s, &numel), op, ": the output Tensor",
                      sizes, " (from ", what, ") has more elements than int64 can count");
  }
  const auto describe = [&] {
    return c10::str(op, ": cannot allocate the output Tensor", sizes, " (from ", what,
                    ", ", numel, " elements of ",
                    c10::elementSize(c10::typeMetaToScalarType(options.dtype())),
                    " bytes): ");
  };
  try {
    at::Tensor out = at::empty(sizes, options.memory_format(format));
    if (zeroed) out.zero_();
    return out;
  } catch (const c10::OutOfMemoryError& e) {  // device allocators
    TORCH_CHECK_WITH(OutOfMemoryError, false, describe(), e.what_without_backtrace());
  } catch (const c10::Error& e) {  // the CPU allocator reports a plain error
    TORCH_CHECK(false, describe(), e.what_without_backtrace());
  }
}

// Step 4 for one result: zeros when `zeroed` (no kernel will write it). A
// forward result is sized by a size argument, which `from` names for the
// errors of empty_output; a backward one (from = nullptr) has the sizes of
// the forward's tensors, which exist already, and is allocated plainly.
inline at::Tensor new_result(const char* op, const char* from, at::IntArrayRef sizes,
                             const at::TensorOptions& options, at::MemoryFormat format,
                             bool zeroed) {
  if (from != nullptr) return empty_output(op, from, sizes, options, format, zeroed);
  const at::TensorOptions in_format = options.memory_format(format);
  return zeroed ? at::zeros(sizes, in_format) : at::empty(sizes, in_format);
}

// What the operands of every op share: the boxes and the working layout.
struct BoxOperands {
  at::Tensor rois;  // [K, 5] in the coordinate dtype, contiguous (step 5)
  double spatial_scale = 1.0;
  bool aligned = false;
  at::ScalarType value_type = at::kFloat;  // the feature operands' dtype
  bool channels_last = false;              // the working memory format (step 3)
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  bool has_work = false;

  // Runs f<scalar_t, coord_t, acc_t>(): see dispatch_value_and_coord_types.
  template <typename F>
  void dispatch(F&& f) const {
    dispatch_value_and_coord_types(value_type, rois.scalar_type(), std::forward<F>(f));
  }

  // Steps 2 and 3; `like` is the feature operand that fixes the memory
  // format and, with rois, the coordinate dtype.
  void check_boxes_and_layout(const char* op, const at::Tensor& like,
                              const at::Tensor& rois_, int64_t batch_size,
                              double spatial_scale_, bool aligned_,
                              const AlignSampling* align = nullptr) {
    check_box_operands(op, like, rois_, batch_size, spatial_scale_, aligned_, align);
    spatial_scale = spatial_scale_;
    aligned = aligned_;
    value_type = like.scalar_type();
    channels_last = use_channels_last(like);
    format = memory_format_of(channels_last);
  }

  // Step 5 for the boxes.
  void cast_boxes(const at::Tensor& like, const at::Tensor& rois_) {
    rois = rois_.to(coord_type_for(like, rois_)).contiguous();
  }
};

// The sizes of ROI-Align and ROI-Unpool: K boxes, C channels, the feature
// map H x W and each box's grid PH x PW.
struct RoiShape {
  int64_t num_rois, channels, height, width, pooled_h, pooled_w;
};

// The operands of an op with one feature operand and one result.
struct GridOperands : BoxOperands {
  at::Tensor features;  // contiguous in `format` (step 5), or as given with keep_feature_strides
  at::Tensor result;
  RoiShape shape{};
  // Set before prepare() by an op whose kernels read `features` through its
  // strides (ROI-Unpool's backward): an expanded gradient (stride 0, what
  // `.sum().backward()` hands over) is then read in place, not materialised.
  bool keep_feature_strides = false;

  // Steps 2 to 5. There is no work unless every size is positive (and, for
  // ROI-Align, batch_size: an empty batch can only have no boxes).
  void prepare(const char* op, const char* result_from, at::IntArrayRef result_sizes,
               const at::Tensor& features_, const at::Tensor& rois_, int64_t batch_size,
               double spatial_scale_, bool aligned_, const AlignSampling* align = nullptr) {
    check_boxes_and_layout(op, features_, rois_, batch_size, spatial_scale_, aligned_, align);
    const RoiShape& s = shape;
    has_work = s.num_rois > 0 && s.channels > 0 && s.height > 0 && s.width > 0 &&
               s.pooled_h > 0 && s.pooled_w > 0 && batch_size > 0;
    result = new_result(op, result_from, result_sizes, features_.options(), format, !has_work);
    if (!has_work) return;
    features = keep_feature_strides ? features_ : features_.contiguous(format);
    cast_boxes(features_, rois_);
  }
};

// ROI-Align: `features` is input (forward) or grad (backward); `result` is
// output [K, C, PH, PW] (forward) or grad_input [B, C, H, W] (backward).
struct AlignOperands : GridOperands {
  int64_t batch_size = 0, sampling_ratio = 0;
};

inline AlignOperands align_forward_operands(const at::Tensor& input, const at::Tensor& rois,
                                            double spatial_scale, int64_t pooled_height,
                                            int64_t pooled_width, int64_t sampling_ratio,
                                            bool aligned) {
  constexpr const char* op = "roi_align";
  check_roi_align_args(op, input, rois, pooled_height, pooled_width);
  AlignOperands o;
  o.batch_size = input.size(0);
  o.sampling_ratio = sampling_ratio;
  o.shape = {rois.size(0), input.size(1), input.size(2), input.size(3), pooled_height,
             pooled_width};
  const AlignSampling sampling{pooled_height, pooled_width, sampling_ratio,
                               o.shape.height, o.shape.width};
  o.prepare(op, "output_size (pooled_height, pooled_width)",
            {o.shape.num_rois, o.shape.channels, pooled_height, pooled_width}, input, rois,
            o.batch_size, spatial_scale, aligned, &sampling);
  return o;
}

inline AlignOperands align_backward_operands(const at::Tensor& grad, const at::Tensor& rois,
                                             double spatial_scale, int64_t pooled_height,
                                             int64_t pooled_width, int64_t batch_size,
                                             int64_t channels, int64_t height, int64_t width,
                                             int64_t sampling_ratio, bool aligned) {
  constexpr const char* op = "_roi_align_backward";
  check_roi_align_backward_args(op, grad, rois, pooled_height, pooled_width, batch_size,
                                channels, height, width);
  AlignOperands o;
  o.batch_size = batch_size;
  o.sampling_ratio = sampling_ratio;
  o.shape = {rois.size(0), channels, height, width, pooled_height, pooled_width};
  const AlignSampling sampling{pooled_height, pooled_width, sampling_ratio, height, width};
  o.prepare(op, nullptr, {batch_size, channels, height, width}, grad, rois, batch_size,
            spatial_scale, aligned, &sampling);
  return o;
}

// ROI-Unpool: `features` is input [K, C, PH, PW] (forward) or grad
// [K, C, H, W] (backward); `result` is output [K, C, H, W] (forward) or
// grad_input [K, C, PH, PW] (backward). Unpool does not read the batch
// index, but the box contract is the same for all ops: it is checked with no
// upper bound.
struct UnpoolOperands : GridOperands {};

inline UnpoolOperands unpool_forward_operands(const at::Tensor& input, const at::Tensor& rois,
                                              double spatial_scale, int64_t height,
                                              int64_t width, bool aligned) {
  constexpr const char* op = "roi_unpool";
  check_roi_unpool_args(op, input, rois, height, width);
  UnpoolOperands o;
  o.shape = {rois.size(0), input.size(1), height, width, input.size(2), input.size(3)};
  o.prepare(op, "output_size (height, width)", {o.shape.num_rois, o.shape.channels, height, width},
            input, rois, INT64_MAX, spatial_scale, aligned);
  return o;
}

inline UnpoolOperands unpool_backward_operands(const at::Tensor& grad, const at::Tensor& rois,
                                               double spatial_scale, int64_t pooled_height,
                                               int64_t pooled_width, bool aligned) {
  constexpr const char* op = "_roi_unpool_backward";
  check_roi_unpool_backward_args(op, grad, rois, pooled_height, pooled_width);
  UnpoolOperands o;
  o.shape = {rois.size(0), grad.size(1), grad.size(2), grad.size(3), pooled_height,
             pooled_width};
  o.keep_feature_strides = true;  // both backends' kernels read grad through its strides
  o.prepare(op, nullptr, {o.shape.num_rois, o.shape.channels, pooled_height, pooled_width},
            grad, rois, INT64_MAX, spatial_scale, aligned);
  return o;
}

// The fused blend's sizes: B images of C x H x W, K boxes with PH x PW grids.
struct BlendShape {
  int64_t batch, channels, height, width, num_rois, pooled_h, pooled_w;
};

// The fused blend's operands, forward or backward. base, input and grad_out
// are as given (each backend reads them in its own way: the CPU in base's
// format, CUDA through their strides), the logits and grad_base_weight
// contiguous; the working format is base's.
struct BlendOperands : BoxOperands {
  at::Tensor base, base_logit, input, input_logit;
  at::Tensor grad_out;          // backward only
  at::Tensor grad_base_weight;  // backward only; undefined when absent
  at::Tensor coverage;          // [K, FH, FW] contiguous; undefined when absent
  bool input_channels_last = false;  // the format of grad_input
  BlendShape shape{};
  // the results: (out, base_weight) forward; (grad_base, grad_base_logit,
  // grad_input, grad_input_logit) backward
  at::Tensor out, base_weight;
  at::Tensor grad_base, grad_base_logit, grad_input, grad_input_logit;
  at::Tensor grad_coverage;  // [K, FH, FW] zeros; Tensor[0] without coverage

  // Steps 2 and 3; there is no work without an output pixel.
  void check_boxes(const char* op, const at::Tensor& base_, const at::Tensor& input_,
                   const at::Tensor& rois_, double spatial_scale_, bool aligned_) {
    shape = {base_.size(0), base_.size(1), base_.size(2), base_.size(3), rois_.size(0),
             input_.size(2), input_.size(3)};
    check_boxes_and_layout(op, base_, rois_, shape.batch, spatial_scale_, aligned_);
    input_channels_last = use_channels_last(input_);
    has_work = shape.batch > 0 && shape.height > 0 && shape.width > 0;
  }

  // Step 5 (after the direction's step 4, the results).
  void load(const at::Tensor& base_, const at::Tensor& base_logit_, const at::Tensor& input_,
            const at::Tensor& input_logit_, const at::Tensor& rois_,
            const std::optional<at::Tensor>& coverage_) {
    base = base_;
    input = input_;
    base_logit = base_logit_.contiguous();
    input_logit = input_logit_.contiguous();
    if (has_coverage(coverage_)) coverage = coverage_->contiguous();
    cast_boxes(base_, rois_);
  }

  static bool has_coverage(const std::optional<at::Tensor>& coverage_) {
    return coverage_.has_value() && coverage_->defined();
  }
};

inline BlendOperands blend_forward_operands(const at::Tensor& base, const at::Tensor& base_logit,
                                            const at::Tensor& input,
                                            const at::Tensor& input_logit,
                                            const at::Tensor& rois, double spatial_scale,
                                            bool aligned,
                                            const std::optional<at::Tensor>& coverage) {
  constexpr const char* op = "roi_unpool_blend";
  check_blend_operands(op, base, base_logit, input, input_logit, rois);
  BlendOperands o;
  o.check_boxes(op, base, input, rois, spatial_scale, aligned);
  if (BlendOperands::has_coverage(coverage)) {
    check_blend_coverage(op, *coverage, base, rois, spatial_scale, aligned);
  }
  const BlendShape& s = o.shape;
  // without work these have no element: nothing to zero
  o.out = at::empty({s.batch, s.channels, s.height, s.width}, base.options(), o.format);
  o.base_weight = at::empty({s.batch, s.height, s.width}, base_logit.options());
  if (o.has_work) o.load(base, base_logit, input, input_logit, rois, coverage);
  return o;
}

inline BlendOperands blend_backward_operands(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_base_weight,
    const at::Tensor& base, const at::Tensor& base_logit, const at::Tensor& input,
    const at::Tensor& input_logit, const at::Tensor& rois, double spatial_scale,
    bool aligned, const std::optional<at::Tensor>& coverage) {
  constexpr const char* op = "_roi_unpool_blend_backward";
  check_blend_operands(op, base, base_logit, input, input_logit, rois);
  const bool has_gbw = check_blend_grads(op, grad_out, grad_base_weight, base, base_logit);
  BlendOperands o;
  o.check_boxes(op, base, input, rois, spatial_scale, aligned);
  const bool has_cov = BlendOperands::has_coverage(coverage);
  if (has_cov) check_blend_coverage(op, *coverage, base, rois, spatial_scale, aligned);
  // zeros: the kernels write only the cells of each ROI's own footprint
  o.grad_coverage = has_cov ? at::zeros(coverage->sizes(), coverage->options())
                            : at::empty({0}, base.options());
  const BlendShape& s = o.shape;
  const bool zeroed = !o.has_work;
  o.grad_base = new_result(op, nullptr, {s.batch, s.channels, s.height, s.width},
                           base.options(), o.format, zeroed);
  o.grad_base_logit = new_result(op, nullptr, {s.batch, s.height, s.width},
                                 base_logit.options(), at::MemoryFormat::Contiguous, zeroed);
  o.grad_input = new_result(op, nullptr, {s.num_rois, s.channels, s.pooled_h, s.pooled_w},
                            input.options(), memory_format_of(o.input_channels_last), zeroed);
  o.grad_input_logit = new_result(op, nullptr, {s.num_rois, s.pooled_h, s.pooled_w},
                                  input_logit.options(), at::MemoryFormat::Contiguous, zeroed);
  if (!o.has_work) return o;
  o.load(base, base_logit, input, input_logit, rois, coverage);
  o.grad_out = grad_out;
  if (has_gbw) o.grad_base_weight = grad_base_weight->contiguous();
  return o;
}

}  // namespace roi_ops
