// Host functions of the CUDA backend: validate, allocate, dispatch dtypes,
// fill a parameter struct, launch. They mirror csrc/cpu/*.cpp step for step
// (same checks, same empty-case results, same memory-format rule).
//
// They are templates over a Launcher so that the same host code drives the
// GPU (CudaLauncher in roi_ops_cuda.cpp: device guard, current stream,
// grid-stride kernels of kernels.cuh) and the host emulation that tests this
// backend without a GPU (tools/cuda_emulate.cpp). A Launcher is constructed
// from the device before any work (it holds the device guard) and is called
// as launch(params, n).
//
// Host-compiler code only (a .cpp includes it): nvcc then parses the heavy
// ATen headers once, not once per GPU architecture.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <tuple>

#include "../common/host_checks.h"
#include "roi_elements.h"

namespace roi_ops {
namespace cuda {

inline Strides4 strides4(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename Launcher>
at::Tensor roi_align_forward(const at::Tensor& input, const at::Tensor& rois,
                             double spatial_scale, int64_t pooled_height,
                             int64_t pooled_width, int64_t sampling_ratio,
                             bool aligned) {
  constexpr const char* op = "roi_align";
  check_roi_align_args(op, input, rois, pooled_height, pooled_width);
  const Launcher launch(input.device());
  const AlignSampling sampling{pooled_height, pooled_width, sampling_ratio,
                               input.size(2), input.size(3)};
  check_box_operands(op, input, rois, input.size(0), spatial_scale, aligned, &sampling);

  const bool channels_last = use_channels_last(input);
  const auto format = memory_format_of(channels_last);
  const int64_t K = rois.size(0), C = input.size(1);
  const int64_t H = input.size(2), W = input.size(3);
  if (K == 0 || C == 0 || H == 0 || W == 0) {
    return empty_output(op, "output_size (pooled_height, pooled_width)",
                        {K, C, pooled_height, pooled_width}, input.options(), format,
                        /*zeroed=*/true);
  }
  at::Tensor output = empty_output(op, "output_size (pooled_height, pooled_width)",
                                   {K, C, pooled_height, pooled_width}, input.options(),
                                   format);
  const at::Tensor x = input.contiguous(format);
  const at::Tensor r = rois.to(coord_type_for(input, rois)).contiguous();

  dispatch_value_and_coord_types(
      input.scalar_type(), r.scalar_type(),
      [&](auto scalar_tag, auto coord_tag, auto /*acc_tag*/) {
        using scalar_t = decltype(scalar_tag);
        using coord_t = decltype(coord_tag);
        AlignForwardParams<scalar_t, coord_t> p;
        p.input = x.const_data_ptr<scalar_t>();
        p.in = strides4(x);
        p.height = H;
        p.width = W;
        p.rois = r.const_data_ptr<coord_t>();
        p.spatial_scale = static_cast<coord_t>(spatial_scale);
        p.sampling_ratio = sampling_ratio;
        p.aligned = aligned;
        p.output = output.mutable_data_ptr<scalar_t>();
        p.channels = C;
        p.pooled_h = pooled_height;
        p.pooled_w = pooled_width;
        p.channels_last = channels_last;
        launch(p, output.numel());
      });
  return output;
}

template <typename Launcher>
at::Tensor roi_align_backward(const at::Tensor& grad, const at::Tensor& rois,
                              double spatial_scale, int64_t pooled_height,
                              int64_t pooled_width, int64_t batch_size,
                              int64_t channels, int64_t height, int64_t width,
                              int64_t sampling_ratio, bool aligned) {
  constexpr const char* op = "_roi_align_backward";
  check_roi_align_backward_args(op, grad, rois, pooled_height, pooled_width,
                                batch_size, channels, height, width);
  const int64_t K = rois.size(0);
  const Launcher launch(grad.device());
  const AlignSampling sampling{pooled_height, pooled_width, sampling_ratio, height, width};
  check_box_operands(op, grad, rois, batch_size, spatial_scale, aligned, &sampling);

  const bool channels_last = use_channels_last(grad);
  const auto format = memory_format_of(channels_last);
  if (K == 0 || channels == 0 || height == 0 || width == 0 || batch_size == 0) {
    return at::zeros({batch_size, channels, height, width},
                     grad.options().memory_format(format));
  }
  at::Tensor grad_input =
      at::empty({batch_size, channels, height, width}, grad.options(), format);
  const at::Tensor g = grad.contiguous(format);
  const at::Tensor r = rois.to(coord_type_for(grad, rois)).contiguous();

  // Per-image ROI lists, built on the device: a stable sort keeps ascending
  // ROI order within an image, which fixes every element's summation order.
  const at::Tensor batch_index = r.select(1, 0).to(at::kLong);
  const auto sorted = at::sort(batch_index, /*stable=*/true, /*dim=*/0,
                               /*descending=*/false);
  const at::Tensor order = std::get<1>(sorted).contiguous();
  const at::Tensor offsets =
      at::searchsorted(std::get<0>(sorted),
                       at::arange(batch_size + 1, batch_index.options()))
          .contiguous();
  at::Tensor footprint = at::empty({K, 4}, batch_index.options());

  dispatch_value_and_coord_types(
      grad.scalar_type(), r.scalar_type(),
      [&](auto scalar_tag, auto coord_tag, auto /*acc_tag*/) {
        using scalar_t = decltype(scalar_tag);
        using coord_t = decltype(coord_tag);
        const coord_t scale = static_cast<coord_t>(spatial_scale);

        AlignFootprintParams<coord_t> fp;
        fp.rois = r.const_data_ptr<coord_t>();
        fp.order = order.const_data_ptr<int64_t>();
        fp.spatial_scale = scale;
        fp.sampling_ratio = sampling_ratio;
        fp.aligned = aligned;
        fp.height = height;
        fp.width = width;
        fp.pooled_h = pooled_height;
        fp.pooled_w = pooled_width;
        fp.footprint = footprint.mutable_data_ptr<int64_t>();
        launch(fp, K);

        AlignBackwardParams<scalar_t, coord_t> p;
        p.grad = g.const_data_ptr<scalar_t>();
        p.g = strides4(g);
        p.pooled_h = pooled_height;
        p.pooled_w = pooled_width;
        p.rois = r.const_data_ptr<coord_t>();
        p.order = order.const_data_ptr<int64_t>();
        p.offsets = offsets.const_data_ptr<int64_t>();
        p.footprint = footprint.const_data_ptr<int64_t>();
        p.spatial_scale = scale;
        p.sampling_ratio = sampling_ratio;
        p.aligned = aligned;
        p.grad_input = grad_input.mutable_data_ptr<scalar_t>();
        p.channels = channels;
        p.height = height;
        p.width = width;
        p.channels_last = channels_last;
        launch(p, grad_input.numel());
      });
  return grad_input;
}

template <typename Launcher>
at::Tensor roi_unpool_forward(const at::Tensor& input, const at::Tensor& rois,
                              double spatial_scale, int64_t height, int64_t width,
                              bool aligned) {
  constexpr const char* op = "roi_unpool";
  check_roi_unpool_args(op, input, rois, height, width);
  const int64_t K = rois.size(0);
  const Launcher launch(input.device());
  // Unpool does not read the batch index, but the box contract is shared.
  check_box_operands(op, input, rois, INT64_MAX, spatial_scale, aligned);

  const bool channels_last = use_channels_last(input);
  const auto format = memory_format_of(channels_last);
  const int64_t C = input.size(1), PH = input.size(2), PW = input.size(3);
  if (K == 0 || C == 0 || PH == 0 || PW == 0) {
    return empty_output(op, "output_size (height, width)", {K, C, height, width},
                        input.options(), format, /*zeroed=*/true);
  }
  at::Tensor output = empty_output(op, "output_size (height, width)",
                                   {K, C, height, width}, input.options(), format);
  const at::Tensor x = input.contiguous(format);
  const at::Tensor r = rois.to(coord_type_for(input, rois)).contiguous();

  dispatch_value_and_coord_types(
      input.scalar_type(), r.scalar_type(),
      [&](auto scalar_tag, auto coord_tag, auto /*acc_tag*/) {
        using scalar_t = decltype(scalar_tag);
        using coord_t = decltype(coord_tag);
        UnpoolForwardParams<scalar_t, coord_t> p;
        p.input = x.const_data_ptr<scalar_t>();
        p.in = strides4(x);
        p.pooled_h = PH;
        p.pooled_w = PW;
        p.rois = r.const_data_ptr<coord_t>();
        p.spatial_scale = static_cast<coord_t>(spatial_scale);
        p.aligned = aligned;
        p.output = output.mutable_data_ptr<scalar_t>();
        p.channels = C;
        p.height = height;
        p.width = width;
        p.channels_last = channels_last;
        launch(p, output.numel());
      });
  return output;
}

template <typename Launcher>
at::Tensor roi_unpool_backward(const at::Tensor& grad, const at::Tensor& rois,
                               double spatial_scale, int64_t pooled_height,
                               int64_t pooled_width, bool aligned) {
  constexpr const char* op = "_roi_unpool_backward";
  check_roi_unpool_backward_args(op, grad, rois, pooled_height, pooled_width);
  const int64_t K = rois.size(0);
  const Launcher launch(grad.device());
  check_box_operands(op, grad, rois, INT64_MAX, spatial_scale, aligned);

  const bool channels_last = use_channels_last(grad);
  const auto format = memory_format_of(channels_last);
  const int64_t C = grad.size(1), H = grad.size(2), W = grad.size(3);
  if (K == 0 || C == 0 || H == 0 || W == 0 || pooled_height == 0 || pooled_width == 0) {
    return at::zeros({K, C, pooled_height, pooled_width},
                     grad.options().memory_format(format));
  }
  at::Tensor grad_input =
      at::empty({K, C, pooled_height, pooled_width}, grad.options(), format);
  const at::Tensor g = grad.contiguous(format);
  const at::Tensor r = rois.to(coord_type_for(grad, rois)).contiguous();

  dispatch_value_and_coord_types(
      grad.scalar_type(), r.scalar_type(),
      [&](auto scalar_tag, auto coord_tag, auto /*acc_tag*/) {
        using scalar_t = decltype(scalar_tag);
        using coord_t = decltype(coord_tag);
        UnpoolBackwardParams<scalar_t, coord_t> p;
        p.grad = g.const_data_ptr<scalar_t>();
        p.g = strides4(g);
        p.height = H;
        p.width = W;
        p.rois = r.const_data_ptr<coord_t>();
        p.spatial_scale = static_cast<coord_t>(spatial_scale);
        p.aligned = aligned;
        p.grad_input = grad_input.mutable_data_ptr<scalar_t>();
        p.channels = C;
        p.pooled_h = pooled_height;
        p.pooled_w = pooled_width;
        p.channels_last = channels_last;
        launch(p, grad_input.numel());
      });
  return grad_input;
}

}  // namespace cuda
}  // namespace roi_ops
