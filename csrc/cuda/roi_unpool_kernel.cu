// ROI-Unpool CUDA kernels: forward (every output element written exactly
// once, zeros outside the covered rectangle, so no separate memset) and the
// deterministic gather-style backward (each grid cell sums, in a fixed
// order, the pixels of its footprint: no atomics). Element bodies:
// roi_elements.h; host side: roi_host.h.
#include "kernels.cuh"

namespace roi_ops {
namespace cuda {

ROI_OPS_INSTANTIATE_FOR_DTYPES(UnpoolForwardParams)
ROI_OPS_INSTANTIATE_FOR_DTYPES(UnpoolBackwardParams)

}  // namespace cuda
}  // namespace roi_ops
