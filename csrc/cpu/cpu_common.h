// Helpers shared by the CPU kernels: the huge-page hint for fresh outputs,
// the run of ROI-Align and ROI-Unpool kernels after the shared prologue,
// per-image ROI lists and sparse 1-D interpolation tables.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../common/host_prologue.h"
#include "../common/roi_math.h"

namespace roi_ops {
namespace cpu {

// A large fresh output costs more in page faults than in writing it (262 MB
// of ROI-Unpool output: ~70 ms of 4 KiB faults vs ~9 ms of stores). Asking
// for transparent huge pages on it before the first touch cuts the faults
// 512-fold where the kernel's THP mode is "madvise" (a hint only: no effect
// elsewhere, and the memory is still the allocator's to free).
inline void prefer_huge_pages(const at::Tensor& fresh_output) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = fresh_output.numel() * fresh_output.element_size();
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(fresh_output.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#else
  (void)fresh_output;
#endif
}

// What a ROI-Align or ROI-Unpool host function does after the shared
// prologue: without work, return the (zero) result; else hint huge pages on
// the fresh result and run `kernels`, a template lambda over
// <scalar_t, coord_t, acc_t> (see dispatch_value_and_coord_types).
template <typename Kernels>
at::Tensor run_kernels(const GridOperands& o, Kernels&& kernels) {
  if (!o.has_work) return o.result;
  prefer_huge_pages(o.result);
  o.dispatch(std::forward<Kernels>(kernels));
  return o.result;
}

template <typename coord_t>
inline int64_t roi_batch_index(const coord_t* roi) {
  return static_cast<int64_t>(roi[0]);
}

// ROI indices grouped by image, in ascending ROI order within an image, so a
// thread that owns an image slice visits its ROIs in a fixed order (what
// makes the backward deterministic and independent of the thread count).
struct RoisByImage {
  std::vector<int64_t> order;   // ROI indices, grouped by image
  std::vector<int64_t> begin;   // size B + 1: order[begin[b]:begin[b+1]]
};

template <typename coord_t>
RoisByImage group_rois_by_image(const coord_t* rois, int64_t num_rois,
                                int64_t batch_size) {
  RoisByImage g;
  g.begin.assign(batch_size + 1, 0);
  for (int64_t k = 0; k < num_rois; ++k) {
    ++g.begin[roi_batch_index(rois + 5 * k) + 1];
  }
  for (int64_t b = 0; b < batch_size; ++b) g.begin[b + 1] += g.begin[b];
  g.order.resize(num_rois);
  std::vector<int64_t> fill(g.begin.begin(), g.begin.end() - 1);
  for (int64_t k = 0; k < num_rois; ++k) {
    g.order[fill[roi_batch_index(rois + 5 * k)]++] = k;
  }
  return g;
}

// ROI-Align along one axis for all ROIs, as a sparse matrix: row (k, p) holds
// the summed 1-D tap weights of bin p's samples (divided by the samples per
// bin) for pixels [first, first + length). Building it costs one pass over
// the samples; the kernels then run separable dense loops.
template <typename acc_t>
struct AlignTable {
  int64_t pooled = 0;
  std::vector<int64_t> offset;  // K * pooled + 1
  std::vector<int64_t> first;   // K * pooled
  std::vector<acc_t> weight;

  int64_t row(int64_t k, int64_t p) const { return k * pooled + p; }
  int64_t length(int64_t r) const { return offset[r + 1] - offset[r]; }
  const acc_t* weights(int64_t r) const { return weight.data() + offset[r]; }
  // Union of the rows' spans of ROI k: [lo, hi).
  void span(int64_t k, int64_t* lo, int64_t* hi) const {
    *lo = INT64_MAX;
    *hi = INT64_MIN;
    for (int64_t p = 0; p < pooled; ++p) {
      const int64_t r = row(k, p);
      if (length(r) == 0) continue;
      *lo = std::min(*lo, first[r]);
      *hi = std::max(*hi, first[r] + length(r));
    }
    if (*lo >= *hi) *lo = *hi = 0;
  }
};

// axis 0: y (uses roi rows y1/y2, pooled height, H); axis 1: x.
template <typename coord_t, typename acc_t>
AlignTable<acc_t> build_align_table(const coord_t* rois, int64_t num_rois,
                                    coord_t spatial_scale, bool aligned,
                                    int64_t sampling_ratio, int64_t pooled,
                                    int64_t size, bool y_axis) {
  AlignTable<acc_t> t;
  t.pooled = pooled;
  const int64_t rows = num_rois * pooled;
  t.offset.assign(rows + 1, 0);
  t.first.assign(rows, 0);

  auto axis_of = [&](int64_t k) {
    const math::RoiFrame<coord_t> f =
        math::map_roi(rois + 5 * k, spatial_scale, aligned);
    return y_axis ? math::align_axis(f.y0, f.height, pooled, sampling_ratio, size)
                  : math::align_axis(f.x0, f.width, pooled, sampling_ratio, size);
  };
  // Visits the taps of the samples of bin p that can land on the map.
  auto for_each_tap = [&](const math::AlignAxis<coord_t>& a, int64_t p,
                          auto&& fn) {
    int64_t i0, i1;
    math::align_sample_range(a, p, coord_t(-1), static_cast<coord_t>(size), &i0,
                             &i1);
    for (int64_t i = i0; i < i1; ++i) {
      const math::Tap<coord_t> tap = math::align_tap(math::align_sample(a, p, i), size);
      if (tap.valid) fn(tap);
    }
  };

  // Pass 1: span of every row.
  at::parallel_for(0, num_rois, 16, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const math::AlignAxis<coord_t> a = axis_of(k);
      for (int64_t p = 0; p < pooled; ++p) {
        int64_t lo = INT64_MAX, hi = INT64_MIN;
        for_each_tap(a, p, [&](const math::Tap<coord_t>& tap) {
          lo = std::min(lo, tap.lo);
          hi = std::max(hi, tap.hi + 1);
        });
        const int64_t r = t.row(k, p);
        t.first[r] = lo < hi ? lo : 0;
        t.offset[r + 1] = lo < hi ? hi - lo : 0;
      }
    }
  });
  for (int64_t r = 0; r < rows; ++r) t.offset[r + 1] += t.offset[r];
  t.weight.assign(t.offset[rows], acc_t(0));

  // Pass 2: weights.
  at::parallel_for(0, num_rois, 16, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const math::AlignAxis<coord_t> a = axis_of(k);
      if (a.grid <= 0) continue;
      const acc_t inv_grid = acc_t(1) / static_cast<acc_t>(a.grid);
      for (int64_t p = 0; p < pooled; ++p) {
        const int64_t r = t.row(k, p);
        acc_t* w = t.weight.data() + t.offset[r] - t.first[r];
        for_each_tap(a, p, [&](const math::Tap<coord_t>& tap) {
          w[tap.lo] += static_cast<acc_t>(tap.w_lo) * inv_grid;
          w[tap.hi] += static_cast<acc_t>(tap.w_hi) * inv_grid;
        });
      }
    }
  });
  return t;
}

}  // namespace cpu
}  // namespace roi_ops
