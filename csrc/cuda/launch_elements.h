// launch_elements, the boundary between the host code (roi_ops_cuda.cpp,
// compiled by the host compiler) and the kernels (*.cu, compiled by nvcc with
// light headers only): declared here, defined in kernels.cuh.
#pragma once

#include <c10/core/Device.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "roi_elements.h"

namespace roi_ops {
namespace cuda {

// Runs apply_element(p, i) for every i in [0, n) on `stream` of `device` (the
// caller's current device), then checks the launch. Nothing is launched for
// n <= 0. Defined in kernels.cuh and explicitly instantiated, for every
// parameter struct, in roi_align_kernel.cu and roi_unpool_kernel.cu.
template <typename Params>
void launch_elements(const Params& p, int64_t n, c10::DeviceIndex device,
                     cudaStream_t stream);

}  // namespace cuda
}  // namespace roi_ops
