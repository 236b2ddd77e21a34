// GPU launcher for the host functions of roi_host.cuh: device guard, the
// current stream, one grid-stride kernel template around apply_element,
// sized from the device's multiprocessor count, and a launch check after
// every launch.
//
// Only light headers: ATen/cuda/CUDAContext.h would pull cuBLAS/cuSPARSE
// headers, which a toolkit without those libraries (and the compile check)
// lacks.
#pragma once

#include <c10/core/Device.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "roi_elements.cuh"

namespace roi_ops {
namespace cuda {

constexpr int kThreadsPerBlock = 256;
// Resident blocks per multiprocessor we aim for (2048 threads on sm_80 /
// sm_90); the grid-stride loop covers the rest, so a larger grid would only
// add block scheduling.
constexpr int kBlocksPerSm = 2048 / kThreadsPerBlock;
constexpr int kMaxCachedDevices = 64;

// Multiprocessor count of `device`, queried once per device.
inline int multiprocessor_count(c10::DeviceIndex device) {
  static std::atomic<int> cache[kMaxCachedDevices] = {};
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int count = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  count = std::max(count, 1);
  if (cacheable) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

// Blocks for n > 0 grid-stride work items: enough to fill the device once,
// never more than the work needs.
inline unsigned int grid_blocks(int64_t n, c10::DeviceIndex device) {
  const int64_t needed = (n + kThreadsPerBlock - 1) / kThreadsPerBlock;
  const int64_t full = int64_t(multiprocessor_count(device)) * kBlocksPerSm;
  return static_cast<unsigned int>(std::min(needed, full));
}

// Every kernel: a grid-stride loop around one element body, 64-bit indices
// (K * C * H * W passes 2^31 at ROICtrl sizes). minBlocks = 1 on purpose:
// with the thread bound alone this ptxas capped registers at 64 and spilled.
template <typename Params>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    roi_ops_kernel(const Params p, int64_t n) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    apply_element(p, i);
  }
}

class CudaLauncher {
 public:
  explicit CudaLauncher(const c10::Device& device)
      : guard_(device),
        device_(device.index()),
        stream_(c10::cuda::getCurrentCUDAStream(device.index())) {}

  template <typename Params>
  void operator()(const Params& p, int64_t n) const {
    if (n <= 0) return;  // no launch for empty work
    roi_ops_kernel<Params>
        <<<grid_blocks(n, device_), kThreadsPerBlock, 0, stream_>>>(p, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  c10::cuda::CUDAGuard guard_;
  c10::DeviceIndex device_;
  cudaStream_t stream_;
};

}  // namespace cuda
}  // namespace roi_ops
