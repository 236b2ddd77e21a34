// Host functions of the fused ROI-Unpool + blend CUDA backend: the shared
// prologue (host_prologue.h), then the tile lists, parameter structs and
// launches. Templates over a Launcher like roi_host.h (CudaLauncher on the
// GPU, or a host loop for emulation). Host-compiler code only.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../common/host_prologue.h"
#include "blend_elements.h"
#include "roi_host.h"  // strides4, rois_by_image

namespace roi_ops {
namespace cuda {
namespace blend {

// Tile lists on the device: a stable sort of the batch indices keeps
// ascending ROI order within an image; no atomics, no host sync.
struct TileBuffers {
  RoisByImage groups;
  at::Tensor begin, count, list;
  int64_t tiles_x = 0, tiles_per_image = 0;

  Tiles view() const {
    return Tiles{begin.const_data_ptr<int64_t>(), count.const_data_ptr<int64_t>(),
                 list.const_data_ptr<int64_t>(), tiles_x, tiles_per_image};
  }
};

template <typename Launcher, typename coord_t>
TileBuffers build_tiles(const Launcher& launch, const Geometry<coord_t>& geo,
                        const at::Tensor& r, int64_t batch) {
  TileBuffers t;
  const int64_t K = r.size(0);
  t.tiles_x = (geo.width + kTile - 1) / kTile;
  t.tiles_per_image = t.tiles_x * ((geo.height + kTile - 1) / kTile);
  t.groups = rois_by_image(r, batch);
  const auto index_options = t.groups.order.options();
  t.begin = at::empty({batch * t.tiles_per_image}, index_options);
  t.count = at::empty({batch * t.tiles_per_image}, index_options);
  t.list = at::empty({t.tiles_per_image * K}, index_options);
  TileParams<coord_t> p;
  p.geo = geo;
  p.order = t.groups.order.const_data_ptr<int64_t>();
  p.offsets = t.groups.offsets.const_data_ptr<int64_t>();
  p.tiles_x = t.tiles_x;
  p.tiles_per_image = t.tiles_per_image;
  p.begin = t.begin.mutable_data_ptr<int64_t>();
  p.count = t.count.mutable_data_ptr<int64_t>();
  p.list = t.list.mutable_data_ptr<int64_t>();
  launch(p, batch * t.tiles_per_image);
  return t;
}

template <typename scalar_t>
CoverageView<scalar_t> coverage_view(const BlendOperands& o) {
  if (!o.coverage.defined()) return {nullptr, 0, 0};
  return {o.coverage.const_data_ptr<scalar_t>(), o.coverage.size(1), o.coverage.size(2)};
}

template <typename coord_t>
Geometry<coord_t> geometry(const BlendOperands& o) {
  return {o.rois.const_data_ptr<coord_t>(), static_cast<coord_t>(o.spatial_scale), o.aligned,
          o.shape.height, o.shape.width, o.shape.pooled_h, o.shape.pooled_w};
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> blend_forward(
    const at::Tensor& base, const at::Tensor& base_logit, const at::Tensor& input,
    const at::Tensor& input_logit, const at::Tensor& rois, double spatial_scale,
    bool aligned, const std::optional<at::Tensor>& coverage) {
  const Launcher launch(base.device());
  const BlendOperands o = blend_forward_operands(base, base_logit, input, input_logit, rois,
                                                 spatial_scale, aligned, coverage);
  if (!o.has_work) return {o.out, o.base_weight};
  const int64_t pixels = o.shape.batch * o.shape.height * o.shape.width;
  const at::Tensor stats =
      at::empty({2, pixels}, base.options().dtype(at::toOpMathType(base.scalar_type())));

  o.dispatch([&]<typename scalar_t, typename coord_t, typename acc_t>() {
    const Geometry<coord_t> geo = geometry<coord_t>(o);
    const TileBuffers tiles = build_tiles(launch, geo, o.rois, o.shape.batch);
    acc_t* m = stats.mutable_data_ptr<acc_t>();
    acc_t* z = m + pixels;

    StatsParams<scalar_t, coord_t> sp;
    sp.geo = geo;
    sp.tiles = tiles.view();
    sp.base_logit = o.base_logit.const_data_ptr<scalar_t>();
    sp.input_logit = o.input_logit.const_data_ptr<scalar_t>();
    sp.coverage = coverage_view<scalar_t>(o);
    sp.m = m;
    sp.z = z;
    sp.base_weight = o.base_weight.mutable_data_ptr<scalar_t>();
    launch(sp, pixels);

    BlendParams<scalar_t, coord_t> p;
    p.geo = geo;
    p.tiles = tiles.view();
    p.base = o.base.const_data_ptr<scalar_t>();
    p.bs = strides4(o.base);
    p.base_logit = o.base_logit.const_data_ptr<scalar_t>();
    p.input = o.input.const_data_ptr<scalar_t>();
    p.in = strides4(o.input);
    p.input_logit = o.input_logit.const_data_ptr<scalar_t>();
    p.coverage = coverage_view<scalar_t>(o);
    p.m = m;
    p.z = z;
    p.out = o.out.mutable_data_ptr<scalar_t>();
    p.channels = o.shape.channels;
    p.channels_last = o.channels_last;
    launch(p, o.out.numel());
  });
  return {o.out, o.base_weight};
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> blend_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_base_weight,
    const at::Tensor& base, const at::Tensor& base_logit, const at::Tensor& input,
    const at::Tensor& input_logit, const at::Tensor& rois, double spatial_scale,
    bool aligned, const std::optional<at::Tensor>& coverage) {
  const Launcher launch(base.device());
  const BlendOperands o = blend_backward_operands(grad_out, grad_base_weight, base, base_logit,
                                                  input, input_logit, rois, spatial_scale,
                                                  aligned, coverage);
  if (!o.has_work) {
    return {o.grad_base, o.grad_base_logit, o.grad_input, o.grad_input_logit, o.grad_coverage};
  }
  const int64_t C = o.shape.channels, K = o.shape.num_rois;
  const int64_t pixels = o.shape.batch * o.shape.height * o.shape.width;
  const auto acc_options = base.options().dtype(at::toOpMathType(base.scalar_type()));
  const at::Tensor stats = at::empty({3, pixels}, acc_options);
  at::Tensor area = at::empty({K}, o.rois.options().dtype(at::kLong));

  o.dispatch([&]<typename scalar_t, typename coord_t, typename acc_t>() {
    const Geometry<coord_t> geo = geometry<coord_t>(o);
    const TileBuffers tiles = build_tiles(launch, geo, o.rois, o.shape.batch);
    const scalar_t* gbw_ptr =
        o.grad_base_weight.defined() ? o.grad_base_weight.const_data_ptr<scalar_t>() : nullptr;
    acc_t* m = stats.mutable_data_ptr<acc_t>();
    acc_t* z = m + pixels;
    acc_t* gout = z + pixels;

    PixelGradParams<scalar_t, coord_t> pp;
    pp.geo = geo;
    pp.tiles = tiles.view();
    pp.grad = o.grad_out.const_data_ptr<scalar_t>();
    pp.gs = strides4(o.grad_out);
    pp.grad_bw = gbw_ptr;
    pp.base = o.base.const_data_ptr<scalar_t>();
    pp.bs = strides4(o.base);
    pp.base_logit = o.base_logit.const_data_ptr<scalar_t>();
    pp.input = o.input.const_data_ptr<scalar_t>();
    pp.in = strides4(o.input);
    pp.input_logit = o.input_logit.const_data_ptr<scalar_t>();
    pp.coverage = coverage_view<scalar_t>(o);
    pp.channels = C;
    pp.m = m;
    pp.z = z;
    pp.gout = gout;
    pp.grad_base_logit = o.grad_base_logit.mutable_data_ptr<scalar_t>();
    launch(pp, pixels);

    BaseGradParams<scalar_t> bp;
    bp.grad = o.grad_out.const_data_ptr<scalar_t>();
    bp.gs = strides4(o.grad_out);
    bp.base_logit = o.base_logit.const_data_ptr<scalar_t>();
    bp.m = m;
    bp.z = z;
    bp.grad_base = o.grad_base.mutable_data_ptr<scalar_t>();
    bp.channels = C;
    bp.height = o.shape.height;
    bp.width = o.shape.width;
    bp.channels_last = o.channels_last;
    launch(bp, o.grad_base.numel());

    if (K == 0) return;
    AreaParams<coord_t> ap{geo, area.mutable_data_ptr<int64_t>()};
    launch(ap, K);
    const at::Tensor end = at::cumsum(area, 0).contiguous();
    const int64_t pairs = end[K - 1].item<int64_t>();  // one sync, as the box checks
    const at::Tensor per_pair = at::empty({2, pairs}, acc_options);
    acc_t* weight = per_pair.mutable_data_ptr<acc_t>();
    acc_t* logit_grad = weight + pairs;

    PairParams<scalar_t, coord_t> qp;
    qp.geo = geo;
    qp.end = end.const_data_ptr<int64_t>();
    qp.num_rois = K;
    qp.grad = o.grad_out.const_data_ptr<scalar_t>();
    qp.gs = strides4(o.grad_out);
    qp.grad_bw = gbw_ptr;
    qp.base_logit = o.base_logit.const_data_ptr<scalar_t>();
    qp.input = o.input.const_data_ptr<scalar_t>();
    qp.in = strides4(o.input);
    qp.input_logit = o.input_logit.const_data_ptr<scalar_t>();
    qp.coverage = coverage_view<scalar_t>(o);
    qp.grad_coverage =
        o.coverage.defined() ? o.grad_coverage.mutable_data_ptr<scalar_t>() : nullptr;
    qp.channels = C;
    qp.m = m;
    qp.z = z;
    qp.gout = gout;
    qp.weight = weight;
    qp.logit_grad = logit_grad;
    launch(qp, pairs);

    GridGradParams<scalar_t, coord_t> gp;
    gp.geo = geo;
    gp.end = end.const_data_ptr<int64_t>();
    gp.weight = weight;
    gp.logit_grad = logit_grad;
    gp.grad = nullptr;
    gp.gs = strides4(o.grad_out);
    gp.out = o.grad_input_logit.mutable_data_ptr<scalar_t>();
    gp.channels = 1;
    gp.channels_last = false;
    launch(gp, o.grad_input_logit.numel());

    gp.grad = o.grad_out.const_data_ptr<scalar_t>();
    gp.out = o.grad_input.mutable_data_ptr<scalar_t>();
    gp.channels = C;
    gp.channels_last = o.input_channels_last;
    launch(gp, o.grad_input.numel());
  });
  return {o.grad_base, o.grad_base_logit, o.grad_input, o.grad_input_logit, o.grad_coverage};
}

}  // namespace blend
}  // namespace cuda
}  // namespace roi_ops
