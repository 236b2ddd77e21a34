// The dtypes a host function works in, shared by the CPU and CUDA backends
// (host code only): the coordinate dtype of the box arithmetic and the
// dispatch over (value, coordinate, accumulation) types.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

namespace roi_ops {

// Box arithmetic runs in float64 when either tensor is float64, else float32.
inline at::ScalarType coord_type_for(const at::Tensor& input,
                                     const at::Tensor& rois) {
  return (input.scalar_type() == at::kDouble ||
          rois.scalar_type() == at::kDouble)
             ? at::kDouble
             : at::kFloat;
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

// Every host function's dispatch: calls f.template operator()<scalar_t,
// coord_t, acc_t>() (f a template lambda, `[&]<typename scalar_t, typename
// coord_t, typename acc_t>() {...}`) for the value dtype (float, double, Half
// or BFloat16, checked before dispatch), the ROI coordinate dtype (see
// coord_type_for) and the accumulation type.
template <typename F>
void dispatch_value_and_coord_types(at::ScalarType value, at::ScalarType coord,
                                    F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value, "roi_ops", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_coord_type(coord, [&](auto coord_tag) {
      f.template operator()<scalar_t, decltype(coord_tag), acc_t>();
    });
  });
}

}  // namespace roi_ops
