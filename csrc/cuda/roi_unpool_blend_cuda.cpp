// CUDA registration of the fused ROI-Unpool + blend op. Host code only,
// compiled by the host compiler (kernels: roi_unpool_blend_kernel.cu, reached
// through launch.h; host functions: blend_host.h).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "blend_host.h"
#include "launch.h"

namespace roi_ops {
namespace cuda {
namespace {

// Device guard and current stream for the lifetime of one op call (the
// launcher of roi_ops_cuda.cpp; one could share it through launch.h).
class BlendLauncher {
 public:
  explicit BlendLauncher(const c10::Device& device)
      : guard_(device),
        device_(device.index()),
        stream_(c10::cuda::getCurrentCUDAStream(device.index())) {}

  template <typename Params>
  void operator()(const Params& p, int64_t n) const {
    launch_elements(p, n, device_, stream_);
  }

 private:
  c10::cuda::CUDAGuard guard_;
  c10::DeviceIndex device_;
  cudaStream_t stream_;
};

}  // namespace

TORCH_LIBRARY_IMPL(roi_ops, CUDA, m) {
  m.impl("roi_unpool_blend", TORCH_FN(blend::blend_forward<BlendLauncher>));
  m.impl("_roi_unpool_blend_backward", TORCH_FN(blend::blend_backward<BlendLauncher>));
}

}  // namespace cuda
}  // namespace roi_ops
