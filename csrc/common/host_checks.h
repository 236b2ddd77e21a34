// Host-side argument checks shared by the CPU and CUDA backends (not
// compiled into device code): shapes, dtypes, devices and sizes per op, and
// the box values. Messages name the argument, what was expected and what
// came; ValueError for bad values, TypeError for bad dtypes, RuntimeError for
// devices. host_prologue.h runs them, in a fixed order, for every host function.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/all.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/floor.h>
#include <ATen/ops/stack.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <optional>
#include <sstream>
#include <utility>

#include "dtype_dispatch.h"
#include "roi_math.h"

namespace roi_ops {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf ||
         t == at::kBFloat16;
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
// batch indices in [0, batch_size). One small reduction over rois
// (check_box_operands runs it on the host copy of rois).
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

// A size argument the op allocates from: positive and at most
// math::kMaxOutputSide, checked before anything is allocated.
inline void check_output_side(const char* op, const char* name, int64_t v) {
  check_positive(op, name, v);
  TORCH_CHECK_VALUE(v <= math::kMaxOutputSide, op, ": ", name, " must be at most ",
                    math::kMaxOutputSide, ", got ", v);
}

// spatial_scale as the kernels use it: cast to the coordinate dtype, where a
// positive finite double can become 0 (1e-50 in float32) or inf (1e39).
inline void check_spatial_scale(const char* op, double spatial_scale,
                                at::ScalarType coord) {
  const double in_coord =
      coord == at::kDouble ? spatial_scale
                           : static_cast<double>(static_cast<float>(spatial_scale));
  const char* coord_name = coord == at::kDouble ? "float64" : "float32";
  TORCH_CHECK_VALUE(std::isfinite(in_coord) && in_coord > 0, op,
                    ": spatial_scale must be positive and finite in the coordinate "
                    "dtype ", coord_name, ", got ", spatial_scale, " (", in_coord, " in ",
                    coord_name, ")");
}

// sampling_ratio <= 0 is the adaptive count; an explicit one is bounded so
// that the work per bin is known before any kernel starts.
inline void check_sampling_ratio(const char* op, int64_t sampling_ratio) {
  TORCH_CHECK_VALUE(sampling_ratio <= math::kMaxSamplingRatio, op,
                    ": sampling_ratio must be at most ", math::kMaxSamplingRatio,
                    " samples per bin along each axis (or <= 0 for the adaptive "
                    "count), got ", sampling_ratio);
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

// Per-op argument checks (shapes, dtypes, devices, sizes), shared by the CPU
// and CUDA host functions; box values are checked by check_roi_values.
inline void check_roi_align_args(const char* op, const at::Tensor& input,
                                 const at::Tensor& rois, int64_t pooled_height,
                                 int64_t pooled_width) {
  check_input_and_rois(op, input, "input", 4, rois);
  check_output_side(op, "pooled_height", pooled_height);
  check_output_side(op, "pooled_width", pooled_width);
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
  check_output_side(op, "pooled_height", pooled_height);
  check_output_side(op, "pooled_width", pooled_width);
  check_non_negative(op, "batch_size", batch_size);
  check_non_negative(op, "channels", channels);
  check_non_negative(op, "height", height);
  check_non_negative(op, "width", width);
}

inline void check_roi_unpool_args(const char* op, const at::Tensor& input,
                                  const at::Tensor& rois, int64_t height,
                                  int64_t width) {
  check_input_and_rois(op, input, "input", 4, rois);
  check_output_side(op, "height", height);
  check_output_side(op, "width", width);
  TORCH_CHECK_VALUE(input.size(0) == rois.size(0), op,
                    ": input must have one grid per ROI: input.shape[0] == ",
                    input.size(0), " but rois has ", rois.size(0), " rows");
}

inline void check_roi_unpool_backward_args(const char* op, const at::Tensor& grad,
                                           const at::Tensor& rois,
                                           int64_t pooled_height,
                                           int64_t pooled_width) {
  check_input_and_rois(op, grad, "grad", 4, rois);
  // 0 is an empty grid, which the forward accepts: its gradient is empty too
  check_non_negative(op, "pooled_height", pooled_height);
  check_non_negative(op, "pooled_width", pooled_width);
  TORCH_CHECK_VALUE(pooled_height <= math::kMaxOutputSide &&
                        pooled_width <= math::kMaxOutputSide,
                    op, ": pooled_height and pooled_width must be at most ",
                    math::kMaxOutputSide, ", got ", pooled_height, " and ", pooled_width);
  TORCH_CHECK_VALUE(grad.size(0) == rois.size(0), op,
                    ": grad.shape[0] must equal the ", rois.size(0),
                    " rows of rois, got ", grad.size(0));
}

// ROI-Align's sampling arguments, for the per-box work bound in
// check_roi_geometry (pooled sizes and the feature map's extent).
struct AlignSampling {
  int64_t pooled_h, pooled_w, sampling_ratio, height, width;
};

// Per-box checks on the mapped geometry, through the kernels' own math on a
// host copy of rois (`rois` on the CPU: check_box_operands transfers them)
// converted to the coordinate dtype:
//  - every box's mapped edges and extent are finite (math::roi_frame_finite);
//  - with `align`, no bin has more than math::align_visit_limit samples on
//    the map along an axis (only possible when the coordinates are too large
//    for the coordinate dtype to separate the samples), so the work of every
//    kernel is bounded before it starts.
// Call after check_roi_values (finite coordinates, valid batch indices).
inline void check_roi_geometry(const char* op, const at::Tensor& rois,
                               at::ScalarType coord, double spatial_scale,
                               bool aligned,
                               const AlignSampling* align = nullptr) {
  const int64_t K = rois.size(0);
  if (K == 0) return;
  const at::Tensor host = rois.to(coord).contiguous();
  const char* coord_name = coord == at::kDouble ? "float64" : "float32";
  dispatch_coord_type(coord, [&](auto coord_tag) {
    using T = decltype(coord_tag);
    const T* r = host.const_data_ptr<T>();
    const T scale = static_cast<T>(spatial_scale);
    // "(v0, v1, ...)" with every digit the coordinate dtype holds
    const auto tuple = [](std::initializer_list<T> values) {
      std::ostringstream s;
      s.precision(std::numeric_limits<T>::max_digits10);
      const char* sep = "(";
      for (const T v : values) {
        s << sep << v;
        sep = ", ";
      }
      s << ")";
      return s.str();
    };
    for (int64_t k = 0; k < K; ++k) {
      const T* roi = r + 5 * k;
      const auto row = [&] { return tuple({roi[0], roi[1], roi[2], roi[3], roi[4]}); };
      if (!math::roi_frame_finite(roi, scale, aligned)) {
        const math::RoiEdges<T> e = math::map_edges(roi, scale, aligned);
        TORCH_CHECK_VALUE(false, op, ": rois[", k, "] = ", row(),
                          " is not a finite box in the feature frame: with "
                          "spatial_scale = ", spatial_scale, " its edges are ",
                          tuple({e.x0, e.y0, e.x1, e.y1}), " and its width and height ",
                          tuple({e.x1 - e.x0, e.y1 - e.y0}), " in ", coord_name,
                          "; every edge and both extents must be finite");
      }
      if (align == nullptr) continue;
      const math::AlignAxes<T> axes = math::align_axes(
          roi, scale, aligned, align->pooled_h, align->pooled_w,
          align->sampling_ratio, align->height, align->width);
      const math::AlignAxis<T>* pair[2] = {&axes.y, &axes.x};
      const int64_t pooled[2] = {align->pooled_h, align->pooled_w};
      for (int axis = 0; axis < 2; ++axis) {
        const math::AlignAxis<T>& a = *pair[axis];
        const int64_t limit = math::align_visit_limit(a.size);
        if (a.grid <= limit) continue;  // at most grid samples per bin anyway
        for (int64_t p = 0; p < pooled[axis]; ++p) {
          int64_t first, last;
          math::align_sample_range(a, p, T(-1), static_cast<T>(a.size), &first, &last);
          TORCH_CHECK_VALUE(
              last - first <= limit, op, ": rois[", k, "] = ", row(),
              " is too large for ", coord_name, " coordinates: ", last - first,
              " samples of one bin land on the feature map along ", axis == 0 ? "y" : "x",
              ", more than the limit max(", math::kMaxSamplingRatio,
              ", 2 * size + 8) = ", limit,
              ", because the coordinate dtype cannot tell them apart; use float64 "
              "boxes or clip the box to the image");
        }
      }
    }
  });
}

// Trusted boxes (docs/cuda.md, "Host synchronisation"): reading the box
// table on the host is a device-to-host copy, i.e. a device synchronisation
// per op call on CUDA. A caller that validated its boxes already (the ROICtrl
// adapter builds its ROIs from a validated ROICtrlInstances, once per UNet
// call) opens a thread-local trusted scope (Python:
// roi_ops._ops.trusted_boxes()), in which the value checks below are skipped;
// everything that needs no box values (shapes, dtypes, devices, sizes,
// spatial_scale, sampling_ratio) is still checked. Outside the scope, the
// default, every op reads and checks its boxes, so an overflowing box is
// refused for direct op users.
struct BoxTrust {
  static bool& trusted() {
    thread_local bool value = false;
    return value;
  }
  // How many times host code read a box table (each one a sync on CUDA);
  // read by the tests through roi_ops::_host_box_reads.
  static std::atomic<int64_t>& host_reads() {
    static std::atomic<int64_t> count{0};
    return count;
  }
};

// Every check on the values of the box operands, in one call per host
// function (`like` is the feature operand that, with rois, fixes the
// coordinate dtype): spatial_scale in that dtype, finite coordinates and
// batch indices, finite mapped boxes and, for ROI-Align (`align`), the
// sampling_ratio bound and the per-box sample bound.
inline void check_box_operands(const char* op, const at::Tensor& like,
                               const at::Tensor& rois, int64_t batch_size,
                               double spatial_scale, bool aligned,
                               const AlignSampling* align = nullptr) {
  const at::ScalarType coord = coord_type_for(like, rois);
  check_spatial_scale(op, spatial_scale, coord);
  if (align != nullptr) check_sampling_ratio(op, align->sampling_ratio);
  if (BoxTrust::trusted() || rois.size(0) == 0) return;
  // One transfer of the K x 5 table (the only host sync of the checks on
  // CUDA); every value check then runs on the host copy.
  BoxTrust::host_reads().fetch_add(1, std::memory_order_relaxed);
  const at::Tensor host = rois.is_cpu() ? rois : rois.cpu();
  check_roi_values(op, host, batch_size);
  check_roi_geometry(op, host, coord, spatial_scale, aligned, align);
}

// The blend's optional soft coverage (docs/spec.md, "Soft coverage"):
// Tensor[K, FH, FW] of base's dtype and device, each ROI's crop at least as
// large as the pixels it covers on the H x W map (its footprint, from
// math::unpool_axis). Call after check_box_operands (valid boxes); the
// footprints come from one more host copy of rois (a sync on CUDA, only when
// coverage is given).
inline void check_blend_coverage(const char* op, const at::Tensor& coverage,
                                 const at::Tensor& base, const at::Tensor& rois,
                                 double spatial_scale, bool aligned) {
  TORCH_CHECK_TYPE(coverage.scalar_type() == base.scalar_type(), op,
                   ": coverage must have base's dtype ", base.scalar_type(), ", got ",
                   coverage.scalar_type());
  TORCH_CHECK(coverage.device() == base.device(), op, ": coverage must be on base's device ",
              base.device(), ", got ", coverage.device());
  const int64_t K = rois.size(0);
  TORCH_CHECK_VALUE(coverage.dim() == 3 && coverage.size(0) == K, op,
                    ": coverage must be Tensor[K, FH, FW] with K = ", K,
                    " (one crop per ROI), got Tensor", coverage.sizes());
  if (K == 0) return;
  const int64_t H = base.size(2), W = base.size(3);
  const at::ScalarType coord = coord_type_for(base, rois);
  const at::Tensor host = rois.to(at::kCPU).to(coord).contiguous();
  int64_t need_h = 0, need_w = 0;
  dispatch_coord_type(coord, [&](auto coord_tag) {
    using T = decltype(coord_tag);
    const T* r = host.const_data_ptr<T>();
    const T scale = static_cast<T>(spatial_scale);
    for (int64_t k = 0; k < K; ++k) {
      const math::UnpoolAxes<T> a = math::unpool_axes(r + 5 * k, scale, aligned, 1, 1, H, W);
      need_h = std::max(need_h, a.y.last - a.y.first);
      need_w = std::max(need_w, a.x.last - a.x.first);
    }
  });
  TORCH_CHECK_VALUE(coverage.size(1) >= need_h && coverage.size(2) >= need_w, op,
                    ": coverage must be Tensor[K, FH, FW] with FH >= ", need_h, " and FW >= ",
                    need_w, " (the largest footprint of the ROIs on the ", H, "x", W,
                    " map; roi_ops.footprint_crops makes the crops), got Tensor",
                    coverage.sizes());
}

}  // namespace roi_ops
