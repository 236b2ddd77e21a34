// Host emulation of the CUDA backend, for machines without a GPU.
//
// Compiles the CUDA backend's own host functions (csrc/cuda/roi_host.h,
// csrc/cuda/blend_host.h) and element bodies (csrc/cuda/roi_elements.h,
// csrc/cuda/blend_elements.h) with the host compiler, and
// runs every "kernel" as a loop over its element indices instead of a grid
// launch. Everything but the launch (checks, ROI sorting, footprints, strides,
// layouts, dtype dispatch, the per-element math) is the code the GPU runs, so
// tools/test_cuda_emulate.py can test it against the CPU kernels and the
// float64 oracle. Both compilers evaluate the math in IEEE order (nvcc with
// --fmad=false, as the CUDA build uses), so results match the GPU's.
//
// The ops are registered as roi_ops_emu::* for CPU tensors, beside (not in
// place of) the real roi_ops::* ops: one per op that csrc/cuda/roi_ops_cuda.cpp
// registers for CUDA, with the same host function and the same schema
// (tools/test_cuda_emulate.py fails when one is missing or differs).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cuda/blend_host.h"
#include "cuda/roi_host.h"

namespace roi_ops {
namespace cuda {
namespace {

struct HostLauncher {
  explicit HostLauncher(const c10::Device&) {}

  template <typename Params>
  void operator()(const Params& p, int64_t n) const {
    if (n <= 0) return;
    // Threads only split the index space, like the grid does: each element
    // is computed by one call, whatever the split.
    at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) apply_element(p, i);
    });
  }
};

}  // namespace

TORCH_LIBRARY(roi_ops_emu, m) {
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
      "bool aligned) -> Tensor");
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
      "SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
      "bool aligned) -> Tensor");
  m.def(
      "roi_unpool(Tensor input, Tensor rois, float spatial_scale, "
      "SymInt height, SymInt width, bool aligned) -> Tensor");
  m.def(
      "_roi_unpool_backward(Tensor grad, Tensor rois, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, bool aligned) -> Tensor");
  m.def(
      "roi_unpool_blend(Tensor base, Tensor base_logit, Tensor input, "
      "Tensor input_logit, Tensor rois, float spatial_scale, bool aligned) "
      "-> (Tensor, Tensor)");
  m.def(
      "_roi_unpool_blend_backward(Tensor grad_out, Tensor? grad_base_weight, "
      "Tensor base, Tensor base_logit, Tensor input, Tensor input_logit, "
      "Tensor rois, float spatial_scale, bool aligned) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(roi_ops_emu, CPU, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward<HostLauncher>));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward<HostLauncher>));
  m.impl("roi_unpool", TORCH_FN(roi_unpool_forward<HostLauncher>));
  m.impl("_roi_unpool_backward", TORCH_FN(roi_unpool_backward<HostLauncher>));
  m.impl("roi_unpool_blend", TORCH_FN(blend::blend_forward<HostLauncher>));
  m.impl("_roi_unpool_blend_backward", TORCH_FN(blend::blend_backward<HostLauncher>));
}

}  // namespace cuda
}  // namespace roi_ops
