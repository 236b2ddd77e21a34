// Device-agnostic per-element math of every roi-ops kernel.
//
// This header is the single definition of box mapping, sample positions,
// bilinear taps, clamping and coverage (docs/spec.md). The CPU kernels
// (csrc/cpu) and the CUDA kernels (csrc/cuda) both call these functions, and
// roi_ops/reference.py mirrors the same expression order, so float32
// coordinate arithmetic agrees bit-for-bit and every floor/ceil/border test
// falls identically on every backend.
//
// Every function is a plain inline function, __host__ __device__ when nvcc
// compiles it. Nothing here touches at::Tensor.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace roi_ops {
namespace math {

// Adaptive ROI-Align grids wider than this many samples per bin are clamped:
// only boxes over ~10^12 feature pixels wide are affected, and it keeps every
// integer conversion below defined-behaviour limits.
constexpr int64_t kMaxSamplesPerBin = int64_t(1) << 40;

// Largest explicit sampling_ratio (samples per bin along each axis). Work is
// bounded before it starts: a kernel visits at most this many samples of a
// bin per axis (the CUDA forward their product per output element).
constexpr int64_t kMaxSamplingRatio = 1024;

// Largest side of any grid or map an op allocates from a size argument
// (ROI-Align's output_size, ROI-Unpool's output_size): 2^16, far beyond any
// feature map, and small enough that per-row tables stay proportionate.
constexpr int64_t kMaxOutputSide = int64_t(1) << 16;

// Most samples of one bin, along one axis of `size` pixels, that may land in
// [-1, size]. An adaptive grid steps by bin / ceil(bin) >= 1/2 pixel, so it
// puts at most 2 * size + 3 samples there; an explicit grid at most
// kMaxSamplingRatio. Only a box whose coordinates are so large that the
// coordinate dtype cannot tell its sample positions apart exceeds this (many
// samples rounding onto one position): that box is refused as bad input.
C10_HOST_DEVICE inline int64_t align_visit_limit(int64_t size) {
  const int64_t adaptive = 2 * size + 8;
  return adaptive > kMaxSamplingRatio ? adaptive : kMaxSamplingRatio;
}

C10_HOST_DEVICE inline float floor_(float v) { return ::floorf(v); }
C10_HOST_DEVICE inline double floor_(double v) { return ::floor(v); }
C10_HOST_DEVICE inline float ceil_(float v) { return ::ceilf(v); }
C10_HOST_DEVICE inline double ceil_(double v) { return ::ceil(v); }

// Clamp to [lo, hi]; NaN maps to lo so that a later integer conversion is
// always defined.
template <typename T>
C10_HOST_DEVICE inline T clamp_(T v, T lo, T hi) {
  if (!(v >= lo)) return lo;
  return v > hi ? hi : v;
}

template <typename T>
C10_HOST_DEVICE inline int64_t to_index_clamped(T v, int64_t lo, int64_t hi) {
  return static_cast<int64_t>(clamp_(v, static_cast<T>(lo), static_cast<T>(hi)));
}

C10_HOST_DEVICE inline float rel_eps(float) { return 1.1920929e-07f; }
C10_HOST_DEVICE inline double rel_eps(double) { return 2.220446049250313e-16; }

template <typename T>
C10_HOST_DEVICE inline T abs_(T v) {
  return v < T(0) ? -v : v;
}

// Finite (not inf, not NaN), without <cmath>'s host/device overloads.
template <typename T>
C10_HOST_DEVICE inline bool is_finite_(T v) {
  return (v - v) == T(0);
}

// Absolute bound (generous: 16 ulps) on the rounding error of a position
// computed from numbers of magnitude up to `magnitude`. Range helpers widen
// their windows by it so that a position that rounds across a window edge is
// still enumerated; the exact tests decide.
template <typename T>
C10_HOST_DEVICE inline T position_slack(T magnitude) {
  return T(16) * rel_eps(magnitude) * abs_(magnitude);
}

// One ROI mapped to the feature frame, where feature pixel (h, w) sits at the
// point (h, w).
template <typename T>
struct RoiFrame {
  T x0, y0;           // top-left corner
  T width, height;    // extent; torchvision's max(., 1) rule applied when !aligned
};

// The four mapped edges of one row (batch_index, x1, y1, x2, y2).
template <typename T>
struct RoiEdges {
  T x0, y0, x1, y1;
};

template <typename T>
C10_HOST_DEVICE inline RoiEdges<T> map_edges(const T* roi, T spatial_scale,
                                             bool aligned) {
  const T offset = aligned ? T(0.5) : T(0);
  return {roi[1] * spatial_scale - offset, roi[2] * spatial_scale - offset,
          roi[3] * spatial_scale - offset, roi[4] * spatial_scale - offset};
}

// docs/spec.md's validity rule for a box's geometry: its mapped edges and its
// extent (x2' - x1', y2' - y1') are finite in the coordinate dtype. A finite
// box can fail it (0 - (-3e38) + 3e38 overflows float32; so does a
// coordinate times a large spatial_scale); the host functions refuse such a
// box by name before any kernel runs.
template <typename T>
C10_HOST_DEVICE inline bool roi_frame_finite(const T* roi, T spatial_scale,
                                             bool aligned) {
  const RoiEdges<T> e = map_edges(roi, spatial_scale, aligned);
  return is_finite_(e.x0) && is_finite_(e.y0) && is_finite_(e.x1) &&
         is_finite_(e.y1) && is_finite_(e.x1 - e.x0) && is_finite_(e.y1 - e.y0);
}

// roi points at one row (batch_index, x1, y1, x2, y2).
template <typename T>
C10_HOST_DEVICE inline RoiFrame<T> map_roi(const T* roi, T spatial_scale,
                                           bool aligned) {
  const RoiEdges<T> e = map_edges(roi, spatial_scale, aligned);
  RoiFrame<T> f;
  f.x0 = e.x0;
  f.y0 = e.y0;
  f.width = e.x1 - e.x0;
  f.height = e.y1 - e.y0;
  if (!aligned) {
    f.width = f.width > T(1) ? f.width : T(1);
    f.height = f.height > T(1) ? f.height : T(1);
  }
  return f;
}

// A 1-D bilinear tap: weight w_lo on index lo and w_hi on index hi. A 2-D
// bilinear weight is the product of the taps of its two axes, so every
// kernel is separable. valid == false means "contributes nothing".
template <typename T>
struct Tap {
  int64_t lo, hi;
  T w_lo, w_hi;
  bool valid;
};

// ---------------------------------------------------------------- ROI-Align

// One axis of one ROI for ROI-Align: bins of size `bin`, `grid` samples per
// bin (0 when the adaptive count is not positive: the bin then averages
// nothing and is 0, as in torchvision).
template <typename T>
struct AlignAxis {
  T start;
  T bin;
  int64_t grid;
  int64_t size;  // feature-map extent along this axis
};

template <typename T>
C10_HOST_DEVICE inline AlignAxis<T> align_axis(T start, T extent, int64_t pooled,
                                               int64_t sampling_ratio,
                                               int64_t size) {
  AlignAxis<T> a;
  a.start = start;
  a.bin = extent / static_cast<T>(pooled);
  if (sampling_ratio > 0) {
    a.grid = sampling_ratio;
  } else {
    a.grid = to_index_clamped(ceil_(extent / static_cast<T>(pooled)), 0,
                              kMaxSamplesPerBin);
  }
  // A non-finite bin (refused by the host checks; kept safe regardless):
  // no samples, rather than positions that are all NaN.
  if (!is_finite_(a.bin)) a.grid = 0;
  a.size = size;
  return a;
}

// Both axes of one ROI (a row of the [K, 5] table) for ROI-Align: the one
// place a box becomes its sampling frame.
template <typename T>
struct AlignAxes {
  AlignAxis<T> y, x;
};

template <typename T>
C10_HOST_DEVICE inline AlignAxes<T> align_axes(const T* roi, T spatial_scale,
                                               bool aligned, int64_t pooled_h,
                                               int64_t pooled_w,
                                               int64_t sampling_ratio,
                                               int64_t height, int64_t width) {
  const RoiFrame<T> f = map_roi(roi, spatial_scale, aligned);
  return {align_axis(f.y0, f.height, pooled_h, sampling_ratio, height),
          align_axis(f.x0, f.width, pooled_w, sampling_ratio, width)};
}

// Position of sample iy of bin p (torchvision's expression order).
template <typename T>
C10_HOST_DEVICE inline T align_sample(const AlignAxis<T>& a, int64_t p,
                                      int64_t iy) {
  return a.start + static_cast<T>(p) * a.bin +
         static_cast<T>(static_cast<float>(iy) + 0.5f) * a.bin /
             static_cast<T>(a.grid);
}

// torchvision's border rule: nothing outside [-1, size]; clamp to the edge
// pixel inside it. NaN contributes nothing.
template <typename T>
C10_HOST_DEVICE inline Tap<T> align_tap(T y, int64_t size) {
  Tap<T> t{0, 0, T(0), T(0), false};
  if (!(y >= T(-1) && y <= static_cast<T>(size)) || size <= 0) return t;
  if (y <= T(0)) y = T(0);
  int64_t lo = static_cast<int64_t>(y);
  int64_t hi;
  if (lo >= size - 1) {
    lo = hi = size - 1;
    y = static_cast<T>(lo);
  } else {
    hi = lo + 1;
  }
  const T l = y - static_cast<T>(lo);
  t.lo = lo;
  t.hi = hi;
  t.w_lo = T(1) - l;
  t.w_hi = l;
  t.valid = true;
  return t;
}

// Range [*first, *last) of the sample indices iy of bin p whose position
// lies in [lo_bound, hi_bound]. Positions are monotone in iy (every rounding
// step of align_sample is monotone), so those samples form one run; its ends
// are found by bisection on align_sample itself, which is exact whatever the
// rounding (huge float32 boxes, steps below one ulp) and costs
// O(log samples-per-bin) -- it lets kernels skip the millions of off-map
// samples of a huge box instead of looping over them.
template <typename T>
C10_HOST_DEVICE inline void align_sample_range(const AlignAxis<T>& a, int64_t p,
                                               T lo_bound, T hi_bound,
                                               int64_t* first, int64_t* last) {
  *first = 0;
  *last = a.grid > 0 ? a.grid : 0;
  if (a.grid <= 0) return;
  const T step = a.bin / static_cast<T>(a.grid);
  if (!(step != T(0))) return;  // all samples at one point (or NaN): no narrowing
  const bool rising = step > T(0);
  // before(i): sample i lies before the window in iteration order
  int64_t lo = 0, hi = a.grid;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    const T y = align_sample(a, p, mid);
    if (rising ? (y < lo_bound) : (y > hi_bound)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  *first = lo;
  // beyond(i): sample i lies past the window in iteration order
  hi = a.grid;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    const T y = align_sample(a, p, mid);
    if (rising ? (y > hi_bound) : (y < lo_bound)) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  *last = lo;
}

// ---------------------------------------------------------------- ROI-Unpool

// One axis of one ROI for ROI-Unpool: pixels [first, last) are covered
// (half-open: start <= h < start + extent), cell centres of a `pooled`-cell
// grid spread over the extent.
template <typename T>
struct UnpoolAxis {
  T start;
  T extent;
  int64_t pooled;
  int64_t first, last;
};

template <typename T>
C10_HOST_DEVICE inline UnpoolAxis<T> unpool_axis(T start, T extent,
                                                 int64_t pooled, int64_t size) {
  UnpoolAxis<T> a;
  a.start = start;
  a.extent = extent;
  a.pooled = pooled;
  a.first = a.last = 0;
  if (!(extent > T(0)) || pooled <= 0 || size <= 0) return a;  // covers nothing
  const T end = start + extent;
  a.first = to_index_clamped(ceil_(start), 0, size);
  a.last = to_index_clamped(ceil_(end), 0, size);
  if (a.last < a.first) a.last = a.first;
  return a;
}

// Both axes of one ROI (a row of the [K, 5] table) for ROI-Unpool and the
// blend: the one place a box becomes its covered pixels and cell frame.
template <typename T>
struct UnpoolAxes {
  UnpoolAxis<T> y, x;
};

template <typename T>
C10_HOST_DEVICE inline UnpoolAxes<T> unpool_axes(const T* roi, T spatial_scale,
                                                 bool aligned, int64_t pooled_h,
                                                 int64_t pooled_w, int64_t height,
                                                 int64_t width) {
  const RoiFrame<T> f = map_roi(roi, spatial_scale, aligned);
  return {unpool_axis(f.y0, f.height, pooled_h, height),
          unpool_axis(f.x0, f.width, pooled_w, width)};
}

// Tap of covered pixel h onto the grid cells (clamped bilinear: weights
// always sum to one, so a constant grid pastes back as that constant).
template <typename T>
C10_HOST_DEVICE inline Tap<T> unpool_tap(const UnpoolAxis<T>& a, int64_t h) {
  const T v = ((static_cast<T>(h) - a.start) * static_cast<T>(a.pooled)) /
                  a.extent -
              T(0.5);
  const T vc = clamp_(v, T(0), static_cast<T>(a.pooled - 1));
  Tap<T> t;
  t.lo = static_cast<int64_t>(vc);
  t.hi = t.lo + 1 < a.pooled ? t.lo + 1 : a.pooled - 1;
  const T l = vc - static_cast<T>(t.lo);
  t.w_lo = T(1) - l;
  t.w_hi = l;
  t.valid = true;
  return t;
}

// Conservative range [*first, *last) of covered pixels whose tap can touch
// grid cell i; used by gather-style backward kernels. Callers apply the exact
// tap and keep only the pixels that really read cell i.
template <typename T>
C10_HOST_DEVICE inline void unpool_pixel_range(const UnpoolAxis<T>& a, int64_t i,
                                               int64_t* first, int64_t* last) {
  *first = a.first;
  *last = a.last;
  if (a.first >= a.last) return;
  // pixel h reads cell i only if v(h) in (i - 1, i + 1); v grows with h.
  // Widened by the coordinates' rounding error (whole pixels for boxes so
  // large that one ulp of their coordinates exceeds a pixel).
  const T scale = a.extent / static_cast<T>(a.pooled);
  const T pad = position_slack(abs_(a.start) + abs_(a.extent) +
                               static_cast<T>(a.last));
  if (i > 0) {
    const T h0 = a.start + (static_cast<T>(i) - T(0.5)) * scale;
    *first = to_index_clamped(floor_(h0 - pad) - T(1), a.first, a.last);
  }
  if (i < a.pooled - 1) {
    const T h1 = a.start + (static_cast<T>(i) + T(1.5)) * scale;
    *last = to_index_clamped(ceil_(h1 + pad) + T(2), a.first, a.last);
  }
}

}  // namespace math
}  // namespace roi_ops

// ------------------------------------------- gather-style backward helpers
// (appended for the CUDA kernels, whose backward gathers instead of
// scattering: each gradient element enumerates exactly the samples / pixels
// that read it, so no atomics are needed and the sum order is fixed.)

namespace roi_ops {
namespace math {


// Weight with which tap t reads index i (the sum of both weights when lo ==
// hi). Returns false when t does not read i at all; a read with weight 0
// returns true, so a gather sums exactly the terms a scatter would.
template <typename T>
C10_HOST_DEVICE inline bool tap_weight_at(const Tap<T>& t, int64_t i, T* w) {
  if (!t.valid || (t.lo != i && t.hi != i)) return false;
  T s = T(0);
  if (t.lo == i) s += t.w_lo;
  if (t.hi == i) s += t.w_hi;
  *w = s;
  return true;
}

// Window of ROI-Align sample positions whose tap (align_tap) on an axis of
// `size` pixels can read pixel h: [h-1, h+1], widened to -1 for h <= 1
// (positions in [-1, 0] clamp to 0 and read pixels 0 and 1) and to `size` for
// the last pixel (positions in [size-1, size] clamp onto it), then by the
// rounding slack of the axis.
template <typename T>
C10_HOST_DEVICE inline void align_touch_window(const AlignAxis<T>& a,
                                               int64_t pooled, int64_t h,
                                               T* lo, T* hi) {
  const T slack =
      position_slack(abs_(a.start) + abs_(static_cast<T>(pooled) * a.bin)) +
      position_slack(static_cast<T>(a.size));
  *lo = (h <= 1 ? T(-1) : static_cast<T>(h - 1)) - slack;
  *hi = (h >= a.size - 1 ? static_cast<T>(a.size) : static_cast<T>(h + 1)) +
        slack;
}

// Conservative range [*first, *last) of the bins of `a` (pooled bins) whose
// sample positions can lie in [lo_bound, hi_bound]. Bin p's samples lie in
// start + [p, p + 1] * bin; one bin of margin on each side absorbs rounding.
template <typename T>
C10_HOST_DEVICE inline void align_bin_range(const AlignAxis<T>& a, int64_t pooled,
                                            T lo_bound, T hi_bound,
                                            int64_t* first, int64_t* last) {
  *first = 0;
  *last = pooled;
  if (a.grid <= 0) {  // no samples anywhere
    *last = 0;
    return;
  }
  if (!(a.bin != T(0))) return;  // all bins at one point (or NaN): no narrowing
  T u0 = (lo_bound - a.start) / a.bin;
  T u1 = (hi_bound - a.start) / a.bin;
  if (u0 > u1) {  // negative extent (aligned boxes with x2 < x1)
    const T tmp = u0;
    u0 = u1;
    u1 = tmp;
  }
  *first = to_index_clamped(floor_(u0) - T(1), 0, pooled);
  *last = to_index_clamped(ceil_(u1) + T(1), 0, pooled);
}

// Conservative range [*first, *last) of the pixels of an axis that any
// ROI-Align sample of `a` (pooled bins) can read; used to skip, with a cheap
// integer test, the ROIs that cannot touch a gradient element.
template <typename T>
C10_HOST_DEVICE inline void align_footprint(const AlignAxis<T>& a, int64_t pooled,
                                            int64_t* first, int64_t* last) {
  *first = *last = 0;
  if (a.grid <= 0 || a.size <= 0) return;
  T lo = a.start;
  T hi = a.start + static_cast<T>(pooled) * a.bin;
  if (lo > hi) {
    const T tmp = lo;
    lo = hi;
    hi = tmp;
  }
  if (!(lo <= hi)) {  // NaN: nothing can be excluded
    *last = a.size;
    return;
  }
  const T slack = position_slack(abs_(lo) + abs_(hi)) +
                  position_slack(static_cast<T>(a.size));
  // a position y reads pixels floor(y) and floor(y) + 1 (clamped into range)
  *first = to_index_clamped(floor_(lo - slack) - T(1), 0, a.size);
  *last = to_index_clamped(ceil_(hi + slack) + T(2), 0, a.size);
}


}  // namespace math
}  // namespace roi_ops

// ------------------------------------------- fused paste-back + blend helpers
// (appended for roi_unpool_blend; both backends evaluate every pasted value,
// logit and softmax weight through these, in this expression order.)

namespace roi_ops {
namespace math {

C10_HOST_DEVICE inline float exp_(float v) { return ::expf(v); }
C10_HOST_DEVICE inline double exp_(double v) { return ::exp(v); }

// Does the unpool axis cover pixel h? (first/last already encode the
// half-open rule start <= h < start + extent.)
template <typename T>
C10_HOST_DEVICE inline bool unpool_covers(const UnpoolAxis<T>& a, int64_t h) {
  return h >= a.first && h < a.last;
}

// A tap with its weights in the accumulation type.
template <typename A, typename T>
C10_HOST_DEVICE inline Tap<A> tap_cast(const Tap<T>& t) {
  return Tap<A>{t.lo, t.hi, static_cast<A>(t.w_lo), static_cast<A>(t.w_hi),
                t.valid};
}

// One clamped-bilinear read of a grid: v_yx is the cell (y tap, x tap), with
// y interpolated first. Kernels that precompute the y-interpolated row of a
// grid (ty.w_lo * cell[ty.lo][j] + ty.w_hi * cell[ty.hi][j]) and then read it
// at tx get bitwise this value.
template <typename A>
C10_HOST_DEVICE inline A unpool_lerp(const Tap<A>& ty, const Tap<A>& tx, A v_ll,
                                     A v_lh, A v_hl, A v_hh) {
  return tx.w_lo * (ty.w_lo * v_ll + ty.w_hi * v_hl) +
         tx.w_hi * (ty.w_lo * v_lh + ty.w_hi * v_hh);
}

// Softmax weight of logit l in a pixel whose logits have maximum m and
// normaliser z = sum of exp(l_i - m) (base first, then ROIs in ascending
// index). The max subtraction keeps exp in range for any finite logits.
template <typename A>
C10_HOST_DEVICE inline A blend_weight(A l, A m, A z) {
  return exp_(l - m) / z;
}

// Soft coverage (docs/spec.md, "Soft coverage"): an ROI's unnormalised term
// at a pixel is c * exp(l - m) where it takes part (c > 0), and exactly 0
// elsewhere (not c * exp(l - m): exp may be inf there, m leaving l out).
// Its weight is covered_term / z, in the forward and the backward alike.
template <typename A>
C10_HOST_DEVICE inline A covered_term(A l, A m, A c) {
  return c > A(0) ? c * exp_(l - m) : A(0);
}

}  // namespace math
}  // namespace roi_ops
