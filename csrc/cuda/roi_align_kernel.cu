// ROI-Align on CUDA: forward, and a deterministic gather-style backward (no
// atomics: every input-gradient element sums, in a fixed order, the samples
// that read it, so gradients are bitwise reproducible and
// torch.use_deterministic_algorithms(True) holds). Host logic: roi_host.cuh;
// element math: roi_elements.cuh over csrc/common/roi_math.h.
#include <torch/library.h>

#include "launch.cuh"
#include "roi_host.cuh"

namespace roi_ops {
namespace cuda {
namespace {

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_height,
                                  int64_t pooled_width, int64_t sampling_ratio,
                                  bool aligned) {
  return roi_align_forward<CudaLauncher>(input, rois, spatial_scale, pooled_height,
                                         pooled_width, sampling_ratio, aligned);
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                   double spatial_scale, int64_t pooled_height,
                                   int64_t pooled_width, int64_t batch_size,
                                   int64_t channels, int64_t height, int64_t width,
                                   int64_t sampling_ratio, bool aligned) {
  return roi_align_backward<CudaLauncher>(grad, rois, spatial_scale, pooled_height,
                                          pooled_width, batch_size, channels,
                                          height, width, sampling_ratio, aligned);
}

}  // namespace

TORCH_LIBRARY_IMPL(roi_ops, CUDA, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_cuda));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_cuda));
}

}  // namespace cuda
}  // namespace roi_ops
