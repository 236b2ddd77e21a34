// Per-element bodies of the fused ROI-Unpool + blend CUDA kernels
// (docs/spec.md, "Fused paste-back and blend"): one call computes one
// output element from raw pointers and a plain parameter struct, as in
// roi_elements.h; C10_HOST_DEVICE and free of CUDA-only constructs, so a host
// build runs the very same bodies (emulation). Host side: blend_host.h;
// instantiations: roi_unpool_blend_kernel.cu.
//
// Per pixel only the ROIs that can cover it cost work: the map is cut into
// kTile x kTile tiles and each tile gets the list of its image's ROIs whose
// covered rectangle meets it (ascending ROI index, which fixes the softmax
// order, as on the CPU). Every output element is computed by one thread that
// sums its terms in a fixed order (gather, no atomics): deterministic.
// Nothing of size K*C*H*W exists: the forward keeps two per-pixel statistics
// (max logit m, normaliser z); the backward adds <grad, out> per pixel and,
// for the ROI gradients, one weight and one logit gradient per covered
// (ROI, pixel) pair (the sum of the clipped box areas, C times smaller than
// the pasted maps).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "../common/roi_math.h"
#include "roi_elements.h"

namespace roi_ops {
namespace cuda {
namespace blend {

constexpr int64_t kTile = 16;

template <typename coord_t>
struct Geometry {
  const coord_t* rois;  // [K, 5], contiguous
  coord_t spatial_scale;
  bool aligned;
  int64_t height, width, pooled_h, pooled_w;
};

template <typename coord_t>
C10_HOST_DEVICE inline math::UnpoolAxes<coord_t> roi_axes(const Geometry<coord_t>& g,
                                                          int64_t k) {
  return math::unpool_axes(g.rois + 5 * k, g.spatial_scale, g.aligned, g.pooled_h,
                           g.pooled_w, g.height, g.width);
}

// Per-tile ROI lists: tile i of the B * tiles_per_image tiles lists
// list[begin[i] : begin[i] + count[i]].
struct Tiles {
  const int64_t* begin;
  const int64_t* count;
  const int64_t* list;
  int64_t tiles_x, tiles_per_image;

  C10_HOST_DEVICE int64_t of(int64_t b, int64_t h, int64_t w) const {
    return b * tiles_per_image + (h / kTile) * tiles_x + w / kTile;
  }
};

// Logit of ROI k at pixel (h, w) and the taps of that read; false when the
// ROI does not cover the pixel.
template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline bool roi_logit(const Geometry<coord_t>& g,
                                      const scalar_t* input_logit, int64_t k,
                                      int64_t h, int64_t w,
                                      math::Tap<at::opmath_type<scalar_t>>* ty,
                                      math::Tap<at::opmath_type<scalar_t>>* tx,
                                      at::opmath_type<scalar_t>* logit) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto [ay, ax] = roi_axes(g, k);
  if (!math::unpool_covers(ay, h) || !math::unpool_covers(ax, w)) return false;
  *ty = math::tap_cast<acc_t>(math::unpool_tap(ay, h));
  *tx = math::tap_cast<acc_t>(math::unpool_tap(ax, w));
  const scalar_t* grid = input_logit + k * g.pooled_h * g.pooled_w;
  const scalar_t* lo = grid + ty->lo * g.pooled_w;
  const scalar_t* hi = grid + ty->hi * g.pooled_w;
  *logit = math::unpool_lerp(*ty, *tx, load(lo + tx->lo), load(lo + tx->hi),
                             load(hi + tx->lo), load(hi + tx->hi));
  return true;
}

// The soft coverage (docs/spec.md, "Soft coverage"): [K, FH, FW] crops,
// contiguous, each starting at its ROI's first covered pixel; data nullptr:
// none (every covering ROI takes part with weight 1, the plain blend).
template <typename scalar_t>
struct CoverageView {
  const scalar_t* data;
  int64_t h, w;
};

// Coverage of ROI k at a pixel (h, w) it covers.
template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline at::opmath_type<scalar_t> roi_coverage(const CoverageView<scalar_t>& cv,
                                                              const Geometry<coord_t>& g,
                                                              int64_t k, int64_t h, int64_t w) {
  const auto [ay, ax] = roi_axes(g, k);
  return load(cv.data + (k * cv.h + (h - ay.first)) * cv.w + (w - ax.first));
}

// ROI k's unnormalised softmax term at a covered pixel with logit l:
// exp(l - m), or with coverage c * exp(l - m) where c > 0 and 0 elsewhere.
template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline at::opmath_type<scalar_t> roi_term(const CoverageView<scalar_t>& cv,
                                                          const Geometry<coord_t>& g,
                                                          int64_t k, int64_t h, int64_t w,
                                                          at::opmath_type<scalar_t> l,
                                                          at::opmath_type<scalar_t> m) {
  if (cv.data == nullptr) return math::exp_(l - m);
  return math::covered_term(l, m, roi_coverage(cv, g, k, h, w));
}

// Value of channel c of ROI k's grid read at (ty, tx).
template <typename scalar_t>
C10_HOST_DEVICE inline at::opmath_type<scalar_t> roi_value(
    const scalar_t* input, const Strides4& in, int64_t k, int64_t c,
    const math::Tap<at::opmath_type<scalar_t>>& ty,
    const math::Tap<at::opmath_type<scalar_t>>& tx) {
  const scalar_t* grid = input + k * in.n + c * in.c;
  const scalar_t* lo = grid + ty.lo * in.h;
  const scalar_t* hi = grid + ty.hi * in.h;
  return math::unpool_lerp(ty, tx, load(lo + tx.lo * in.w), load(lo + tx.hi * in.w),
                           load(hi + tx.lo * in.w), load(hi + tx.hi * in.w));
}

// The per-pixel softmax over the base logit and the covering ROIs of the
// pixel's tile list that take part (with coverage: c > 0): max m and
// normaliser z (base first, then ascending ROI index). Returns false (and
// m = z = 0) when no ROI takes part in the pixel.
template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline bool pixel_softmax(const Geometry<coord_t>& g, const Tiles& tiles,
                                          const CoverageView<scalar_t>& cv,
                                          const scalar_t* input_logit,
                                          at::opmath_type<scalar_t> base_logit,
                                          int64_t b, int64_t h, int64_t w,
                                          at::opmath_type<scalar_t>* m_out,
                                          at::opmath_type<scalar_t>* z_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t t = tiles.of(b, h, w);
  const int64_t* list = tiles.list + tiles.begin[t];
  const int64_t n = tiles.count[t];
  math::Tap<acc_t> ty, tx;
  acc_t l;
  acc_t m = base_logit;
  bool covered = false;
  for (int64_t j = 0; j < n; ++j) {
    if (!roi_logit<scalar_t>(g, input_logit, list[j], h, w, &ty, &tx, &l)) continue;
    if (cv.data != nullptr && !(roi_coverage(cv, g, list[j], h, w) > acc_t(0))) continue;
    covered = true;
    if (l > m) m = l;
  }
  if (!covered) {
    *m_out = *z_out = acc_t(0);
    return false;
  }
  acc_t z = math::exp_(base_logit - m);
  for (int64_t j = 0; j < n; ++j) {
    if (!roi_logit<scalar_t>(g, input_logit, list[j], h, w, &ty, &tx, &l)) continue;
    z += roi_term(cv, g, list[j], h, w, l, m);
  }
  *m_out = m;
  *z_out = z;
  return true;
}

// --------------------------------------------------------------- tile lists

template <typename coord_t>
struct TileParams {
  Geometry<coord_t> geo;
  const int64_t* order;    // ROI indices grouped by image, ascending within one
  const int64_t* offsets;  // [B + 1]: image b owns order[offsets[b]:offsets[b+1]]
  int64_t tiles_x, tiles_per_image;
  int64_t* begin;  // [B * tiles_per_image]
  int64_t* count;  // [B * tiles_per_image]
  int64_t* list;   // [tiles_per_image * K]: tile (b, t) may hold all of b's ROIs
};

template <typename coord_t>
C10_HOST_DEVICE inline void apply_element(const TileParams<coord_t>& p, int64_t i) {
  const int64_t b = i / p.tiles_per_image, t = i % p.tiles_per_image;
  const int64_t r0 = (t / p.tiles_x) * kTile, c0 = (t % p.tiles_x) * kTile;
  const int64_t r1 = r0 + kTile, c1 = c0 + kTile;
  const int64_t j0 = p.offsets[b], j1 = p.offsets[b + 1];
  const int64_t start = p.tiles_per_image * j0 + t * (j1 - j0);
  int64_t n = 0;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t k = p.order[j];
    const auto [ay, ax] = roi_axes(p.geo, k);
    if (ay.first >= ay.last || ax.first >= ax.last) continue;
    if (ay.first < r1 && ay.last > r0 && ax.first < c1 && ax.last > c0) {
      p.list[start + n++] = k;
    }
  }
  p.begin[i] = start;
  p.count[i] = n;
}

// ------------------------------------------------------------------ forward

template <typename scalar_t, typename coord_t>
struct StatsParams {
  Geometry<coord_t> geo;
  Tiles tiles;
  const scalar_t* base_logit;   // [B, H, W], contiguous
  const scalar_t* input_logit;  // [K, PH, PW], contiguous
  CoverageView<scalar_t> coverage;
  at::opmath_type<scalar_t>* m;  // [B * H * W]
  at::opmath_type<scalar_t>* z;  // [B * H * W], 0 where no ROI takes part
  scalar_t* base_weight;        // [B, H, W]
};

template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline void apply_element(const StatsParams<scalar_t, coord_t>& p,
                                          int64_t i) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t W = p.geo.width, H = p.geo.height;
  const int64_t w = i % W, h = (i / W) % H, b = i / (W * H);
  const acc_t bl = load(p.base_logit + i);
  acc_t m, z;
  const bool covered =
      pixel_softmax<scalar_t>(p.geo, p.tiles, p.coverage, p.input_logit, bl, b, h, w, &m, &z);
  p.m[i] = m;
  p.z[i] = z;
  p.base_weight[i] =
      static_cast<scalar_t>(covered ? math::blend_weight(bl, m, z) : acc_t(1));
}

template <typename scalar_t, typename coord_t>
struct BlendParams {
  Geometry<coord_t> geo;
  Tiles tiles;
  const scalar_t* base;  // [B, C, H, W]
  Strides4 bs;
  const scalar_t* base_logit;
  const scalar_t* input;  // [K, C, PH, PW]
  Strides4 in;
  const scalar_t* input_logit;
  CoverageView<scalar_t> coverage;
  const at::opmath_type<scalar_t>* m;
  const at::opmath_type<scalar_t>* z;
  scalar_t* out;  // [B, C, H, W], contiguous in the working format
  int64_t channels;
  bool channels_last;
};

// out[b, c, h, w] = w_base * base + sum over the covering ROIs (ascending)
// of w_k * v_k; exactly base where nothing covers.
template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline void apply_element(const BlendParams<scalar_t, coord_t>& p,
                                          int64_t i) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = p.geo.height, W = p.geo.width;
  const Index4 o = unravel(i, p.channels, H, W, p.channels_last);
  const int64_t px = (o.n * H + o.h) * W + o.w;
  const scalar_t base = p.base[o.n * p.bs.n + o.c * p.bs.c + o.h * p.bs.h + o.w * p.bs.w];
  const acc_t z = p.z[px];
  if (z == acc_t(0)) {
    p.out[i] = base;
    return;
  }
  const acc_t m = p.m[px];
  acc_t sum = math::blend_weight(load(p.base_logit + px), m, z) * static_cast<acc_t>(base);
  const int64_t t = p.tiles.of(o.n, o.h, o.w);
  const int64_t* list = p.tiles.list + p.tiles.begin[t];
  math::Tap<acc_t> ty, tx;
  acc_t l;
  for (int64_t j = 0, n = p.tiles.count[t]; j < n; ++j) {
    const int64_t k = list[j];
    if (!roi_logit<scalar_t>(p.geo, p.input_logit, k, o.h, o.w, &ty, &tx, &l)) continue;
    sum += roi_term(p.coverage, p.geo, k, o.h, o.w, l, m) / z *
           roi_value(p.input, p.in, k, o.c, ty, tx);
  }
  p.out[i] = static_cast<scalar_t>(sum);
}

// ----------------------------------------------------------------- backward

template <typename scalar_t, typename coord_t>
struct PixelGradParams {
  Geometry<coord_t> geo;
  Tiles tiles;
  const scalar_t* grad;  // [B, C, H, W]
  Strides4 gs;
  const scalar_t* grad_bw;  // [B, H, W] or nullptr
  const scalar_t* base;
  Strides4 bs;
  const scalar_t* base_logit;
  const scalar_t* input;
  Strides4 in;
  const scalar_t* input_logit;
  CoverageView<scalar_t> coverage;
  int64_t channels;
  at::opmath_type<scalar_t>* m;     // [B * H * W]; the base logit where no ROI takes part
  at::opmath_type<scalar_t>* z;     // [B * H * W], 0 where no ROI takes part
  at::opmath_type<scalar_t>* gout;  // [B * H * W]: <grad, out>
  scalar_t* grad_base_logit;        // [B, H, W]
};

// Per pixel: the softmax statistics, s_j = <g, value_j>, gout = sum_j w_j s_j
// and d/d base_logit = w_base (s_base - gout) + gbw w_base (1 - w_base).
template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline void apply_element(const PixelGradParams<scalar_t, coord_t>& p,
                                          int64_t i) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t W = p.geo.width, H = p.geo.height;
  const int64_t w = i % W, h = (i / W) % H, b = i / (W * H);
  const acc_t bl = load(p.base_logit + i);
  acc_t m, z;
  const scalar_t* g = p.grad + b * p.gs.n + h * p.gs.h + w * p.gs.w;
  const scalar_t* x = p.base + b * p.bs.n + h * p.bs.h + w * p.bs.w;
  if (!pixel_softmax<scalar_t>(p.geo, p.tiles, p.coverage, p.input_logit, bl, b, h, w, &m, &z)) {
    // out = base here; with coverage an ROI covering the pixel with c = 0
    // still has a coverage gradient, which reads m = base_logit and
    // gout = <g, base> (z stays the 0 marker: w_base = 1)
    acc_t s_base = acc_t(0);
    if (p.coverage.data != nullptr) {
      for (int64_t c = 0; c < p.channels; ++c) {
        s_base += load(g + c * p.gs.c) * load(x + c * p.bs.c);
      }
    }
    p.m[i] = p.coverage.data != nullptr ? bl : acc_t(0);
    p.z[i] = acc_t(0);
    p.gout[i] = s_base;
    p.grad_base_logit[i] = scalar_t(0);
    return;
  }
  acc_t s_base = acc_t(0);
  for (int64_t c = 0; c < p.channels; ++c) {
    s_base += load(g + c * p.gs.c) * load(x + c * p.bs.c);
  }
  const acc_t wb = math::blend_weight(bl, m, z);
  acc_t gout = wb * s_base;
  const int64_t t = p.tiles.of(b, h, w);
  const int64_t* list = p.tiles.list + p.tiles.begin[t];
  math::Tap<acc_t> ty, tx;
  acc_t l;
  for (int64_t j = 0, n = p.tiles.count[t]; j < n; ++j) {
    const int64_t k = list[j];
    if (!roi_logit<scalar_t>(p.geo, p.input_logit, k, h, w, &ty, &tx, &l)) continue;
    acc_t s = acc_t(0);
    for (int64_t c = 0; c < p.channels; ++c) {
      s += load(g + c * p.gs.c) * roi_value(p.input, p.in, k, c, ty, tx);
    }
    gout += roi_term(p.coverage, p.geo, k, h, w, l, m) / z * s;
  }
  acc_t d = wb * (s_base - gout);
  if (p.grad_bw != nullptr) d += load(p.grad_bw + i) * wb * (acc_t(1) - wb);
  p.m[i] = m;
  p.z[i] = z;
  p.gout[i] = gout;
  p.grad_base_logit[i] = static_cast<scalar_t>(d);
}

template <typename scalar_t>
struct BaseGradParams {
  const scalar_t* grad;
  Strides4 gs;
  const scalar_t* base_logit;
  const at::opmath_type<scalar_t>* m;
  const at::opmath_type<scalar_t>* z;
  scalar_t* grad_base;  // contiguous in the working format
  int64_t channels, height, width;
  bool channels_last;
};

template <typename scalar_t>
C10_HOST_DEVICE inline void apply_element(const BaseGradParams<scalar_t>& p, int64_t i) {
  using acc_t = at::opmath_type<scalar_t>;
  const Index4 o = unravel(i, p.channels, p.height, p.width, p.channels_last);
  const int64_t px = (o.n * p.height + o.h) * p.width + o.w;
  const scalar_t g = p.grad[o.n * p.gs.n + o.c * p.gs.c + o.h * p.gs.h + o.w * p.gs.w];
  const acc_t z = p.z[px];
  if (z == acc_t(0)) {
    p.grad_base[i] = g;
    return;
  }
  const acc_t wb = math::blend_weight(load(p.base_logit + px), p.m[px], z);
  p.grad_base[i] = static_cast<scalar_t>(wb * static_cast<acc_t>(g));
}

// Covered area of every ROI (its pixel pairs in the per-pair buffers).
template <typename coord_t>
struct AreaParams {
  Geometry<coord_t> geo;
  int64_t* area;  // [K]
};

template <typename coord_t>
C10_HOST_DEVICE inline void apply_element(const AreaParams<coord_t>& p, int64_t k) {
  const auto [ay, ax] = roi_axes(p.geo, k);
  p.area[k] = (ay.last - ay.first) * (ax.last - ax.first);
}

// Pairs (ROI k, covered pixel) are numbered ROI by ROI, row-major within the
// covered rectangle; ROI k's pairs start at end[k] - area(k).
C10_HOST_DEVICE inline int64_t pair_start(const int64_t* end, int64_t k) {
  return k == 0 ? 0 : end[k - 1];
}

template <typename scalar_t, typename coord_t>
struct PairParams {
  Geometry<coord_t> geo;
  const int64_t* end;  // [K]: inclusive prefix sum of the areas
  int64_t num_rois;
  const scalar_t* grad;
  Strides4 gs;
  const scalar_t* grad_bw;  // or nullptr
  const scalar_t* base_logit;
  const scalar_t* input;
  Strides4 in;
  const scalar_t* input_logit;
  CoverageView<scalar_t> coverage;
  scalar_t* grad_coverage;  // [K, FH, FW] with coverage, else nullptr
  int64_t channels;
  const at::opmath_type<scalar_t>* m;
  const at::opmath_type<scalar_t>* z;
  const at::opmath_type<scalar_t>* gout;
  at::opmath_type<scalar_t>* weight;      // [pairs]: w_k at the pixel
  at::opmath_type<scalar_t>* logit_grad;  // [pairs]: d/dl_k at the pixel
};

template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline void apply_element(const PairParams<scalar_t, coord_t>& p,
                                          int64_t r) {
  using acc_t = at::opmath_type<scalar_t>;
  // the ROI owning pair r: first k with end[k] > r
  int64_t lo = 0, hi = p.num_rois - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (p.end[mid] > r) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int64_t k = lo;
  const auto [ay, ax] = roi_axes(p.geo, k);
  const int64_t local = r - pair_start(p.end, k);
  const int64_t nx = ax.last - ax.first;
  const int64_t h = ay.first + local / nx, w = ax.first + local % nx;
  const int64_t b = static_cast<int64_t>(p.geo.rois[5 * k]);
  const int64_t px = (b * p.geo.height + h) * p.geo.width + w;
  math::Tap<acc_t> ty, tx;
  acc_t l = acc_t(0);
  roi_logit<scalar_t>(p.geo, p.input_logit, k, h, w, &ty, &tx, &l);  // covered by construction
  const acc_t m = p.m[px], z = p.z[px];
  // z == 0: no ROI takes part (only with coverage, this one has c <= 0)
  const acc_t wk = p.coverage.data == nullptr ? math::blend_weight(l, m, z)
                   : z == acc_t(0)            ? acc_t(0)
                                              : roi_term(p.coverage, p.geo, k, h, w, l, m) / z;
  const scalar_t* g = p.grad + b * p.gs.n + h * p.gs.h + w * p.gs.w;
  acc_t s = acc_t(0);
  for (int64_t c = 0; c < p.channels; ++c) {
    s += load(g + c * p.gs.c) * roi_value(p.input, p.in, k, c, ty, tx);
  }
  acc_t d = wk * (s - p.gout[px]);
  const acc_t wb = z == acc_t(0) ? acc_t(1) : math::blend_weight(load(p.base_logit + px), m, z);
  if (p.grad_bw != nullptr) d -= load(p.grad_bw + px) * wb * wk;
  p.weight[r] = wk;
  p.logit_grad[r] = d;
  if (p.grad_coverage != nullptr) {
    // d out / d c_k = r_k (v_k - out), r_k = exp(l - m) / z (z = 1 where no
    // ROI takes part), plus the base weight's share; one crop cell per pair
    const acc_t rk = z == acc_t(0) ? math::exp_(l - m) : math::blend_weight(l, m, z);
    acc_t dc = s - p.gout[px];
    if (p.grad_bw != nullptr) dc -= load(p.grad_bw + px) * wb;
    p.grad_coverage[(k * p.coverage.h + (h - ay.first)) * p.coverage.w + (w - ax.first)] =
        static_cast<scalar_t>(rk * dc);
  }
}

// Gradients of the ROI grids, gathered: cell (i, j) of ROI k sums, over the
// covered pixels whose taps read it (rows then columns, ascending), the tap
// weight times w_k * grad (values) or d/dl_k (logits).
template <typename scalar_t, typename coord_t>
struct GridGradParams {
  Geometry<coord_t> geo;
  const int64_t* end;
  const at::opmath_type<scalar_t>* weight;
  const at::opmath_type<scalar_t>* logit_grad;
  const scalar_t* grad;  // nullptr: the logit gradient
  Strides4 gs;
  scalar_t* out;  // [K, C, PH, PW] (contiguous in the working format) or [K, PH, PW]
  int64_t channels;
  bool channels_last;
};

template <typename scalar_t, typename coord_t>
C10_HOST_DEVICE inline void apply_element(const GridGradParams<scalar_t, coord_t>& p,
                                          int64_t i) {
  using acc_t = at::opmath_type<scalar_t>;
  const Index4 o = unravel(i, p.channels, p.geo.pooled_h, p.geo.pooled_w, p.channels_last);
  const auto [ay, ax] = roi_axes(p.geo, o.n);
  int64_t h0, h1, w0, w1;
  math::unpool_pixel_range(ay, o.h, &h0, &h1);
  math::unpool_pixel_range(ax, o.w, &w0, &w1);
  const int64_t start = pair_start(p.end, o.n);
  const int64_t nx = ax.last - ax.first;
  const scalar_t* g = nullptr;
  if (p.grad != nullptr) {
    const int64_t b = static_cast<int64_t>(p.geo.rois[5 * o.n]);
    g = p.grad + b * p.gs.n + o.c * p.gs.c;
  }
  acc_t sum = acc_t(0);
  for (int64_t h = h0; h < h1; ++h) {
    coord_t wy;
    if (!math::tap_weight_at(math::unpool_tap(ay, h), o.h, &wy)) continue;
    const int64_t row = start + (h - ay.first) * nx - ax.first;
    acc_t row_sum = acc_t(0);
    for (int64_t w = w0; w < w1; ++w) {
      coord_t wx;
      if (!math::tap_weight_at(math::unpool_tap(ax, w), o.w, &wx)) continue;
      const acc_t v = g != nullptr
                          ? p.weight[row + w] * load(g + h * p.gs.h + w * p.gs.w)
                          : p.logit_grad[row + w];
      row_sum += static_cast<acc_t>(wx) * v;
    }
    sum += static_cast<acc_t>(wy) * row_sum;
  }
  p.out[i] = static_cast<scalar_t>(sum);
}

}  // namespace blend
}  // namespace cuda
}  // namespace roi_ops
