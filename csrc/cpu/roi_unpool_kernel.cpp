// ROI-Unpool CPU kernels: forward and deterministic backward, contiguous and
// channels_last, float16/bfloat16/float32/float64.
//
// Each output map is written exactly once (zeros outside the covered
// rectangle), so there is no separate memset pass and the page faults of a
// fresh output are spread over the threads.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <type_traits>

#include "../common/host_prologue.h"
#include "cpu_common.h"

namespace roi_ops {
namespace cpu {
namespace {

constexpr int64_t kChannelBlock = 64;  // channels per task in channels_last

// Coverage and taps of one ROI, cached per task (recomputed only when the
// task moves on to another ROI).
template <typename coord_t, typename acc_t>
struct UnpoolRoi {
  int64_t k = -1;
  math::UnpoolAxis<coord_t> ay, ax;
  std::vector<math::Tap<acc_t>> ty, tx;  // indexed by h - ay.first, w - ax.first

  void load(const coord_t* rois, int64_t roi, coord_t scale, bool aligned,
            const RoiShape& s) {
    if (k == roi) return;
    k = roi;
    const math::UnpoolAxes<coord_t> a = math::unpool_axes(
        rois + 5 * roi, scale, aligned, s.pooled_h, s.pooled_w, s.height, s.width);
    ay = a.y;
    ax = a.x;
    fill(ay, &ty);
    fill(ax, &tx);
    // Transpose of tx: for each grid column, the covered columns that read it
    // with their weights, in the order a scatter over w would add them (so
    // the gather below sums in the same order, bitwise).
    cell_begin.assign(s.pooled_w + 1, 0);
    for (const auto& t : tx) {
      ++cell_begin[t.lo + 1];
      ++cell_begin[t.hi + 1];
    }
    for (int64_t j = 0; j < s.pooled_w; ++j) cell_begin[j + 1] += cell_begin[j];
    cell_reads.resize(cell_begin[s.pooled_w]);
    std::vector<int64_t> next(cell_begin.begin(), cell_begin.end() - 1);
    for (int64_t w = 0; w < static_cast<int64_t>(tx.size()); ++w) {
      cell_reads[next[tx[w].lo]++] = {w, tx[w].w_lo};
      cell_reads[next[tx[w].hi]++] = {w, tx[w].w_hi};
    }
  }

  struct Read {
    int64_t column;  // covered column, relative to ax.first
    acc_t weight;
  };
  std::vector<int64_t> cell_begin;  // pooled_w + 1
  std::vector<Read> cell_reads;

 private:
  static void fill(const math::UnpoolAxis<coord_t>& a,
                   std::vector<math::Tap<acc_t>>* taps) {
    taps->resize(a.last - a.first);
    for (int64_t h = a.first; h < a.last; ++h) {
      const math::Tap<coord_t> t = math::unpool_tap(a, h);
      (*taps)[h - a.first] = math::Tap<acc_t>{t.lo, t.hi, static_cast<acc_t>(t.w_lo),
                                              static_cast<acc_t>(t.w_hi), true};
    }
  }
};

template <typename scalar_t, typename coord_t, typename acc_t>
void unpool_forward_nchw(const scalar_t* input, const coord_t* rois,
                         coord_t scale, bool aligned, const RoiShape& s,
                         scalar_t* output) {
  const int64_t C = s.channels, H = s.height, W = s.width;
  const int64_t PH = s.pooled_h, PW = s.pooled_w;
  at::parallel_for(0, s.num_rois * C, 1, [&](int64_t begin, int64_t end) {
    UnpoolRoi<coord_t, acc_t> roi;
    std::vector<acc_t> binned;  // [PW]: one grid row interpolated along y
    for (int64_t kc = begin; kc < end; ++kc) {
      const int64_t k = kc / C;
      roi.load(rois, k, scale, aligned, s);
      const scalar_t* grid = input + kc * PH * PW;
      scalar_t* out = output + kc * H * W;
      const int64_t y0 = roi.ay.first, y1 = roi.ay.last;
      const int64_t x0 = roi.ax.first, x1 = roi.ax.last;
      const int64_t nx = x1 - x0;
      if (y0 >= y1 || x0 >= x1) {
        std::fill(out, out + H * W, scalar_t(0));
        continue;
      }
      // y first: the covered row's grid row interpolated along y, then read
      // at each column's x tap -- bitwise math::unpool_lerp, in separable form
      binned.resize(PW);
      std::fill(out, out + y0 * W, scalar_t(0));
      for (int64_t h = y0; h < y1; ++h) {
        const math::Tap<acc_t>& ty = roi.ty[h - y0];
        const scalar_t* g_lo = grid + ty.lo * PW;
        const scalar_t* g_hi = grid + ty.hi * PW;
        for (int64_t j = 0; j < PW; ++j) {
          binned[j] = ty.w_lo * static_cast<acc_t>(g_lo[j]) +
                      ty.w_hi * static_cast<acc_t>(g_hi[j]);
        }
        scalar_t* row = out + h * W;
        std::fill(row, row + x0, scalar_t(0));
        for (int64_t w = 0; w < nx; ++w) {
          const math::Tap<acc_t>& tx = roi.tx[w];
          row[x0 + w] = static_cast<scalar_t>(tx.w_lo * binned[tx.lo] +
                                              tx.w_hi * binned[tx.hi]);
        }
        std::fill(row + x1, row + W, scalar_t(0));
      }
      std::fill(out + y1 * W, out + H * W, scalar_t(0));
    }
  });
}

template <typename scalar_t, typename coord_t, typename acc_t>
void unpool_forward_nhwc(const scalar_t* input, const coord_t* rois,
                         coord_t scale, bool aligned, const RoiShape& s,
                         scalar_t* output) {
  const int64_t C = s.channels, H = s.height, W = s.width;
  const int64_t PH = s.pooled_h, PW = s.pooled_w;
  at::parallel_for(0, s.num_rois * H, 1, [&](int64_t begin, int64_t end) {
    UnpoolRoi<coord_t, acc_t> roi;
    for (int64_t kh = begin; kh < end; ++kh) {
      const int64_t k = kh / H, h = kh % H;
      roi.load(rois, k, scale, aligned, s);
      scalar_t* row = output + kh * W * C;
      const int64_t x0 = roi.ax.first, x1 = roi.ax.last;
      if (h < roi.ay.first || h >= roi.ay.last || x0 >= x1) {
        std::fill(row, row + W * C, scalar_t(0));
        continue;
      }
      const math::Tap<acc_t>& ty = roi.ty[h - roi.ay.first];
      const scalar_t* grid = input + k * PH * PW * C;
      const scalar_t* g_lo = grid + ty.lo * PW * C;
      const scalar_t* g_hi = grid + ty.hi * PW * C;
      std::fill(row, row + x0 * C, scalar_t(0));
      for (int64_t w = x0; w < x1; ++w) {
        const math::Tap<acc_t>& tx = roi.tx[w - x0];
        const scalar_t* a = g_lo + tx.lo * C;
        const scalar_t* b = g_lo + tx.hi * C;
        const scalar_t* c_ = g_hi + tx.lo * C;
        const scalar_t* d = g_hi + tx.hi * C;
        scalar_t* __restrict dst = row + w * C;
        // the one clamped-bilinear evaluation (math::unpool_lerp), per channel
        for (int64_t c = 0; c < C; ++c) {
          dst[c] = static_cast<scalar_t>(math::unpool_lerp(
              ty, tx, static_cast<acc_t>(a[c]), static_cast<acc_t>(b[c]),
              static_cast<acc_t>(c_[c]), static_cast<acc_t>(d[c])));
        }
      }
      std::fill(row + x1 * C, row + W * C, scalar_t(0));
    }
  });
}

// The gradient of the backward as the kernels read it: any strides (an
// expanded `.sum().backward()` gradient has stride 0 everywhere and is read in
// place); `Unit` says the innermost stride of the working layout is 1 (w for
// NCHW, c for NHWC), so that the inner loops stay plain vector loops.
struct GradStrides {
  int64_t k, c, h, w;
};

template <bool Unit>
inline int64_t inner(int64_t i, int64_t stride) {
  if constexpr (Unit) {
    return i;
  } else {
    return i * stride;
  }
}

// Backward: a task owns one ROI grid (k, c) and sums the covered pixels'
// gradients into it in a fixed order (adjoint of the forward's two passes).
template <typename scalar_t, typename coord_t, typename acc_t, bool Unit>
void unpool_backward_nchw(const scalar_t* grad, const GradStrides& gs, const coord_t* rois,
                          coord_t scale, bool aligned, const RoiShape& s,
                          scalar_t* grad_input) {
  const int64_t C = s.channels;
  const int64_t PH = s.pooled_h, PW = s.pooled_w;
  at::parallel_for(0, s.num_rois * C, 1, [&](int64_t begin, int64_t end) {
    UnpoolRoi<coord_t, acc_t> roi;
    std::vector<acc_t> cols;  // [PH, covered width]
    std::vector<acc_t> cells;
    for (int64_t kc = begin; kc < end; ++kc) {
      roi.load(rois, kc / C, scale, aligned, s);
      const scalar_t* g = grad + (kc / C) * gs.k + (kc % C) * gs.c;
      scalar_t* out = grad_input + kc * PH * PW;
      const int64_t y0 = roi.ay.first, y1 = roi.ay.last;
      const int64_t x0 = roi.ax.first, x1 = roi.ax.last;
      const int64_t nx = x1 - x0;
      cols.assign(PH * std::max<int64_t>(nx, 0), acc_t(0));
      for (int64_t h = y0; h < y1 && nx > 0; ++h) {
        const math::Tap<acc_t>& t = roi.ty[h - y0];
        const scalar_t* __restrict src = g + h * gs.h + x0 * gs.w;
        // lo and hi may be the same row at the grid's edge: separate scopes
        {
          acc_t* __restrict a = cols.data() + t.lo * nx;
          for (int64_t w = 0; w < nx; ++w) {
            a[w] += t.w_lo * static_cast<acc_t>(src[inner<Unit>(w, gs.w)]);
          }
        }
        {
          acc_t* __restrict b = cols.data() + t.hi * nx;
          for (int64_t w = 0; w < nx; ++w) {
            b[w] += t.w_hi * static_cast<acc_t>(src[inner<Unit>(w, gs.w)]);
          }
        }
      }
      // Gather per grid cell (register accumulator, no store-to-load chain).
      cells.assign(PH * PW, acc_t(0));
      for (int64_t i = 0; i < PH && nx > 0; ++i) {
        const acc_t* src = cols.data() + i * nx;
        acc_t* dst = cells.data() + i * PW;
        for (int64_t j = 0; j < PW; ++j) {
          acc_t sum = 0;
          for (int64_t e = roi.cell_begin[j]; e < roi.cell_begin[j + 1]; ++e) {
            sum += roi.cell_reads[e].weight * src[roi.cell_reads[e].column];
          }
          dst[j] = sum;
        }
      }
      for (int64_t i = 0; i < PH * PW; ++i) out[i] = static_cast<scalar_t>(cells[i]);
    }
  });
}

// Same summation order as unpool_backward_nchw (rows into cells along y,
// then columns into cells along x), so both layouts agree bitwise.
template <typename scalar_t, typename coord_t, typename acc_t, bool Unit>
void unpool_backward_nhwc(const scalar_t* grad, const GradStrides& gs, const coord_t* rois,
                          coord_t scale, bool aligned, const RoiShape& s,
                          scalar_t* grad_input) {
  const int64_t C = s.channels;
  const int64_t PH = s.pooled_h, PW = s.pooled_w;
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, s.num_rois * blocks, 1, [&](int64_t begin, int64_t end) {
    UnpoolRoi<coord_t, acc_t> roi;
    std::vector<acc_t> cols;   // [PH, covered width, nc]
    std::vector<acc_t> cells;  // [PH, PW, nc]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / blocks;
      const int64_t c0 = (task % blocks) * kChannelBlock;
      const int64_t nc = std::min(kChannelBlock, C - c0);
      roi.load(rois, k, scale, aligned, s);
      const int64_t x0 = roi.ax.first, nx = roi.ax.last - roi.ax.first;
      cols.assign(PH * std::max<int64_t>(nx, 0) * nc, acc_t(0));
      for (int64_t h = roi.ay.first; h < roi.ay.last; ++h) {
        const math::Tap<acc_t>& ty = roi.ty[h - roi.ay.first];
        for (int64_t w = 0; w < nx; ++w) {
          const scalar_t* __restrict g =
              grad + k * gs.k + h * gs.h + (x0 + w) * gs.w + c0 * gs.c;
          // lo and hi may be the same cell at the grid's edge: separate scopes
          {
            acc_t* __restrict a = cols.data() + (ty.lo * nx + w) * nc;
            for (int64_t c = 0; c < nc; ++c) {
              a[c] += ty.w_lo * static_cast<acc_t>(g[inner<Unit>(c, gs.c)]);
            }
          }
          {
            acc_t* __restrict b = cols.data() + (ty.hi * nx + w) * nc;
            for (int64_t c = 0; c < nc; ++c) {
              b[c] += ty.w_hi * static_cast<acc_t>(g[inner<Unit>(c, gs.c)]);
            }
          }
        }
      }
      cells.assign(PH * PW * nc, acc_t(0));
      for (int64_t i = 0; i < PH && nx > 0; ++i) {
        for (int64_t w = 0; w < nx; ++w) {
          const math::Tap<acc_t>& tx = roi.tx[w];
          const acc_t* __restrict src = cols.data() + (i * nx + w) * nc;
          {
            acc_t* __restrict a = cells.data() + (i * PW + tx.lo) * nc;
            for (int64_t c = 0; c < nc; ++c) a[c] += tx.w_lo * src[c];
          }
          {
            acc_t* __restrict b = cells.data() + (i * PW + tx.hi) * nc;
            for (int64_t c = 0; c < nc; ++c) b[c] += tx.w_hi * src[c];
          }
        }
      }
      scalar_t* out = grad_input + k * PH * PW * C + c0;
      for (int64_t p = 0; p < PH * PW; ++p) {
        for (int64_t c = 0; c < nc; ++c) {
          out[p * C + c] = static_cast<scalar_t>(cells[p * nc + c]);
        }
      }
    }
  });
}

// Both directions on the prepared operands: the forward pastes `features`
// (the grids) into `result` (the maps), the backward gathers the other way;
// the kernel is the one for the working layout.
at::Tensor run_unpool(const UnpoolOperands& u, bool forward) {
  return run_kernels(u, [&]<typename scalar_t, typename coord_t, typename acc_t>() {
    const scalar_t* features = u.features.const_data_ptr<scalar_t>();
    const coord_t* rois = u.rois.const_data_ptr<coord_t>();
    const coord_t scale = static_cast<coord_t>(u.spatial_scale);
    scalar_t* result = u.result.mutable_data_ptr<scalar_t>();
    if (forward) {
      const auto kernel = u.channels_last ? unpool_forward_nhwc<scalar_t, coord_t, acc_t>
                                          : unpool_forward_nchw<scalar_t, coord_t, acc_t>;
      kernel(features, rois, scale, u.aligned, u.shape, result);
      return;
    }
    const at::Tensor& g = u.features;  // the gradient, any strides
    const GradStrides gs{g.stride(0), g.stride(1), g.stride(2), g.stride(3)};
    const bool unit = (u.channels_last ? gs.c : gs.w) == 1;
    const auto kernel =
        u.channels_last
            ? (unit ? unpool_backward_nhwc<scalar_t, coord_t, acc_t, true>
                    : unpool_backward_nhwc<scalar_t, coord_t, acc_t, false>)
            : (unit ? unpool_backward_nchw<scalar_t, coord_t, acc_t, true>
                    : unpool_backward_nchw<scalar_t, coord_t, acc_t, false>);
    kernel(features, gs, rois, scale, u.aligned, u.shape, result);
  });
}

at::Tensor roi_unpool_forward_cpu(const at::Tensor& input, const at::Tensor& rois,
                                  double spatial_scale, int64_t height,
                                  int64_t width, bool aligned) {
  return run_unpool(
      unpool_forward_operands(input, rois, spatial_scale, height, width, aligned),
      /*forward=*/true);
}

at::Tensor roi_unpool_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                   double spatial_scale, int64_t pooled_height,
                                   int64_t pooled_width, bool aligned) {
  return run_unpool(unpool_backward_operands(grad, rois, spatial_scale, pooled_height,
                                             pooled_width, aligned),
                    /*forward=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(roi_ops, CPU, m) {
  m.impl("roi_unpool", TORCH_FN(roi_unpool_forward_cpu));
  m.impl("_roi_unpool_backward", TORCH_FN(roi_unpool_backward_cpu));
}

}  // namespace cpu
}  // namespace roi_ops
