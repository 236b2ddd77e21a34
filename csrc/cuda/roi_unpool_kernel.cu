// ROI-Unpool on CUDA: forward (every output element written exactly once,
// zeros outside the covered rectangle, so no separate memset) and a
// deterministic gather-style backward (each grid cell sums, in a fixed order,
// the pixels of its footprint; no atomics). Host logic: roi_host.cuh;
// element math: roi_elements.cuh over csrc/common/roi_math.h.
#include <torch/library.h>

#include "launch.cuh"
#include "roi_host.cuh"

namespace roi_ops {
namespace cuda {
namespace {

at::Tensor roi_unpool_forward_cuda(const at::Tensor& input, const at::Tensor& rois,
                                   double spatial_scale, int64_t height,
                                   int64_t width, bool aligned) {
  return roi_unpool_forward<CudaLauncher>(input, rois, spatial_scale, height, width,
                                          aligned);
}

at::Tensor roi_unpool_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                    double spatial_scale, int64_t pooled_height,
                                    int64_t pooled_width, bool aligned) {
  return roi_unpool_backward<CudaLauncher>(grad, rois, spatial_scale, pooled_height,
                                           pooled_width, aligned);
}

}  // namespace

TORCH_LIBRARY_IMPL(roi_ops, CUDA, m) {
  m.impl("roi_unpool", TORCH_FN(roi_unpool_forward_cuda));
  m.impl("_roi_unpool_backward", TORCH_FN(roi_unpool_backward_cuda));
}

}  // namespace cuda
}  // namespace roi_ops
