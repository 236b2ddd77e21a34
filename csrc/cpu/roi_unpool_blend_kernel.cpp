// Fused ROI-Unpool + softmax blend (docs/spec.md, "Fused paste-back and
// blend") on the CPU: forward and deterministic backward, contiguous and
// channels_last `base`, float16/bfloat16/float32/float64.
//
// Nothing of size K*C*H*W is ever allocated. Tasks own output rows (b, h);
// per row only the ROIs of image b whose covered rows contain h are visited
// (per-image ROI lists), each over its covered columns only, so a pixel
// costs work for exactly the ROIs that cover it. The backward runs two
// passes: per row (owner of grad_base, grad_base_logit and of small per-pixel
// softmax statistics), then per ROI (owner of that ROI's grid gradients,
// which it sums in a fixed pixel order). Every element is computed by one
// task with a fixed summation order, so the results are bitwise independent
// of the thread count, and the two layouts evaluate the very same expression
// per element (bitwise equal too).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/host_prologue.h"
#include "cpu_common.h"

namespace roi_ops {
namespace cpu {
namespace {

// Coverage and taps of every ROI, computed once per call (K * (H + W) taps).
template <typename acc_t>
struct BlendGeometry {
  std::vector<int64_t> image;           // batch index of each ROI
  std::vector<int64_t> y0, y1, x0, x1;  // covered rows [y0, y1), columns [x0, x1)
  std::vector<int64_t> ty_at, tx_at;    // where ROI k's taps start in ty / tx
  std::vector<math::Tap<acc_t>> ty, tx;
  RoisByImage by_image;

  bool covers_row(int64_t k, int64_t h) const {
    return h >= y0[k] && h < y1[k] && x0[k] < x1[k];
  }
  const math::Tap<acc_t>& row_tap(int64_t k, int64_t h) const {
    return ty[ty_at[k] + h - y0[k]];
  }
  const math::Tap<acc_t>& col_tap(int64_t k, int64_t w) const {
    return tx[tx_at[k] + w - x0[k]];
  }
  // Grid columns [*j0, *j1) that the covered columns of ROI k read (taps are
  // monotone in the pixel index).
  void col_span(int64_t k, int64_t* j0, int64_t* j1) const {
    *j0 = col_tap(k, x0[k]).lo;
    *j1 = col_tap(k, x1[k] - 1).hi + 1;
  }
};

template <typename coord_t, typename acc_t>
BlendGeometry<acc_t> blend_geometry(const BlendOperands& o) {
  const coord_t* rois = o.rois.const_data_ptr<coord_t>();
  const coord_t scale = static_cast<coord_t>(o.spatial_scale);
  const bool aligned = o.aligned;
  const BlendShape& s = o.shape;
  const int64_t K = s.num_rois;
  BlendGeometry<acc_t> g;
  g.image.resize(K);
  g.y0.resize(K);
  g.y1.resize(K);
  g.x0.resize(K);
  g.x1.resize(K);
  g.ty_at.resize(K);
  g.tx_at.resize(K);
  std::vector<math::UnpoolAxis<coord_t>> ay(K), ax(K);
  int64_t ny = 0, nx = 0;
  for (int64_t k = 0; k < K; ++k) {
    const math::UnpoolAxes<coord_t> a = math::unpool_axes(
        rois + 5 * k, scale, aligned, s.pooled_h, s.pooled_w, s.height, s.width);
    ay[k] = a.y;
    ax[k] = a.x;
    g.image[k] = roi_batch_index(rois + 5 * k);
    g.y0[k] = ay[k].first;
    g.y1[k] = ay[k].last;
    g.x0[k] = ax[k].first;
    g.x1[k] = ax[k].last;
    g.ty_at[k] = ny;
    g.tx_at[k] = nx;
    ny += ay[k].last - ay[k].first;
    nx += ax[k].last - ax[k].first;
  }
  g.ty.resize(ny);
  g.tx.resize(nx);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t h = g.y0[k]; h < g.y1[k]; ++h) {
      g.ty[g.ty_at[k] + h - g.y0[k]] = math::tap_cast<acc_t>(math::unpool_tap(ay[k], h));
    }
    for (int64_t w = g.x0[k]; w < g.x1[k]; ++w) {
      g.tx[g.tx_at[k] + w - g.x0[k]] = math::tap_cast<acc_t>(math::unpool_tap(ax[k], w));
    }
  }
  g.by_image = group_rois_by_image(rois, K, s.batch);
  return g;
}

template <typename scalar_t>
struct BlendTensors {
  const scalar_t* base;         // [B, C, H, W], contiguous in the working format
  const scalar_t* base_logit;   // [B, H, W], contiguous
  const scalar_t* input;        // [K, C, PH, PW], contiguous in the working format
  const scalar_t* input_logit;  // [K, PH, PW], contiguous
  bool channels_last;
  const scalar_t* coverage;     // [K, FH, FW] soft coverage, contiguous; nullptr: none
  int64_t cov_h, cov_w;

  // ROI k's coverage along covered row h, indexed by the column w (read
  // from w = x0[k]): the crop starts at the ROI's first covered pixel.
  template <typename acc_t>
  const scalar_t* coverage_row(const BlendGeometry<acc_t>& g, int64_t k, int64_t h) const {
    return coverage + (k * cov_h + (h - g.y0[k])) * cov_w - g.x0[k];
  }
};

// The operands as the CPU kernels read them, in base's layout: base is read
// in place when it already is (a channels_last view of token-major states is
// not copied), the small grids are brought into it.
struct BlendLayout {
  at::Tensor base, input;

  explicit BlendLayout(const BlendOperands& o)
      : base(o.base.contiguous(o.format)), input(o.input.contiguous(o.format)) {}

  template <typename scalar_t>
  BlendTensors<scalar_t> tensors(const BlendOperands& o) const {
    const bool cov = o.coverage.defined();
    return {base.const_data_ptr<scalar_t>(), o.base_logit.const_data_ptr<scalar_t>(),
            input.const_data_ptr<scalar_t>(), o.input_logit.const_data_ptr<scalar_t>(),
            o.channels_last, cov ? o.coverage.const_data_ptr<scalar_t>() : nullptr,
            cov ? o.coverage.size(1) : 0, cov ? o.coverage.size(2) : 0};
  }
};

// The softmax of one output row (b, h): the ROIs covering it and, per pixel,
// the max logit m, the normaliser z, the base weight and each ROI's weight.
template <typename acc_t>
struct RowSoftmax {
  std::vector<int64_t> active;   // ROIs of image b covering row h, ascending
  std::vector<int64_t> at;       // active.size() + 1 offsets into weight
  std::vector<acc_t> weight;     // per active ROI and covered column
  std::vector<acc_t> m, z, base_w;
  std::vector<uint8_t> covered;  // any ROI covers the pixel

  // weight of active ROI a at column w
  acc_t* roi_weights(size_t a, const BlendGeometry<acc_t>& g) {
    return weight.data() + at[a] - g.x0[active[a]];
  }

  // With soft coverage (t.coverage), ROI k takes part at a pixel only where
  // c_k > 0, its term being c_k * exp(l_k - m) (m: the max over the base and
  // the ROIs taking part); c_k = 1 everywhere gives bitwise the plain blend.
  template <typename scalar_t>
  void compute(const BlendGeometry<acc_t>& g, const BlendShape& s,
               const BlendTensors<scalar_t>& t, const scalar_t* base_logit_row,
               int64_t b, int64_t h) {
    const scalar_t* input_logit = t.input_logit;
    const int64_t W = s.width, PW = s.pooled_w, cells = s.pooled_h * s.pooled_w;
    active.clear();
    at.assign(1, 0);
    for (int64_t j = g.by_image.begin[b]; j < g.by_image.begin[b + 1]; ++j) {
      const int64_t k = g.by_image.order[j];
      if (!g.covers_row(k, h)) continue;
      active.push_back(k);
      at.push_back(at.back() + g.x1[k] - g.x0[k]);
    }
    weight.resize(at.back());
    m.resize(W);
    z.resize(W);
    base_w.resize(W);
    covered.assign(W, 0);
    for (int64_t w = 0; w < W; ++w) m[w] = static_cast<acc_t>(base_logit_row[w]);
    // logits of the covering ROIs, and the running max
    for (size_t a = 0; a < active.size(); ++a) {
      const int64_t k = active[a];
      const math::Tap<acc_t>& ty = g.row_tap(k, h);
      const scalar_t* lo = input_logit + k * cells + ty.lo * PW;
      const scalar_t* hi = input_logit + k * cells + ty.hi * PW;
      acc_t* l = roi_weights(a, g);
      const scalar_t* cov = t.coverage != nullptr ? t.coverage_row(g, k, h) : nullptr;
      for (int64_t w = g.x0[k]; w < g.x1[k]; ++w) {
        const math::Tap<acc_t>& tx = g.col_tap(k, w);
        const acc_t v = math::unpool_lerp(
            ty, tx, static_cast<acc_t>(lo[tx.lo]), static_cast<acc_t>(lo[tx.hi]),
            static_cast<acc_t>(hi[tx.lo]), static_cast<acc_t>(hi[tx.hi]));
        l[w] = v;
        if (cov != nullptr && !(static_cast<acc_t>(cov[w]) > acc_t(0))) continue;  // not taking part
        if (v > m[w]) m[w] = v;
        covered[w] = 1;
      }
    }
    // z sums base first, then the ROIs in ascending index (math::blend_weight)
    for (int64_t w = 0; w < W; ++w) {
      base_w[w] = covered[w]
                      ? math::exp_(static_cast<acc_t>(base_logit_row[w]) - m[w])
                      : acc_t(1);
      z[w] = base_w[w];
    }
    for (size_t a = 0; a < active.size(); ++a) {
      const int64_t k = active[a];
      acc_t* l = roi_weights(a, g);
      if (t.coverage != nullptr) {
        const scalar_t* cov = t.coverage_row(g, k, h);
        for (int64_t w = g.x0[k]; w < g.x1[k]; ++w) {
          l[w] = math::covered_term(l[w], m[w], static_cast<acc_t>(cov[w]));
          z[w] += l[w];
        }
        continue;
      }
      for (int64_t w = g.x0[k]; w < g.x1[k]; ++w) {
        l[w] = math::exp_(l[w] - m[w]);
        z[w] += l[w];
      }
    }
    for (int64_t w = 0; w < W; ++w) {
      if (covered[w]) base_w[w] /= z[w];
    }
    for (size_t a = 0; a < active.size(); ++a) {
      const int64_t k = active[a];
      acc_t* l = roi_weights(a, g);
      for (int64_t w = g.x0[k]; w < g.x1[k]; ++w) l[w] /= z[w];
    }
  }
};

// Grid ROI k, row-interpolated at tap ty for columns [j0, j1), all channels:
// yrow[j * C + c] (channels_last) or, for one channel plane, yrow[j].
template <typename scalar_t, typename acc_t>
inline void y_interp_nhwc(const scalar_t* grid, const math::Tap<acc_t>& ty,
                          int64_t PW, int64_t C, int64_t j0, int64_t j1,
                          acc_t* yrow) {
  const scalar_t* lo = grid + ty.lo * PW * C;
  const scalar_t* hi = grid + ty.hi * PW * C;
  for (int64_t i = j0 * C; i < j1 * C; ++i) {
    yrow[i] = ty.w_lo * static_cast<acc_t>(lo[i]) + ty.w_hi * static_cast<acc_t>(hi[i]);
  }
}

template <typename scalar_t, typename acc_t>
inline void y_interp_plane(const scalar_t* plane, const math::Tap<acc_t>& ty,
                           int64_t PW, int64_t j0, int64_t j1, acc_t* yrow) {
  const scalar_t* lo = plane + ty.lo * PW;
  const scalar_t* hi = plane + ty.hi * PW;
  for (int64_t j = j0; j < j1; ++j) {
    yrow[j] = ty.w_lo * static_cast<acc_t>(lo[j]) + ty.w_hi * static_cast<acc_t>(hi[j]);
  }
}

// ------------------------------------------------------------------ forward

template <typename scalar_t, typename acc_t>
void blend_forward(const BlendTensors<scalar_t>& t, const BlendGeometry<acc_t>& g,
                   const BlendShape& s, scalar_t* out, scalar_t* base_weight) {
  const int64_t C = s.channels, H = s.height, W = s.width;
  const int64_t PH = s.pooled_h, PW = s.pooled_w;
  at::parallel_for(0, s.batch * H, 1, [&](int64_t begin, int64_t end) {
    RowSoftmax<acc_t> sm;
    std::vector<acc_t> acc, yrow;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      sm.compute(g, s, t, t.base_logit + bh * W, b, h);
      for (int64_t w = 0; w < W; ++w) base_weight[bh * W + w] = static_cast<scalar_t>(sm.base_w[w]);
      if (t.channels_last) {
        const scalar_t* base = t.base + bh * W * C;
        scalar_t* o = out + bh * W * C;
        acc.resize(W * C);
        yrow.resize(PW * C);
        for (int64_t w = 0; w < W; ++w) {
          if (!sm.covered[w]) continue;
          for (int64_t c = 0; c < C; ++c) {
            acc[w * C + c] = sm.base_w[w] * static_cast<acc_t>(base[w * C + c]);
          }
        }
        for (size_t a = 0; a < sm.active.size(); ++a) {
          const int64_t k = sm.active[a];
          int64_t j0, j1;
          g.col_span(k, &j0, &j1);
          y_interp_nhwc(t.input + k * PH * PW * C, g.row_tap(k, h), PW, C, j0, j1,
                        yrow.data());
          const acc_t* wk = sm.roi_weights(a, g);
          for (int64_t w = g.x0[k]; w < g.x1[k]; ++w) {
            const math::Tap<acc_t>& tx = g.col_tap(k, w);
            const acc_t* __restrict ya = yrow.data() + tx.lo * C;
            const acc_t* __restrict yb = yrow.data() + tx.hi * C;
            acc_t* __restrict dst = acc.data() + w * C;
            const acc_t weight = wk[w];
            for (int64_t c = 0; c < C; ++c) {
              dst[c] += weight * (tx.w_lo * ya[c] + tx.w_hi * yb[c]);
            }
          }
        }
        for (int64_t w = 0; w < W; ++w) {
          if (sm.covered[w]) {
            for (int64_t c = 0; c < C; ++c) o[w * C + c] = static_cast<scalar_t>(acc[w * C + c]);
          } else {
            for (int64_t c = 0; c < C; ++c) o[w * C + c] = base[w * C + c];
          }
        }
      } else {
        acc.resize(W);
        yrow.resize(PW);
        for (int64_t c = 0; c < C; ++c) {
          const int64_t row = ((b * C + c) * H + h) * W;
          const scalar_t* base = t.base + row;
          scalar_t* o = out + row;
          for (int64_t w = 0; w < W; ++w) {
            if (sm.covered[w]) acc[w] = sm.base_w[w] * static_cast<acc_t>(base[w]);
          }
          for (size_t a = 0; a < sm.active.size(); ++a) {
            const int64_t k = sm.active[a];
            int64_t j0, j1;
            g.col_span(k, &j0, &j1);
            y_interp_plane(t.input + (k * C + c) * PH * PW, g.row_tap(k, h), PW, j0,
                           j1, yrow.data());
            const acc_t* wk = sm.roi_weights(a, g);
            for (int64_t w = g.x0[k]; w < g.x1[k]; ++w) {
              const math::Tap<acc_t>& tx = g.col_tap(k, w);
              acc[w] += wk[w] * (tx.w_lo * yrow[tx.lo] + tx.w_hi * yrow[tx.hi]);
            }
          }
          for (int64_t w = 0; w < W; ++w) {
            o[w] = sm.covered[w] ? static_cast<scalar_t>(acc[w]) : base[w];
          }
        }
      }
    }
  });
}

// ----------------------------------------------------------------- backward

// Per-pixel statistics the per-ROI pass reads: m, z and <grad, out> (the
// latter recomputed from the pieces in the accumulation type).
template <typename acc_t>
struct PixelStats {
  acc_t* m;
  acc_t* z;
  acc_t* gout;
};

// Pass A, per row: grad_base = w_base * g, grad_base_logit and the stats.
// With s_j = <g, value_j> and gout = sum_j w_j s_j:
//   d/dl_j = w_j (s_j - gout) + gbw * w_base * (delta_{j,base} - w_j).
template <typename scalar_t, typename acc_t>
void blend_backward_rows(const BlendTensors<scalar_t>& t, const BlendGeometry<acc_t>& g,
                         const BlendShape& s, const scalar_t* grad,
                         const scalar_t* grad_bw, scalar_t* grad_base,
                         scalar_t* grad_base_logit, const PixelStats<acc_t>& st) {
  const int64_t C = s.channels, H = s.height, W = s.width;
  const int64_t PH = s.pooled_h, PW = s.pooled_w;
  at::parallel_for(0, s.batch * H, 1, [&](int64_t begin, int64_t end) {
    RowSoftmax<acc_t> sm;
    std::vector<acc_t> yrow, s_base, s_roi;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      sm.compute(g, s, t, t.base_logit + bh * W, b, h);
      s_base.assign(W, acc_t(0));
      s_roi.assign(sm.weight.size(), acc_t(0));
      if (t.channels_last) {
        const scalar_t* base = t.base + bh * W * C;
        const scalar_t* gr = grad + bh * W * C;
        yrow.resize(PW * C);
        for (int64_t w = 0; w < W; ++w) {
          // with coverage, <g, base> is also needed where no ROI takes part
          // (the coverage gradient of an ROI there)
          if (!sm.covered[w] && t.coverage == nullptr) continue;
          acc_t sum = acc_t(0);
          for (int64_t c = 0; c < C; ++c) {
            sum += static_cast<acc_t>(gr[w * C + c]) * static_cast<acc_t>(base[w * C + c]);
          }
          s_base[w] = sum;
        }
        for (size_t a = 0; a < sm.active.size(); ++a) {
          const int64_t k = sm.active[a];
          int64_t j0, j1;
          g.col_span(k, &j0, &j1);
          y_interp_nhwc(t.input + k * PH * PW * C, g.row_tap(k, h), PW, C, j0, j1,
                        yrow.data());
          acc_t* sr = s_roi.data() + sm.at[a] - g.x0[k];
          for (int64_t w = g.x0[k]; w < g.x1[k]; ++w) {
            const math::Tap<acc_t>& tx = g.col_tap(k, w);
            const acc_t* ya = yrow.data() + tx.lo * C;
            const acc_t* yb = yrow.data() + tx.hi * C;
            const scalar_t* gp = gr + w * C;
            acc_t sum = acc_t(0);
            for (int64_t c = 0; c < C; ++c) {
              sum += static_cast<acc_t>(gp[c]) * (tx.w_lo * ya[c] + tx.w_hi * yb[c]);
            }
            sr[w] = sum;
          }
        }
      } else {
        yrow.resize(PW);
        for (int64_t c = 0; c < C; ++c) {
          const int64_t row = ((b * C + c) * H + h) * W;
          const scalar_t* base = t.base + row;
          const scalar_t* gr = grad + row;
          for (int64_t w = 0; w < W; ++w) {
            if (sm.covered[w] || t.coverage != nullptr) {
              s_base[w] += static_cast<acc_t>(gr[w]) * static_cast<acc_t>(base[w]);
            }
          }
          for (size_t a = 0; a < sm.active.size(); ++a) {
            const int64_t k = sm.active[a];
            int64_t j0, j1;
            g.col_span(k, &j0, &j1);
            y_interp_plane(t.input + (k * C + c) * PH * PW, g.row_tap(k, h), PW, j0,
                           j1, yrow.data());
            acc_t* sr = s_roi.data() + sm.at[a] - g.x0[k];
            for (int64_t w = g.x0[k]; w < g.x1[k]; ++w) {
              const math::Tap<acc_t>& tx = g.col_tap(k, w);
              sr[w] += static_cast<acc_t>(gr[w]) * (tx.w_lo * yrow[tx.lo] + tx.w_hi * yrow[tx.hi]);
            }
          }
        }
      }
      // <g, out> = w_base s_base + sum_k w_k s_k, ROIs in ascending index
      acc_t* gout = st.gout + bh * W;
      for (int64_t w = 0; w < W; ++w) gout[w] = sm.base_w[w] * s_base[w];
      for (size_t a = 0; a < sm.active.size(); ++a) {
        const int64_t k = sm.active[a];
        const acc_t* wk = sm.roi_weights(a, g);
        const acc_t* sr = s_roi.data() + sm.at[a] - g.x0[k];
        for (int64_t w = g.x0[k]; w < g.x1[k]; ++w) gout[w] += wk[w] * sr[w];
      }
      for (int64_t w = 0; w < W; ++w) {
        st.m[bh * W + w] = sm.m[w];
        st.z[bh * W + w] = sm.z[w];
        acc_t d = acc_t(0);  // one weight fixed at 1: no logit gradient
        if (sm.covered[w]) {
          const acc_t wb = sm.base_w[w];
          d = wb * (s_base[w] - gout[w]);
          if (grad_bw != nullptr) {
            d += static_cast<acc_t>(grad_bw[bh * W + w]) * wb * (acc_t(1) - wb);
          }
        }
        grad_base_logit[bh * W + w] = static_cast<scalar_t>(d);
      }
      if (t.channels_last) {
        const scalar_t* gr = grad + bh * W * C;
        scalar_t* gb = grad_base + bh * W * C;
        for (int64_t w = 0; w < W; ++w) {
          if (sm.covered[w]) {
            const acc_t wb = sm.base_w[w];
            for (int64_t c = 0; c < C; ++c) {
              gb[w * C + c] = static_cast<scalar_t>(wb * static_cast<acc_t>(gr[w * C + c]));
            }
          } else {
            for (int64_t c = 0; c < C; ++c) gb[w * C + c] = gr[w * C + c];
          }
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t row = ((b * C + c) * H + h) * W;
          const scalar_t* gr = grad + row;
          scalar_t* gb = grad_base + row;
          for (int64_t w = 0; w < W; ++w) {
            gb[w] = sm.covered[w]
                        ? static_cast<scalar_t>(sm.base_w[w] * static_cast<acc_t>(gr[w]))
                        : gr[w];
          }
        }
      }
    }
  });
}

// Adds v to the four cells of the taps (ty, tx), in the fixed order
// (lo,lo) (lo,hi) (hi,lo) (hi,hi): the adjoint of math::unpool_lerp.
// `cell(i, j)` returns the address of cell (i, j); `n` values each.
template <typename acc_t, typename CellFn>
inline void scatter_taps(const math::Tap<acc_t>& ty, const math::Tap<acc_t>& tx,
                         const acc_t* v, int64_t n, CellFn&& cell) {
  const int64_t is[4] = {ty.lo, ty.lo, ty.hi, ty.hi};
  const int64_t js[4] = {tx.lo, tx.hi, tx.lo, tx.hi};
  const acc_t wy[4] = {ty.w_lo, ty.w_lo, ty.w_hi, ty.w_hi};
  const acc_t wx[4] = {tx.w_lo, tx.w_hi, tx.w_lo, tx.w_hi};
  for (int q = 0; q < 4; ++q) {
    acc_t* __restrict dst = cell(is[q], js[q]);
    for (int64_t c = 0; c < n; ++c) dst[c] += wy[q] * (wx[q] * v[c]);
  }
}

// Pass B, per ROI: the task owning ROI k visits its covered pixels row by
// row and sums w_k * g into its grid cells and d/dl_k into its logit cells.
template <typename scalar_t, typename acc_t>
void blend_backward_rois(const BlendTensors<scalar_t>& t, const BlendGeometry<acc_t>& g,
                         const BlendShape& s, const scalar_t* grad,
                         const scalar_t* grad_bw, const PixelStats<acc_t>& st,
                         scalar_t* grad_input, const int64_t* gi_stride,
                         scalar_t* grad_input_logit, scalar_t* grad_coverage) {
  const int64_t C = s.channels, H = s.height, W = s.width;
  const int64_t PH = s.pooled_h, PW = s.pooled_w;
  at::parallel_for(0, s.num_rois, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> cells, cells_l, yrow, wrow, rrow, srow, gv;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t b = g.image[k];
      const int64_t x0 = g.x0[k], x1 = g.x1[k], nx = x1 - x0;
      // cell layout: [PH, PW, C] (channels_last) or [C, PH, PW]
      cells.assign(PH * PW * C, acc_t(0));
      cells_l.assign(PH * PW, acc_t(0));
      for (int64_t h = g.y0[k]; h < g.y1[k] && nx > 0; ++h) {
        const math::Tap<acc_t>& ty = g.row_tap(k, h);
        const int64_t p0 = (b * H + h) * W;  // pixel index of (b, h, 0)
        const scalar_t* lo = t.input_logit + k * PH * PW + ty.lo * PW;
        const scalar_t* hi = t.input_logit + k * PH * PW + ty.hi * PW;
        wrow.resize(nx);
        srow.assign(nx, acc_t(0));
        const scalar_t* cov = t.coverage != nullptr ? t.coverage_row(g, k, h) : nullptr;
        if (cov != nullptr) rrow.resize(nx);
        for (int64_t w = x0; w < x1; ++w) {
          const math::Tap<acc_t>& tx = g.col_tap(k, w);
          const acc_t l = math::unpool_lerp(
              ty, tx, static_cast<acc_t>(lo[tx.lo]), static_cast<acc_t>(lo[tx.hi]),
              static_cast<acc_t>(hi[tx.lo]), static_cast<acc_t>(hi[tx.hi]));
          if (cov == nullptr) {
            wrow[w - x0] = math::blend_weight(l, st.m[p0 + w], st.z[p0 + w]);
          } else {
            // the forward's weight, and r = exp(l - m) / z, its rate per unit
            // of coverage
            const acc_t c = static_cast<acc_t>(cov[w]);
            wrow[w - x0] = math::covered_term(l, st.m[p0 + w], c) / st.z[p0 + w];
            rrow[w - x0] = math::blend_weight(l, st.m[p0 + w], st.z[p0 + w]);
          }
        }
        int64_t j0, j1;
        g.col_span(k, &j0, &j1);
        if (t.channels_last) {
          yrow.resize(PW * C);
          y_interp_nhwc(t.input + k * PH * PW * C, ty, PW, C, j0, j1, yrow.data());
          for (int64_t w = x0; w < x1; ++w) {
            const math::Tap<acc_t>& tx = g.col_tap(k, w);
            const acc_t* ya = yrow.data() + tx.lo * C;
            const acc_t* yb = yrow.data() + tx.hi * C;
            const scalar_t* gp = grad + (p0 + w) * C;
            acc_t sum = acc_t(0);
            for (int64_t c = 0; c < C; ++c) {
              sum += static_cast<acc_t>(gp[c]) * (tx.w_lo * ya[c] + tx.w_hi * yb[c]);
            }
            srow[w - x0] = sum;
          }
        } else {
          yrow.resize(PW);
          for (int64_t c = 0; c < C; ++c) {
            y_interp_plane(t.input + (k * C + c) * PH * PW, ty, PW, j0, j1, yrow.data());
            const scalar_t* gr = grad + ((b * C + c) * H + h) * W;
            for (int64_t w = x0; w < x1; ++w) {
              const math::Tap<acc_t>& tx = g.col_tap(k, w);
              srow[w - x0] += static_cast<acc_t>(gr[w]) * (tx.w_lo * yrow[tx.lo] + tx.w_hi * yrow[tx.hi]);
            }
          }
        }
        // logit gradient of this ROI at each pixel, scattered to its cells
        for (int64_t w = x0; w < x1; ++w) {
          const int64_t p = p0 + w;
          const acc_t wk = wrow[w - x0];
          acc_t d = wk * (srow[w - x0] - st.gout[p]);
          if (grad_bw != nullptr) {
            const acc_t wb = math::blend_weight(static_cast<acc_t>(t.base_logit[p]),
                                                st.m[p], st.z[p]);
            d -= static_cast<acc_t>(grad_bw[p]) * wb * wk;
          }
          scatter_taps(ty, g.col_tap(k, w), &d, 1,
                       [&](int64_t i, int64_t j) { return cells_l.data() + i * PW + j; });
        }
        // coverage gradient: d out / d c_k = r_k (v_k - out) (+ the base
        // weight's share), each pixel its own crop cell
        if (cov != nullptr) {
          scalar_t* gc = grad_coverage + (k * t.cov_h + (h - g.y0[k])) * t.cov_w - x0;
          for (int64_t w = x0; w < x1; ++w) {
            const int64_t p = p0 + w;
            acc_t d = srow[w - x0] - st.gout[p];
            if (grad_bw != nullptr) {
              d -= static_cast<acc_t>(grad_bw[p]) *
                   math::blend_weight(static_cast<acc_t>(t.base_logit[p]), st.m[p], st.z[p]);
            }
            gc[w] = static_cast<scalar_t>(rrow[w - x0] * d);
          }
        }
        // value gradient: w_k * g scattered to the grid cells
        if (t.channels_last) {
          gv.resize(C);
          for (int64_t w = x0; w < x1; ++w) {
            const acc_t wk = wrow[w - x0];
            const scalar_t* gp = grad + (p0 + w) * C;
            for (int64_t c = 0; c < C; ++c) gv[c] = wk * static_cast<acc_t>(gp[c]);
            scatter_taps(ty, g.col_tap(k, w), gv.data(), C, [&](int64_t i, int64_t j) {
              return cells.data() + (i * PW + j) * C;
            });
          }
        } else {
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* gr = grad + ((b * C + c) * H + h) * W;
            acc_t* plane = cells.data() + c * PH * PW;
            for (int64_t w = x0; w < x1; ++w) {
              const acc_t v = wrow[w - x0] * static_cast<acc_t>(gr[w]);
              scatter_taps(ty, g.col_tap(k, w), &v, 1,
                           [&](int64_t i, int64_t j) { return plane + i * PW + j; });
            }
          }
        }
      }
      for (int64_t i = 0; i < PH * PW; ++i) {
        grad_input_logit[k * PH * PW + i] = static_cast<scalar_t>(cells_l[i]);
      }
      scalar_t* gi = grad_input + k * gi_stride[0];
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t i = 0; i < PH; ++i) {
          for (int64_t j = 0; j < PW; ++j) {
            const acc_t v = t.channels_last ? cells[(i * PW + j) * C + c]
                                            : cells[(c * PH + i) * PW + j];
            gi[c * gi_stride[1] + i * gi_stride[2] + j * gi_stride[3]] =
                static_cast<scalar_t>(v);
          }
        }
      }
    }
  });
}

// --------------------------------------------------------------------- host

std::tuple<at::Tensor, at::Tensor> roi_unpool_blend_forward_cpu(
    const at::Tensor& base, const at::Tensor& base_logit, const at::Tensor& input,
    const at::Tensor& input_logit, const at::Tensor& rois, double spatial_scale,
    bool aligned, const std::optional<at::Tensor>& coverage) {
  const BlendOperands o = blend_forward_operands(base, base_logit, input, input_logit, rois,
                                                 spatial_scale, aligned, coverage);
  prefer_huge_pages(o.out);
  if (!o.has_work) return {o.out, o.base_weight};
  const BlendLayout layout(o);
  o.dispatch([&]<typename scalar_t, typename coord_t, typename acc_t>() {
    blend_forward<scalar_t, acc_t>(layout.tensors<scalar_t>(o), blend_geometry<coord_t, acc_t>(o),
                                   o.shape, o.out.mutable_data_ptr<scalar_t>(),
                                   o.base_weight.mutable_data_ptr<scalar_t>());
  });
  return {o.out, o.base_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
roi_unpool_blend_backward_cpu(const at::Tensor& grad_out,
                              const std::optional<at::Tensor>& grad_base_weight,
                              const at::Tensor& base, const at::Tensor& base_logit,
                              const at::Tensor& input, const at::Tensor& input_logit,
                              const at::Tensor& rois, double spatial_scale,
                              bool aligned, const std::optional<at::Tensor>& coverage) {
  const BlendOperands o = blend_backward_operands(grad_out, grad_base_weight, base, base_logit,
                                                  input, input_logit, rois, spatial_scale,
                                                  aligned, coverage);
  if (!o.has_work) {
    return {o.grad_base, o.grad_base_logit, o.grad_input, o.grad_input_logit, o.grad_coverage};
  }
  prefer_huge_pages(o.grad_base);
  const BlendLayout layout(o);
  const at::Tensor g = o.grad_out.contiguous(o.format);
  const int64_t gi_stride[4] = {o.grad_input.stride(0), o.grad_input.stride(1),
                                o.grad_input.stride(2), o.grad_input.stride(3)};
  o.dispatch([&]<typename scalar_t, typename coord_t, typename acc_t>() {
    const BlendGeometry<acc_t> geo = blend_geometry<coord_t, acc_t>(o);
    const BlendTensors<scalar_t> t = layout.tensors<scalar_t>(o);
    const scalar_t* gbw_ptr =
        o.grad_base_weight.defined() ? o.grad_base_weight.const_data_ptr<scalar_t>() : nullptr;
    const int64_t pixels = o.shape.batch * o.shape.height * o.shape.width;
    std::vector<acc_t> stats(3 * pixels);
    const PixelStats<acc_t> st{stats.data(), stats.data() + pixels,
                               stats.data() + 2 * pixels};
    blend_backward_rows<scalar_t, acc_t>(t, geo, o.shape, g.const_data_ptr<scalar_t>(), gbw_ptr,
                                         o.grad_base.mutable_data_ptr<scalar_t>(),
                                         o.grad_base_logit.mutable_data_ptr<scalar_t>(), st);
    blend_backward_rois<scalar_t, acc_t>(t, geo, o.shape, g.const_data_ptr<scalar_t>(), gbw_ptr,
                                         st, o.grad_input.mutable_data_ptr<scalar_t>(), gi_stride,
                                         o.grad_input_logit.mutable_data_ptr<scalar_t>(),
                                         o.coverage.defined()
                                             ? o.grad_coverage.mutable_data_ptr<scalar_t>()
                                             : nullptr);
  });
  return {o.grad_base, o.grad_base_logit, o.grad_input, o.grad_input_logit, o.grad_coverage};
}

}  // namespace

TORCH_LIBRARY_IMPL(roi_ops, CPU, m) {
  m.impl("roi_unpool_blend", TORCH_FN(roi_unpool_blend_forward_cpu));
  m.impl("_roi_unpool_blend_backward", TORCH_FN(roi_unpool_blend_backward_cpu));
}

}  // namespace cpu
}  // namespace roi_ops
