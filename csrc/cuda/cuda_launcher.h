// CudaLauncher, the Launcher of the CUDA host functions (roi_host.h,
// blend_host.h) on a GPU: holds the device guard and the current stream for
// the lifetime of one op call and runs every "kernel" through
// launch_elements (launch_elements.h). Host-compiler code (it includes
// c10/cuda headers that the light .cu files do without).
#pragma once

#include <c10/core/Device.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "launch_elements.h"

namespace roi_ops {
namespace cuda {

class CudaLauncher {
 public:
  explicit CudaLauncher(const c10::Device& device)
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

}  // namespace cuda
}  // namespace roi_ops
