// ROI-Align CUDA kernels: forward, and the deterministic gather-style
// backward (every input-gradient element sums, in a fixed order, the samples
// that read it: no atomics, bitwise reproducible), with its per-ROI
// footprint pass. Element bodies: roi_elements.h; host side: roi_host.h.
#include "kernels.cuh"

namespace roi_ops {
namespace cuda {

ROI_OPS_INSTANTIATE_FOR_DTYPES(AlignForwardParams)
ROI_OPS_INSTANTIATE_FOR_DTYPES(AlignBackwardParams)
ROI_OPS_INSTANTIATE_LAUNCH(AlignFootprintParams<float>)
ROI_OPS_INSTANTIATE_LAUNCH(AlignFootprintParams<double>)

}  // namespace cuda
}  // namespace roi_ops
