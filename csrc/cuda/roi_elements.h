// Per-element bodies of the CUDA kernels: one call computes one output
// element from raw pointers and a plain parameter struct.
//
// They are C10_HOST_DEVICE and free of CUDA-only constructs on purpose: the
// one __global__ kernel template (kernels.cuh) only wraps apply_element in a
// grid-stride loop, and a host build runs the very same bodies element by
// element (tools/cuda_emulate.cpp, run by `make cuda-check`), which is how
// they are tested on machines without a GPU. All geometry comes from
// csrc/common/roi_math.h.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "../common/roi_math.h"

namespace roi_ops {
namespace cuda {

// Element strides of a 4-D tensor [N, C, H, W].
struct Strides4 {
  int64_t n, c, h, w;
};

struct Index4 {
  int64_t n, c, h, w;
};

// The linear index of a thread -> (n, c, h, w). With channels_last the
// channel varies fastest, so consecutive threads read and write consecutive
// channels (coalesced); otherwise w does. Either way the linear index is the
// element's offset in an output that is contiguous in that memory format.
C10_HOST_DEVICE inline Index4 unravel(int64_t i, int64_t C, int64_t H, int64_t W,
                                      bool channels_last) {
  Index4 r;
  if (channels_last) {
    r.c = i % C;
    i /= C;
    r.w = i % W;
    i /= W;
    r.h = i % H;
    r.n = i / H;
  } else {
    r.w = i % W;
    i /= W;
    r.h = i % H;
    i /= H;
    r.c = i % C;
    r.n = i / C;
  }
  return r;
}

template <typename scalar_t>
C10_HOST_DEVICE inline at::opmath_type<scalar_t> load(const scalar_t* p) {
  return static_cast<at::opmath_type<scalar_t>>(*p);
}

// ---------------------------------------------------------------- ROI-Align

template <typename scalar_t, typename coord_t>
struct AlignForwardParams {
  const scalar_t* input;  // [B, C, H, W]
  Strides4 in;
  int64_t height, width;
  const coord_t* rois;  // [K, 5], contiguous
  coord_t spatial_scale;
  int64_t sampling_ratio;
  bool aligned;
  scalar_t* output;  // [K, C, PH, PW], contiguous in the working format
  int64_t channels, pooled_h, pooled_w;
  bool channels_last;
};

// output[k, c, ph, pw] = mean over the bin's samples of the bilinear value.
template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline void align_forward_element(
    const AlignForwardParams<scalar_t, coord_t>& p, int64_t i) {
  using acc_t = at::opmath_type<scalar_t>;
  const Index4 o = unravel(i, p.channels, p.pooled_h, p.pooled_w, p.channels_last);
  const coord_t* roi = p.rois + o.n * 5;
  const int64_t b = static_cast<int64_t>(roi[0]);
  const auto [ay, ax] = math::align_axes(roi, p.spatial_scale, p.aligned, p.pooled_h,
                                         p.pooled_w, p.sampling_ratio, p.height, p.width);

  // Only samples in [-1, size] can contribute (the CPU kernels narrow the
  // same way, so both enumerate the same samples).
  int64_t iy0, iy1, ix0, ix1;
  math::align_sample_range(ay, o.h, coord_t(-1), static_cast<coord_t>(p.height),
                           &iy0, &iy1);
  math::align_sample_range(ax, o.w, coord_t(-1), static_cast<coord_t>(p.width),
                           &ix0, &ix1);

  const scalar_t* plane = p.input + b * p.in.n + o.c * p.in.c;
  acc_t sum = acc_t(0);
  for (int64_t iy = iy0; iy < iy1; ++iy) {
    const math::Tap<coord_t> ty =
        math::align_tap(math::align_sample(ay, o.h, iy), p.height);
    if (!ty.valid) continue;
    const scalar_t* row_lo = plane + ty.lo * p.in.h;
    const scalar_t* row_hi = plane + ty.hi * p.in.h;
    for (int64_t ix = ix0; ix < ix1; ++ix) {
      const math::Tap<coord_t> tx =
          math::align_tap(math::align_sample(ax, o.w, ix), p.width);
      if (!tx.valid) continue;
      const int64_t xl = tx.lo * p.in.w, xh = tx.hi * p.in.w;
      sum += static_cast<acc_t>(ty.w_lo * tx.w_lo) * load(row_lo + xl) +
             static_cast<acc_t>(ty.w_lo * tx.w_hi) * load(row_lo + xh) +
             static_cast<acc_t>(ty.w_hi * tx.w_lo) * load(row_hi + xl) +
             static_cast<acc_t>(ty.w_hi * tx.w_hi) * load(row_hi + xh);
    }
  }
  // max(gh * gw, 1) as a float: gh * gw can pass int64 for absurd boxes
  acc_t count = static_cast<acc_t>(ay.grid) * static_cast<acc_t>(ax.grid);
  if (!(count >= acc_t(1))) count = acc_t(1);
  p.output[i] = static_cast<scalar_t>(sum / count);
}

// Conservative pixel footprint [row0, row1) x [col0, col1) of every ROI, in
// the order of the per-image ROI list, so the backward can skip ROIs that
// cannot touch a pixel with four integer compares.
template <typename coord_t>
struct AlignFootprintParams {
  const coord_t* rois;
  const int64_t* order;  // ROI indices grouped by image
  coord_t spatial_scale;
  int64_t sampling_ratio;
  bool aligned;
  int64_t height, width, pooled_h, pooled_w;
  int64_t* footprint;  // [K, 4]: row0, row1, col0, col1
};

template <typename coord_t>
C10_HOST_DEVICE inline void align_footprint_element(
    const AlignFootprintParams<coord_t>& p, int64_t j) {
  const coord_t* roi = p.rois + p.order[j] * 5;
  const auto [ay, ax] = math::align_axes(roi, p.spatial_scale, p.aligned, p.pooled_h,
                                         p.pooled_w, p.sampling_ratio, p.height, p.width);
  int64_t* out = p.footprint + 4 * j;
  math::align_footprint(ay, p.pooled_h, out + 0, out + 1);
  math::align_footprint(ax, p.pooled_w, out + 2, out + 3);
}

template <typename scalar_t, typename coord_t>
struct AlignBackwardParams {
  const scalar_t* grad;  // [K, C, PH, PW]
  Strides4 g;
  int64_t pooled_h, pooled_w;
  const coord_t* rois;        // [K, 5], contiguous
  const int64_t* order;       // [K]: ROI indices grouped by image, ascending within one
  const int64_t* offsets;     // [B + 1]: image b owns order[offsets[b]:offsets[b+1]]
  const int64_t* footprint;   // [K, 4], by position in `order`
  coord_t spatial_scale;
  int64_t sampling_ratio;
  bool aligned;
  scalar_t* grad_input;  // [B, C, H, W], contiguous in the working format
  int64_t channels, height, width;
  bool channels_last;
};

// Sum over the bin's samples (those the forward enumerates) of the 1-D weight
// with which they read pixel h; [lo, hi] is h's touch window. Returns false
// when no sample reads h.
template <typename coord_t>
C10_HOST_DEVICE inline bool align_bin_weight(const math::AlignAxis<coord_t>& a,
                                             int64_t p, int64_t h, coord_t lo,
                                             coord_t hi, coord_t* weight) {
  int64_t s0, s1;
  math::align_sample_range(a, p, lo, hi, &s0, &s1);
  // The forward enumerates align_sample_range(a, p, -1, size). The range is
  // monotonic in its bounds, so inside [-1, size] the touch range is already
  // a subset; only windows widened past the map's ends need the intersection.
  if (lo < coord_t(-1) || hi > static_cast<coord_t>(a.size)) {
    int64_t f0, f1;
    math::align_sample_range(a, p, coord_t(-1), static_cast<coord_t>(a.size), &f0,
                             &f1);
    if (f0 > s0) s0 = f0;
    if (f1 < s1) s1 = f1;
  }
  bool any = false;
  coord_t sum = coord_t(0);
  for (int64_t s = s0; s < s1; ++s) {
    coord_t w;
    if (math::tap_weight_at(math::align_tap(math::align_sample(a, p, s), a.size), h,
                            &w)) {
      sum += w;
      any = true;
    }
  }
  *weight = sum;
  return any;
}

// Column weights of up to this many bins are computed once per (pixel, ROI)
// and reused for every row bin; wider ranges (bins much smaller than a
// pixel) recompute them.
constexpr int kAlignColumnCache = 16;

// grad_input[b, c, h, w] = sum over the ROIs of image b (ascending index),
// the bins whose samples read (h, w), of grad[k, c, ph, pw] times the
// bilinear weight / count: the exact adjoint of align_forward_element, summed
// in a fixed order.
template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline void align_backward_element(
    const AlignBackwardParams<scalar_t, coord_t>& p, int64_t i) {
  using acc_t = at::opmath_type<scalar_t>;
  const Index4 o = unravel(i, p.channels, p.height, p.width, p.channels_last);
  acc_t total = acc_t(0);
  for (int64_t j = p.offsets[o.n], end = p.offsets[o.n + 1]; j < end; ++j) {
    const int64_t* fp = p.footprint + 4 * j;
    if (o.h < fp[0] || o.h >= fp[1] || o.w < fp[2] || o.w >= fp[3]) continue;
    const int64_t k = p.order[j];
    const auto [ay, ax] = math::align_axes(p.rois + k * 5, p.spatial_scale, p.aligned,
                                           p.pooled_h, p.pooled_w, p.sampling_ratio,
                                           p.height, p.width);
    coord_t ylo, yhi, xlo, xhi;
    math::align_touch_window(ay, p.pooled_h, o.h, &ylo, &yhi);
    math::align_touch_window(ax, p.pooled_w, o.w, &xlo, &xhi);
    int64_t ph0, ph1, pw0, pw1;
    math::align_bin_range(ay, p.pooled_h, ylo, yhi, &ph0, &ph1);
    math::align_bin_range(ax, p.pooled_w, xlo, xhi, &pw0, &pw1);
    if (ph0 >= ph1 || pw0 >= pw1) continue;

    coord_t wx_cache[kAlignColumnCache];
    uint32_t wx_hit = 0;  // bit q: bin pw0 + q reads column w
    const bool cached = pw1 - pw0 <= kAlignColumnCache;
    if (cached) {
      for (int q = 0; q < pw1 - pw0; ++q) {
        if (align_bin_weight(ax, pw0 + q, o.w, xlo, xhi, &wx_cache[q])) {
          wx_hit |= uint32_t(1) << q;
        }
      }
      if (wx_hit == 0) continue;
    }

    const scalar_t* g = p.grad + k * p.g.n + o.c * p.g.c;
    acc_t roi_sum = acc_t(0);
    for (int64_t ph = ph0; ph < ph1; ++ph) {
      coord_t wy;
      if (!align_bin_weight(ay, ph, o.h, ylo, yhi, &wy)) continue;
      const scalar_t* g_row = g + ph * p.g.h;
      acc_t row = acc_t(0);
      for (int64_t pw = pw0; pw < pw1; ++pw) {
        coord_t wx;
        if (cached) {
          const int q = static_cast<int>(pw - pw0);
          if (!((wx_hit >> q) & 1u)) continue;
          wx = wx_cache[q];
        } else if (!align_bin_weight(ax, pw, o.w, xlo, xhi, &wx)) {
          continue;
        }
        row += static_cast<acc_t>(wx) * load(g_row + pw * p.g.w);
      }
      roi_sum += static_cast<acc_t>(wy) * row;
    }
    acc_t count = static_cast<acc_t>(ay.grid) * static_cast<acc_t>(ax.grid);
    if (!(count >= acc_t(1))) count = acc_t(1);
    total += roi_sum / count;
  }
  p.grad_input[i] = static_cast<scalar_t>(total);
}

// ---------------------------------------------------------------- ROI-Unpool

template <typename scalar_t, typename coord_t>
struct UnpoolForwardParams {
  const scalar_t* input;  // [K, C, PH, PW]
  Strides4 in;
  int64_t pooled_h, pooled_w;
  const coord_t* rois;  // [K, 5], contiguous
  coord_t spatial_scale;
  bool aligned;
  scalar_t* output;  // [K, C, H, W], contiguous in the working format
  int64_t channels, height, width;
  bool channels_last;
};

// output[k, c, h, w]: clamped bilinear read of grid k where ROI k covers
// (h, w), exactly 0 elsewhere.
template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline void unpool_forward_element(
    const UnpoolForwardParams<scalar_t, coord_t>& p, int64_t i) {
  using acc_t = at::opmath_type<scalar_t>;
  const Index4 o = unravel(i, p.channels, p.height, p.width, p.channels_last);
  const auto [ay, ax] = math::unpool_axes(p.rois + o.n * 5, p.spatial_scale, p.aligned,
                                          p.pooled_h, p.pooled_w, p.height, p.width);
  if (o.h < ay.first || o.h >= ay.last || o.w < ax.first || o.w >= ax.last) {
    p.output[i] = scalar_t(0);
    return;
  }
  const math::Tap<coord_t> ty = math::unpool_tap(ay, o.h);
  const math::Tap<coord_t> tx = math::unpool_tap(ax, o.w);
  const scalar_t* grid = p.input + o.n * p.in.n + o.c * p.in.c;
  const scalar_t* row_lo = grid + ty.lo * p.in.h;
  const scalar_t* row_hi = grid + ty.hi * p.in.h;
  const int64_t xl = tx.lo * p.in.w, xh = tx.hi * p.in.w;
  // the one clamped-bilinear evaluation, as on the CPU (bitwise)
  const acc_t v = math::unpool_lerp(math::tap_cast<acc_t>(ty), math::tap_cast<acc_t>(tx),
                                    load(row_lo + xl), load(row_lo + xh),
                                    load(row_hi + xl), load(row_hi + xh));
  p.output[i] = static_cast<scalar_t>(v);
}

template <typename scalar_t, typename coord_t>
struct UnpoolBackwardParams {
  const scalar_t* grad;  // [K, C, H, W]
  Strides4 g;
  int64_t height, width;
  const coord_t* rois;  // [K, 5], contiguous
  coord_t spatial_scale;
  bool aligned;
  scalar_t* grad_input;  // [K, C, PH, PW], contiguous in the working format
  int64_t channels, pooled_h, pooled_w;
  bool channels_last;
};

// grad_input[k, c, i, j] = sum over the covered pixels whose taps read cell
// (i, j) of their weight times grad[k, c, h, w]: the exact adjoint of
// unpool_forward_element, rows then columns in ascending order.
template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline void unpool_backward_element(
    const UnpoolBackwardParams<scalar_t, coord_t>& p, int64_t i) {
  using acc_t = at::opmath_type<scalar_t>;
  const Index4 o = unravel(i, p.channels, p.pooled_h, p.pooled_w, p.channels_last);
  const auto [ay, ax] = math::unpool_axes(p.rois + o.n * 5, p.spatial_scale, p.aligned,
                                          p.pooled_h, p.pooled_w, p.height, p.width);
  int64_t h0, h1, w0, w1;
  math::unpool_pixel_range(ay, o.h, &h0, &h1);
  math::unpool_pixel_range(ax, o.w, &w0, &w1);
  const scalar_t* g = p.grad + o.n * p.g.n + o.c * p.g.c;
  acc_t sum = acc_t(0);
  for (int64_t h = h0; h < h1; ++h) {
    coord_t wy;
    if (!math::tap_weight_at(math::unpool_tap(ay, h), o.h, &wy)) continue;
    const scalar_t* row = g + h * p.g.h;
    acc_t row_sum = acc_t(0);
    for (int64_t w = w0; w < w1; ++w) {
      coord_t wx;
      if (!math::tap_weight_at(math::unpool_tap(ax, w), o.w, &wx)) continue;
      row_sum += static_cast<acc_t>(wx) * load(row + w * p.g.w);
    }
    sum += static_cast<acc_t>(wy) * row_sum;
  }
  p.grad_input[i] = static_cast<scalar_t>(sum);
}

// One overload per kernel: the launchers call apply_element(params, i).
template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline void apply_element(
    const AlignForwardParams<scalar_t, coord_t>& p, int64_t i) {
  align_forward_element(p, i);
}
template <typename coord_t>
C10_HOST_DEVICE inline void apply_element(const AlignFootprintParams<coord_t>& p,
                                          int64_t i) {
  align_footprint_element(p, i);
}
template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline void apply_element(
    const AlignBackwardParams<scalar_t, coord_t>& p, int64_t i) {
  align_backward_element(p, i);
}
template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline void apply_element(
    const UnpoolForwardParams<scalar_t, coord_t>& p, int64_t i) {
  unpool_forward_element(p, i);
}
template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline void apply_element(
    const UnpoolBackwardParams<scalar_t, coord_t>& p, int64_t i) {
  unpool_backward_element(p, i);
}

}  // namespace cuda
}  // namespace roi_ops
