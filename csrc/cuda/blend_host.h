// Host functions of the fused ROI-Unpool + blend CUDA backend: validate,
// allocate, dispatch dtypes, fill parameter structs, launch. Templates over a
// Launcher like roi_host.h (the GPU launcher in roi_unpool_blend_cuda.cpp, or
// a host loop for emulation). Host-compiler code only.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

#include "../common/host_checks.h"
#include "blend_elements.h"
#include "roi_host.h"  // strides4, dispatch_value_and_coord_types

namespace roi_ops {
namespace cuda {
namespace blend {



// Tile lists on the device: a stable sort of the batch indices keeps
// ascending ROI order within an image; no atomics, no host sync.
struct TileBuffers {
  at::Tensor order, offsets, begin, count, list;
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
  const at::Tensor batch_index = r.select(1, 0).to(at::kLong);
  const auto sorted = at::sort(batch_index, /*stable=*/true, /*dim=*/0,
                               /*descending=*/false);
  t.order = std::get<1>(sorted).contiguous();
  t.offsets = at::searchsorted(std::get<0>(sorted),
                               at::arange(batch + 1, batch_index.options()))
                  .contiguous();
  t.begin = at::empty({batch * t.tiles_per_image}, batch_index.options());
  t.count = at::empty({batch * t.tiles_per_image}, batch_index.options());
  t.list = at::empty({t.tiles_per_image * K}, batch_index.options());
  TileParams<coord_t> p;
  p.geo = geo;
  p.order = t.order.const_data_ptr<int64_t>();
  p.offsets = t.offsets.const_data_ptr<int64_t>();
  p.tiles_x = t.tiles_x;
  p.tiles_per_image = t.tiles_per_image;
  p.begin = t.begin.mutable_data_ptr<int64_t>();
  p.count = t.count.mutable_data_ptr<int64_t>();
  p.list = t.list.mutable_data_ptr<int64_t>();
  launch(p, batch * t.tiles_per_image);
  return t;
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> blend_forward(
    const at::Tensor& base, const at::Tensor& base_logit, const at::Tensor& input,
    const at::Tensor& input_logit, const at::Tensor& rois, double spatial_scale,
    bool aligned) {
  constexpr const char* op = "roi_unpool_blend";
  check_blend_operands(op, base, base_logit, input, input_logit, rois);
  const Launcher launch(base.device());
  const int64_t B = base.size(0), C = base.size(1), H = base.size(2), W = base.size(3);
  check_box_operands(op, base, rois, B, spatial_scale, aligned);

  const bool channels_last = use_channels_last(base);
  at::Tensor out = at::empty({B, C, H, W}, base.options(), memory_format_of(base));
  at::Tensor base_weight = at::empty({B, H, W}, base_logit.options());
  if (B == 0 || H == 0 || W == 0) return {out, base_weight};

  const at::Tensor bl = base_logit.contiguous();
  const at::Tensor il = input_logit.contiguous();
  const at::Tensor r = rois.to(coord_type_for(base, rois)).contiguous();
  const at::Tensor stats = at::empty(
      {2, B * H * W}, base.options().dtype(at::toOpMathType(base.scalar_type())));

  dispatch_value_and_coord_types(
      base.scalar_type(), r.scalar_type(),
      [&](auto scalar_tag, auto coord_tag, auto acc_tag) {
        using scalar_t = decltype(scalar_tag);
        using coord_t = decltype(coord_tag);
        using acc_t = decltype(acc_tag);
        const Geometry<coord_t> geo{r.const_data_ptr<coord_t>(),
                                    static_cast<coord_t>(spatial_scale), aligned, H,
                                    W, input.size(2), input.size(3)};
        const TileBuffers tiles = build_tiles(launch, geo, r, B);
        acc_t* m = stats.mutable_data_ptr<acc_t>();
        acc_t* z = m + B * H * W;

        StatsParams<scalar_t, coord_t> sp;
        sp.geo = geo;
        sp.tiles = tiles.view();
        sp.base_logit = bl.const_data_ptr<scalar_t>();
        sp.input_logit = il.const_data_ptr<scalar_t>();
        sp.m = m;
        sp.z = z;
        sp.base_weight = base_weight.mutable_data_ptr<scalar_t>();
        launch(sp, B * H * W);

        BlendParams<scalar_t, coord_t> p;
        p.geo = geo;
        p.tiles = tiles.view();
        p.base = base.const_data_ptr<scalar_t>();
        p.bs = strides4(base);
        p.base_logit = bl.const_data_ptr<scalar_t>();
        p.input = input.const_data_ptr<scalar_t>();
        p.in = strides4(input);
        p.input_logit = il.const_data_ptr<scalar_t>();
        p.m = m;
        p.z = z;
        p.out = out.mutable_data_ptr<scalar_t>();
        p.channels = C;
        p.channels_last = channels_last;
        launch(p, out.numel());
      });
  return {out, base_weight};
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blend_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_base_weight,
    const at::Tensor& base, const at::Tensor& base_logit, const at::Tensor& input,
    const at::Tensor& input_logit, const at::Tensor& rois, double spatial_scale,
    bool aligned) {
  constexpr const char* op = "_roi_unpool_blend_backward";
  check_blend_operands(op, base, base_logit, input, input_logit, rois);
  const int64_t B = base.size(0), C = base.size(1), H = base.size(2), W = base.size(3);
  const int64_t K = rois.size(0), PH = input.size(2), PW = input.size(3);
  const bool has_gbw = check_blend_grads(op, grad_out, grad_base_weight, base, base_logit);
  const Launcher launch(base.device());
  check_box_operands(op, base, rois, B, spatial_scale, aligned);

  const bool channels_last = use_channels_last(base);
  const bool input_channels_last = use_channels_last(input);
  if (B == 0 || H == 0 || W == 0) {
    return {at::zeros({B, C, H, W}, base.options().memory_format(memory_format_of(base))),
            at::zeros({B, H, W}, base_logit.options()),
            at::zeros({K, C, PH, PW}, input.options().memory_format(memory_format_of(input))),
            at::zeros({K, PH, PW}, input_logit.options())};
  }
  at::Tensor grad_base = at::empty({B, C, H, W}, base.options(), memory_format_of(base));
  at::Tensor grad_base_logit = at::empty({B, H, W}, base_logit.options());
  at::Tensor grad_input = at::empty({K, C, PH, PW}, input.options(), memory_format_of(input));
  at::Tensor grad_input_logit = at::empty({K, PH, PW}, input_logit.options());

  const at::Tensor gbw = has_gbw ? grad_base_weight->contiguous() : at::Tensor();
  const at::Tensor bl = base_logit.contiguous();
  const at::Tensor il = input_logit.contiguous();
  const at::Tensor r = rois.to(coord_type_for(base, rois)).contiguous();
  const auto acc_options = base.options().dtype(at::toOpMathType(base.scalar_type()));
  const at::Tensor stats = at::empty({3, B * H * W}, acc_options);
  at::Tensor area = at::empty({K}, r.options().dtype(at::kLong));

  dispatch_value_and_coord_types(
      base.scalar_type(), r.scalar_type(),
      [&](auto scalar_tag, auto coord_tag, auto acc_tag) {
        using scalar_t = decltype(scalar_tag);
        using coord_t = decltype(coord_tag);
        using acc_t = decltype(acc_tag);
        const Geometry<coord_t> geo{r.const_data_ptr<coord_t>(),
                                    static_cast<coord_t>(spatial_scale), aligned, H,
                                    W, PH, PW};
        const TileBuffers tiles = build_tiles(launch, geo, r, B);
        const scalar_t* gbw_ptr = has_gbw ? gbw.const_data_ptr<scalar_t>() : nullptr;
        acc_t* m = stats.mutable_data_ptr<acc_t>();
        acc_t* z = m + B * H * W;
        acc_t* gout = z + B * H * W;

        PixelGradParams<scalar_t, coord_t> pp;
        pp.geo = geo;
        pp.tiles = tiles.view();
        pp.grad = grad_out.const_data_ptr<scalar_t>();
        pp.gs = strides4(grad_out);
        pp.grad_bw = gbw_ptr;
        pp.base = base.const_data_ptr<scalar_t>();
        pp.bs = strides4(base);
        pp.base_logit = bl.const_data_ptr<scalar_t>();
        pp.input = input.const_data_ptr<scalar_t>();
        pp.in = strides4(input);
        pp.input_logit = il.const_data_ptr<scalar_t>();
        pp.channels = C;
        pp.m = m;
        pp.z = z;
        pp.gout = gout;
        pp.grad_base_logit = grad_base_logit.mutable_data_ptr<scalar_t>();
        launch(pp, B * H * W);

        BaseGradParams<scalar_t> bp;
        bp.grad = grad_out.const_data_ptr<scalar_t>();
        bp.gs = strides4(grad_out);
        bp.base_logit = bl.const_data_ptr<scalar_t>();
        bp.m = m;
        bp.z = z;
        bp.grad_base = grad_base.mutable_data_ptr<scalar_t>();
        bp.channels = C;
        bp.height = H;
        bp.width = W;
        bp.channels_last = channels_last;
        launch(bp, grad_base.numel());

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
        qp.grad = grad_out.const_data_ptr<scalar_t>();
        qp.gs = strides4(grad_out);
        qp.grad_bw = gbw_ptr;
        qp.base_logit = bl.const_data_ptr<scalar_t>();
        qp.input = input.const_data_ptr<scalar_t>();
        qp.in = strides4(input);
        qp.input_logit = il.const_data_ptr<scalar_t>();
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
        gp.gs = strides4(grad_out);
        gp.out = grad_input_logit.mutable_data_ptr<scalar_t>();
        gp.channels = 1;
        gp.channels_last = false;
        launch(gp, grad_input_logit.numel());

        gp.grad = grad_out.const_data_ptr<scalar_t>();
        gp.out = grad_input.mutable_data_ptr<scalar_t>();
        gp.channels = C;
        gp.channels_last = input_channels_last;
        launch(gp, grad_input.numel());
      });
  return {grad_base, grad_base_logit, grad_input, grad_input_logit};
}

}  // namespace blend
}  // namespace cuda
}  // namespace roi_ops
