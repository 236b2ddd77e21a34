// Host functions of the CUDA backend for ROI-Align and ROI-Unpool: the shared
// prologue (host_prologue.h: checks, empty cases, layouts, allocation), then
// per-image ROI lists, parameter structs and launches. They mirror
// csrc/cpu/*.cpp step for step through that same prologue (same checks, same
// empty-case results, same memory-format rule).
//
// They are templates over a Launcher so that the same host code drives the
// GPU (CudaLauncher in cuda_launcher.h: device guard, current stream,
// grid-stride kernels of kernels.cuh) and the host emulation that tests this
// backend without a GPU (tools/cuda_emulate.cpp). A Launcher is constructed
// from the device before any work (it holds the device guard) and is called
// as launch(params, n).
//
// Host-compiler code only (a .cpp includes it): nvcc then parses the heavy
// ATen headers once, not once per GPU architecture.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>

#include <cstdint>
#include <tuple>

#include "../common/host_prologue.h"
#include "roi_elements.h"

namespace roi_ops {
namespace cuda {

inline Strides4 strides4(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Per-image ROI lists, built on the device from rois [K, 5]: `order` holds
// the ROI indices grouped by image, ascending within one (a stable sort,
// which fixes every element's summation order); image b owns
// order[offsets[b]:offsets[b+1]]. No atomics, no host sync.
struct RoisByImage {
  at::Tensor order, offsets;  // int64 [K], [B + 1]
};

inline RoisByImage rois_by_image(const at::Tensor& rois, int64_t batch_size) {
  const at::Tensor batch_index = rois.select(1, 0).to(at::kLong);
  const auto sorted = at::sort(batch_index, /*stable=*/true, /*dim=*/0,
                               /*descending=*/false);
  return {std::get<1>(sorted).contiguous(),
          at::searchsorted(std::get<0>(sorted),
                           at::arange(batch_size + 1, batch_index.options()))
              .contiguous()};
}

template <typename Launcher>
at::Tensor roi_align_forward(const at::Tensor& input, const at::Tensor& rois,
                             double spatial_scale, int64_t pooled_height,
                             int64_t pooled_width, int64_t sampling_ratio,
                             bool aligned) {
  const Launcher launch(input.device());
  const AlignOperands a = align_forward_operands(input, rois, spatial_scale, pooled_height,
                                                 pooled_width, sampling_ratio, aligned);
  if (!a.has_work) return a.result;
  a.dispatch([&]<typename scalar_t, typename coord_t, typename acc_t>() {
    AlignForwardParams<scalar_t, coord_t> p;
    p.input = a.features.const_data_ptr<scalar_t>();
    p.in = strides4(a.features);
    p.height = a.shape.height;
    p.width = a.shape.width;
    p.rois = a.rois.const_data_ptr<coord_t>();
    p.spatial_scale = static_cast<coord_t>(a.spatial_scale);
    p.sampling_ratio = a.sampling_ratio;
    p.aligned = a.aligned;
    p.output = a.result.mutable_data_ptr<scalar_t>();
    p.channels = a.shape.channels;
    p.pooled_h = a.shape.pooled_h;
    p.pooled_w = a.shape.pooled_w;
    p.channels_last = a.channels_last;
    launch(p, a.result.numel());
  });
  return a.result;
}

template <typename Launcher>
at::Tensor roi_align_backward(const at::Tensor& grad, const at::Tensor& rois,
                              double spatial_scale, int64_t pooled_height,
                              int64_t pooled_width, int64_t batch_size,
                              int64_t channels, int64_t height, int64_t width,
                              int64_t sampling_ratio, bool aligned) {
  const Launcher launch(grad.device());
  const AlignOperands a = align_backward_operands(grad, rois, spatial_scale, pooled_height,
                                                  pooled_width, batch_size, channels, height,
                                                  width, sampling_ratio, aligned);
  if (!a.has_work) return a.result;
  const int64_t K = a.shape.num_rois;
  const RoisByImage groups = rois_by_image(a.rois, batch_size);
  at::Tensor footprint = at::empty({K, 4}, groups.order.options());

  a.dispatch([&]<typename scalar_t, typename coord_t, typename acc_t>() {
    const coord_t scale = static_cast<coord_t>(a.spatial_scale);

    AlignFootprintParams<coord_t> fp;
    fp.rois = a.rois.const_data_ptr<coord_t>();
    fp.order = groups.order.const_data_ptr<int64_t>();
    fp.spatial_scale = scale;
    fp.sampling_ratio = a.sampling_ratio;
    fp.aligned = a.aligned;
    fp.height = height;
    fp.width = width;
    fp.pooled_h = pooled_height;
    fp.pooled_w = pooled_width;
    fp.footprint = footprint.mutable_data_ptr<int64_t>();
    launch(fp, K);

    AlignBackwardParams<scalar_t, coord_t> p;
    p.grad = a.features.const_data_ptr<scalar_t>();
    p.g = strides4(a.features);
    p.pooled_h = pooled_height;
    p.pooled_w = pooled_width;
    p.rois = a.rois.const_data_ptr<coord_t>();
    p.order = groups.order.const_data_ptr<int64_t>();
    p.offsets = groups.offsets.const_data_ptr<int64_t>();
    p.footprint = footprint.const_data_ptr<int64_t>();
    p.spatial_scale = scale;
    p.sampling_ratio = a.sampling_ratio;
    p.aligned = a.aligned;
    p.grad_input = a.result.mutable_data_ptr<scalar_t>();
    p.channels = channels;
    p.height = height;
    p.width = width;
    p.channels_last = a.channels_last;
    launch(p, a.result.numel());
  });
  return a.result;
}

template <typename Launcher>
at::Tensor roi_unpool_forward(const at::Tensor& input, const at::Tensor& rois,
                              double spatial_scale, int64_t height, int64_t width,
                              bool aligned) {
  const Launcher launch(input.device());
  const UnpoolOperands u =
      unpool_forward_operands(input, rois, spatial_scale, height, width, aligned);
  if (!u.has_work) return u.result;
  u.dispatch([&]<typename scalar_t, typename coord_t, typename acc_t>() {
    UnpoolForwardParams<scalar_t, coord_t> p;
    p.input = u.features.const_data_ptr<scalar_t>();
    p.in = strides4(u.features);
    p.pooled_h = u.shape.pooled_h;
    p.pooled_w = u.shape.pooled_w;
    p.rois = u.rois.const_data_ptr<coord_t>();
    p.spatial_scale = static_cast<coord_t>(u.spatial_scale);
    p.aligned = u.aligned;
    p.output = u.result.mutable_data_ptr<scalar_t>();
    p.channels = u.shape.channels;
    p.height = height;
    p.width = width;
    p.channels_last = u.channels_last;
    launch(p, u.result.numel());
  });
  return u.result;
}

template <typename Launcher>
at::Tensor roi_unpool_backward(const at::Tensor& grad, const at::Tensor& rois,
                               double spatial_scale, int64_t pooled_height,
                               int64_t pooled_width, bool aligned) {
  const Launcher launch(grad.device());
  const UnpoolOperands u = unpool_backward_operands(grad, rois, spatial_scale, pooled_height,
                                                    pooled_width, aligned);
  if (!u.has_work) return u.result;
  u.dispatch([&]<typename scalar_t, typename coord_t, typename acc_t>() {
    UnpoolBackwardParams<scalar_t, coord_t> p;
    p.grad = u.features.const_data_ptr<scalar_t>();
    p.g = strides4(u.features);
    p.height = u.shape.height;
    p.width = u.shape.width;
    p.rois = u.rois.const_data_ptr<coord_t>();
    p.spatial_scale = static_cast<coord_t>(u.spatial_scale);
    p.aligned = u.aligned;
    p.grad_input = u.result.mutable_data_ptr<scalar_t>();
    p.channels = u.shape.channels;
    p.pooled_h = pooled_height;
    p.pooled_w = pooled_width;
    p.channels_last = u.channels_last;
    launch(p, u.result.numel());
  });
  return u.result;
}

}  // namespace cuda
}  // namespace roi_ops
