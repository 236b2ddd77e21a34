// ROI-Align CPU kernels: forward and deterministic backward, contiguous and
// channels_last, float16/bfloat16/float32/float64.
//
// Both directions run on the separable form of the op: out = My . X . Mx^T
// per ROI and channel, with My/Mx the sparse 1-D tables of cpu_common.h.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <utility>

#include "../common/host_prologue.h"
#include "cpu_common.h"

namespace roi_ops {
namespace cpu {
namespace {

constexpr int64_t kChannelBlock = 64;  // channels per task in channels_last

template <typename scalar_t, typename coord_t, typename acc_t>
void align_forward_nchw(const scalar_t* input, const coord_t* rois,
                        const AlignTable<acc_t>& ty, const AlignTable<acc_t>& tx,
                        const RoiShape& s, scalar_t* output) {
  const int64_t C = s.channels, H = s.height, W = s.width;
  const int64_t PH = s.pooled_h, PW = s.pooled_w;
  at::parallel_for(0, s.num_rois * C, 1, [&](int64_t begin, int64_t end) {
    // [ph, column]: rows contracted first, as contiguous (vectorisable) runs
    std::vector<acc_t> binned_rows;
    for (int64_t kc = begin; kc < end; ++kc) {
      const int64_t k = kc / C, c = kc % C;
      const int64_t b = roi_batch_index(rois + 5 * k);
      const scalar_t* plane = input + (b * C + c) * H * W;
      scalar_t* out = output + kc * PH * PW;
      int64_t x_lo, x_hi;
      tx.span(k, &x_lo, &x_hi);
      const int64_t ncols = x_hi - x_lo;
      binned_rows.assign(PH * ncols, acc_t(0));
      for (int64_t ph = 0; ph < PH; ++ph) {
        const int64_t r = ty.row(k, ph);
        const acc_t* w = ty.weights(r);
        acc_t* __restrict dst = binned_rows.data() + ph * ncols;
        for (int64_t i = 0, n = ty.length(r); i < n; ++i) {
          const scalar_t* __restrict src = plane + (ty.first[r] + i) * W + x_lo;
          const acc_t wi = w[i];
          for (int64_t x = 0; x < ncols; ++x) dst[x] += wi * static_cast<acc_t>(src[x]);
        }
      }
      for (int64_t ph = 0; ph < PH; ++ph) {
        const acc_t* src = binned_rows.data() + ph * ncols - x_lo;
        for (int64_t pw = 0; pw < PW; ++pw) {
          const int64_t r = tx.row(k, pw);
          const acc_t* w = tx.weights(r);
          const acc_t* v = src + tx.first[r];
          acc_t sum = 0;
          for (int64_t j = 0, n = tx.length(r); j < n; ++j) sum += w[j] * v[j];
          out[ph * PW + pw] = static_cast<scalar_t>(sum);
        }
      }
    }
  });
}

// Same summation order as align_forward_nchw (rows first, then columns), so
// both layouts give bitwise the same numbers.
template <typename scalar_t, typename coord_t, typename acc_t>
void align_forward_nhwc(const scalar_t* input, const coord_t* rois,
                        const AlignTable<acc_t>& ty, const AlignTable<acc_t>& tx,
                        const RoiShape& s, scalar_t* output) {
  const int64_t C = s.channels, H = s.height, W = s.width;
  const int64_t PH = s.pooled_h, PW = s.pooled_w;
  at::parallel_for(0, s.num_rois * PH, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C), column(C);
    for (int64_t kp = begin; kp < end; ++kp) {
      const int64_t k = kp / PH, ph = kp % PH;
      const int64_t b = roi_batch_index(rois + 5 * k);
      const scalar_t* image = input + b * H * W * C;
      const int64_t ry = ty.row(k, ph);
      const acc_t* wy = ty.weights(ry);
      const int64_t ni = ty.length(ry);
      for (int64_t pw = 0; pw < PW; ++pw) {
        const int64_t rx = tx.row(k, pw);
        const acc_t* wx = tx.weights(rx);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0, nj = tx.length(rx); j < nj; ++j) {
          std::fill(column.begin(), column.end(), acc_t(0));
          acc_t* __restrict col = column.data();
          for (int64_t i = 0; i < ni; ++i) {
            const scalar_t* __restrict src =
                image + ((ty.first[ry] + i) * W + tx.first[rx] + j) * C;
            const acc_t wi = wy[i];
            for (int64_t c = 0; c < C; ++c) col[c] += wi * static_cast<acc_t>(src[c]);
          }
          const acc_t wj = wx[j];
          acc_t* __restrict a = acc.data();
          for (int64_t c = 0; c < C; ++c) a[c] += wj * col[c];
        }
        scalar_t* out = output + ((k * PH + ph) * PW + pw) * C;
        for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

// Backward: each task owns one image plane (b, c) and visits that image's
// ROIs in ascending order, so every gradient element is summed in a fixed
// order whatever the thread count.
template <typename scalar_t, typename coord_t, typename acc_t>
void align_backward_nchw(const scalar_t* grad, const RoisByImage& groups,
                         const AlignTable<acc_t>& ty, const AlignTable<acc_t>& tx,
                         const RoiShape& s, int64_t batch_size,
                         scalar_t* grad_input) {
  const int64_t C = s.channels, H = s.height, W = s.width;
  const int64_t PH = s.pooled_h, PW = s.pooled_w;
  at::parallel_for(0, batch_size * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> plane_acc;
    std::vector<acc_t> binned_rows;  // [ph, column]: gradient spread over columns
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      scalar_t* out = grad_input + bc * H * W;
      acc_t* plane;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        plane = out;
        std::fill(plane, plane + H * W, acc_t(0));
      } else {
        plane_acc.assign(H * W, acc_t(0));
        plane = plane_acc.data();
      }
      for (int64_t n = groups.begin[b]; n < groups.begin[b + 1]; ++n) {
        const int64_t k = groups.order[n];
        const scalar_t* g = grad + (k * C + c) * PH * PW;
        int64_t x_lo, x_hi;
        tx.span(k, &x_lo, &x_hi);
        const int64_t ncols = x_hi - x_lo;
        binned_rows.assign(PH * ncols, acc_t(0));
        for (int64_t ph = 0; ph < PH; ++ph) {
          acc_t* dst = binned_rows.data() + ph * ncols - x_lo;
          for (int64_t pw = 0; pw < PW; ++pw) {
            const int64_t r = tx.row(k, pw);
            const acc_t* w = tx.weights(r);
            acc_t* d = dst + tx.first[r];
            const acc_t v = static_cast<acc_t>(g[ph * PW + pw]);
            for (int64_t j = 0, nj = tx.length(r); j < nj; ++j) d[j] += w[j] * v;
          }
        }
        for (int64_t ph = 0; ph < PH; ++ph) {
          const int64_t r = ty.row(k, ph);
          const acc_t* w = ty.weights(r);
          const acc_t* __restrict src = binned_rows.data() + ph * ncols;
          for (int64_t i = 0, ni = ty.length(r); i < ni; ++i) {
            acc_t* __restrict dst = plane + (ty.first[r] + i) * W + x_lo;
            const acc_t wi = w[i];
            for (int64_t x = 0; x < ncols; ++x) dst[x] += wi * src[x];
          }
        }
      }
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        for (int64_t i = 0; i < H * W; ++i) out[i] = static_cast<scalar_t>(plane[i]);
      }
    }
  });
}

// Same summation order as align_backward_nchw.
template <typename scalar_t, typename coord_t, typename acc_t>
void align_backward_nhwc(const scalar_t* grad, const RoisByImage& groups,
                         const AlignTable<acc_t>& ty, const AlignTable<acc_t>& tx,
                         const RoiShape& s, int64_t batch_size,
                         scalar_t* grad_input) {
  const int64_t C = s.channels, H = s.height, W = s.width;
  const int64_t PH = s.pooled_h, PW = s.pooled_w;
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, batch_size * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> image_acc;     // [H, W, nc]
    std::vector<acc_t> binned_row;    // [column, nc]: one bin row spread over columns
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks;
      const int64_t c0 = (task % blocks) * kChannelBlock;
      const int64_t nc = std::min(kChannelBlock, C - c0);
      image_acc.assign(H * W * nc, acc_t(0));
      for (int64_t n = groups.begin[b]; n < groups.begin[b + 1]; ++n) {
        const int64_t k = groups.order[n];
        int64_t x_lo, x_hi;
        tx.span(k, &x_lo, &x_hi);
        const int64_t ncols = x_hi - x_lo;
        for (int64_t ph = 0; ph < PH; ++ph) {
          binned_row.assign(ncols * nc, acc_t(0));
          for (int64_t pw = 0; pw < PW; ++pw) {
            const int64_t rx = tx.row(k, pw);
            const acc_t* wx = tx.weights(rx);
            const scalar_t* __restrict g = grad + ((k * PH + ph) * PW + pw) * C + c0;
            for (int64_t j = 0, nj = tx.length(rx); j < nj; ++j) {
              acc_t* __restrict dst = binned_row.data() + (tx.first[rx] + j - x_lo) * nc;
              const acc_t wj = wx[j];
              for (int64_t c = 0; c < nc; ++c) dst[c] += wj * static_cast<acc_t>(g[c]);
            }
          }
          const int64_t ry = ty.row(k, ph);
          const acc_t* wy = ty.weights(ry);
          for (int64_t i = 0, ni = ty.length(ry); i < ni; ++i) {
            acc_t* __restrict dst = image_acc.data() + ((ty.first[ry] + i) * W + x_lo) * nc;
            const acc_t* __restrict src = binned_row.data();
            const acc_t wi = wy[i];
            for (int64_t q = 0; q < ncols * nc; ++q) dst[q] += wi * src[q];
          }
        }
      }
      scalar_t* out = grad_input + b * H * W * C + c0;
      for (int64_t p = 0; p < H * W; ++p) {
        for (int64_t c = 0; c < nc; ++c) {
          out[p * C + c] = static_cast<scalar_t>(image_acc[p * nc + c]);
        }
      }
    }
  });
}

// The same table-building for both directions: rows (y) and columns (x).
template <typename coord_t, typename acc_t>
std::pair<AlignTable<acc_t>, AlignTable<acc_t>> align_tables(const AlignOperands& a) {
  const RoiShape& s = a.shape;
  const coord_t* rp = a.rois.const_data_ptr<coord_t>();
  const coord_t scale = static_cast<coord_t>(a.spatial_scale);
  return {build_align_table<coord_t, acc_t>(rp, s.num_rois, scale, a.aligned, a.sampling_ratio,
                                            s.pooled_h, s.height, true),
          build_align_table<coord_t, acc_t>(rp, s.num_rois, scale, a.aligned, a.sampling_ratio,
                                            s.pooled_w, s.width, false)};
}

at::Tensor roi_align_forward_cpu(const at::Tensor& input, const at::Tensor& rois,
                                 double spatial_scale, int64_t pooled_height,
                                 int64_t pooled_width, int64_t sampling_ratio,
                                 bool aligned) {
  const AlignOperands a = align_forward_operands(input, rois, spatial_scale, pooled_height,
                                                 pooled_width, sampling_ratio, aligned);
  return run_kernels(a, [&]<typename scalar_t, typename coord_t, typename acc_t>() {
    const auto [ty, tx] = align_tables<coord_t, acc_t>(a);
    const auto kernel = a.channels_last ? align_forward_nhwc<scalar_t, coord_t, acc_t>
                                        : align_forward_nchw<scalar_t, coord_t, acc_t>;
    kernel(a.features.const_data_ptr<scalar_t>(), a.rois.const_data_ptr<coord_t>(), ty, tx,
           a.shape, a.result.mutable_data_ptr<scalar_t>());
  });
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_height,
                                  int64_t pooled_width, int64_t batch_size,
                                  int64_t channels, int64_t height, int64_t width,
                                  int64_t sampling_ratio, bool aligned) {
  const AlignOperands a = align_backward_operands(grad, rois, spatial_scale, pooled_height,
                                                  pooled_width, batch_size, channels, height,
                                                  width, sampling_ratio, aligned);
  return run_kernels(a, [&]<typename scalar_t, typename coord_t, typename acc_t>() {
    const auto [ty, tx] = align_tables<coord_t, acc_t>(a);
    const RoisByImage groups =
        group_rois_by_image(a.rois.const_data_ptr<coord_t>(), a.shape.num_rois, batch_size);
    const auto kernel = a.channels_last ? align_backward_nhwc<scalar_t, coord_t, acc_t>
                                        : align_backward_nchw<scalar_t, coord_t, acc_t>;
    kernel(a.features.const_data_ptr<scalar_t>(), groups, ty, tx, a.shape, batch_size,
           a.result.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(roi_ops, CPU, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_cpu));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_cpu));
}

}  // namespace cpu
}  // namespace roi_ops
