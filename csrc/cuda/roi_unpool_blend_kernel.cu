// Fused ROI-Unpool + softmax blend CUDA kernels (docs/spec.md, "Fused
// paste-back and blend"): the tile lists, the forward (per-pixel softmax
// statistics, then one thread per output element) and the deterministic
// gather-style backward (per pixel, per (ROI, pixel) pair, per grid cell; no
// atomics). Element bodies: blend_elements.h; host side: blend_host.h.
#include "blend_elements.h"
#include "kernels.cuh"

namespace roi_ops {
namespace cuda {

ROI_OPS_INSTANTIATE_LAUNCH(blend::TileParams<float>)
ROI_OPS_INSTANTIATE_LAUNCH(blend::TileParams<double>)
ROI_OPS_INSTANTIATE_LAUNCH(blend::AreaParams<float>)
ROI_OPS_INSTANTIATE_LAUNCH(blend::AreaParams<double>)
ROI_OPS_INSTANTIATE_FOR_DTYPES(blend::StatsParams)
ROI_OPS_INSTANTIATE_FOR_DTYPES(blend::BlendParams)
ROI_OPS_INSTANTIATE_FOR_DTYPES(blend::PixelGradParams)
ROI_OPS_INSTANTIATE_FOR_DTYPES(blend::PairParams)
ROI_OPS_INSTANTIATE_FOR_DTYPES(blend::GridGradParams)
ROI_OPS_INSTANTIATE_LAUNCH(blend::BaseGradParams<c10::Half>)
ROI_OPS_INSTANTIATE_LAUNCH(blend::BaseGradParams<c10::BFloat16>)
ROI_OPS_INSTANTIATE_LAUNCH(blend::BaseGradParams<float>)
ROI_OPS_INSTANTIATE_LAUNCH(blend::BaseGradParams<double>)

}  // namespace cuda
}  // namespace roi_ops
