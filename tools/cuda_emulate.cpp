// Host emulation of the CUDA backend, for machines without a GPU.
//
// Compiles the CUDA backend's own host functions (csrc/cuda/roi_host.h,
// csrc/cuda/blend_host.h, with the prologue they share with the CPU,
// csrc/common/host_prologue.h) and element bodies (csrc/cuda/roi_elements.h,
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
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "cuda/blend_host.h"
#include "cuda/roi_host.h"

#include <string>

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

// Every op here takes the schema of the real roi_ops op, read from the
// dispatcher (so roi_ops._C must be loaded first, as `import roi_ops` does):
// one definition of each schema, csrc/ops.cpp.
TORCH_LIBRARY(roi_ops_emu, m) {
  for (const char* name : {"roi_align", "_roi_align_backward", "roi_unpool",
                           "_roi_unpool_backward", "roi_unpool_blend",
                           "_roi_unpool_blend_backward"}) {
    const auto real = c10::Dispatcher::singleton().findSchemaOrThrow(
        (std::string("roi_ops::") + name).c_str(), "");
    m.def(real.schema().cloneWithName(std::string("roi_ops_emu::") + name, ""));
  }
  // This library's own trusted-boxes scope and box-read count (the host
  // code above is compiled into it with its own copy of BoxTrust).
  m.def("_set_trusted_boxes(bool trusted) -> bool", [](bool trusted) {
    const bool previous = BoxTrust::trusted();
    BoxTrust::trusted() = trusted;
    return previous;
  });
  m.def("_host_box_reads() -> int", [] { return BoxTrust::host_reads().load(); });
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
