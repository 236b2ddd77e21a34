// CUDA registrations of every roi_ops op (forward and backward). Host code
// only, compiled by the host compiler: the kernels are in the *.cu files,
// reached through launch_elements.h, so the heavy ATen headers are parsed once rather
// than once per architecture.
#include <torch/library.h>

#include "blend_host.h"
#include "cuda_launcher.h"
#include "roi_host.h"

namespace roi_ops {
namespace cuda {

TORCH_LIBRARY_IMPL(roi_ops, CUDA, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward<CudaLauncher>));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward<CudaLauncher>));
  m.impl("roi_unpool", TORCH_FN(roi_unpool_forward<CudaLauncher>));
  m.impl("_roi_unpool_backward", TORCH_FN(roi_unpool_backward<CudaLauncher>));
  m.impl("roi_unpool_blend", TORCH_FN(blend::blend_forward<CudaLauncher>));
  m.impl("_roi_unpool_blend_backward", TORCH_FN(blend::blend_backward<CudaLauncher>));
}

}  // namespace cuda
}  // namespace roi_ops
