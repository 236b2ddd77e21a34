// The CUDA kernels: one grid-stride kernel template around apply_element
// (roi_elements.h), sized from the device's multiprocessor count. Included by
// the .cu files only, which instantiate launch_elements for their parameter
// structs.
//
// Only light headers here: the device passes of nvcc (one per architecture)
// parse everything a .cu includes, and ATen's headers would multiply the
// compile time. ATen/cuda/CUDAContext.h in particular would also pull
// cuBLAS/cuSPARSE headers that a minimal toolkit lacks.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "launch_elements.h"
#include "roi_elements.h"

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

// A grid-stride loop around one element body, with 64-bit indices
// (K * C * H * W passes 2^31 at ROICtrl sizes). minBlocks = 1 on purpose:
// with the thread bound alone, this ptxas capped registers at 64 and spilled.
template <typename Params>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    roi_ops_kernel(const Params p, int64_t n) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    apply_element(p, i);
  }
}

template <typename Params>
void launch_elements(const Params& p, int64_t n, c10::DeviceIndex device,
                     cudaStream_t stream) {
  if (n <= 0) return;  // no launch for empty work
  roi_ops_kernel<Params>
      <<<grid_blocks(n, device), kThreadsPerBlock, 0, stream>>>(p, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Explicit instantiations of launch_elements for Params<scalar_t, coord_t>
// over the four input dtypes and both coordinate dtypes.
// (variadic: the argument is a template-id with a comma in it)
#define ROI_OPS_INSTANTIATE_LAUNCH(...)                                      \
  template void launch_elements<__VA_ARGS__>(const __VA_ARGS__&, int64_t,    \
                                             c10::DeviceIndex, cudaStream_t);
#define ROI_OPS_INSTANTIATE_FOR_DTYPES(Params)               \
  ROI_OPS_INSTANTIATE_LAUNCH(Params<c10::Half, float>)       \
  ROI_OPS_INSTANTIATE_LAUNCH(Params<c10::Half, double>)      \
  ROI_OPS_INSTANTIATE_LAUNCH(Params<c10::BFloat16, float>)   \
  ROI_OPS_INSTANTIATE_LAUNCH(Params<c10::BFloat16, double>)  \
  ROI_OPS_INSTANTIATE_LAUNCH(Params<float, float>)           \
  ROI_OPS_INSTANTIATE_LAUNCH(Params<float, double>)          \
  ROI_OPS_INSTANTIATE_LAUNCH(Params<double, float>)          \
  ROI_OPS_INSTANTIATE_LAUNCH(Params<double, double>)

}  // namespace cuda
}  // namespace roi_ops
