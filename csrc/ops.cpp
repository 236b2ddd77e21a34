// The one place that defines roi-ops' operator schemas. Kernels live per
// backend (csrc/cpu, csrc/cuda) and register with TORCH_LIBRARY_IMPL; fake
// kernels and autograd are registered from Python (roi_ops/_ops.py).
#include <torch/library.h>

#include "common/host_checks.h"

#ifdef ROI_OPS_PYTHON_MODULE
#include <Python.h>
#endif

namespace {

// The trusted-boxes scope of the calling thread (host_checks.h, BoxTrust):
// sets it, returns what it was.
bool set_trusted_boxes(bool trusted) {
  const bool previous = roi_ops::BoxTrust::trusted();
  roi_ops::BoxTrust::trusted() = trusted;
  return previous;
}

bool trusted_boxes() { return roi_ops::BoxTrust::trusted(); }

int64_t host_box_reads() { return roi_ops::BoxTrust::host_reads().load(); }

}  // namespace

TORCH_LIBRARY(roi_ops, m) {
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
      "bool aligned) -> Tensor");
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
      "SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
      "bool aligned) -> Tensor");
  m.def(
      "roi_unpool(Tensor input, Tensor rois, float spatial_scale, "
      "SymInt height, SymInt width, bool aligned) -> Tensor");
  m.def(
      "_roi_unpool_backward(Tensor grad, Tensor rois, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, bool aligned) -> Tensor");
  // Fused paste-back + softmax blend (docs/spec.md, "Fused paste-back and
  // blend"): returns (out [B,C,H,W], base_weight [B,H,W]).
  m.def(
      "roi_unpool_blend(Tensor base, Tensor base_logit, Tensor input, "
      "Tensor input_logit, Tensor rois, float spatial_scale, bool aligned, "
      "Tensor? coverage=None) -> (Tensor, Tensor)");
  // Gradients for (base, base_logit, input, input_logit, coverage),
  // recomputed from the forward's inputs (the outputs are not saved: out
  // would keep a [B,C,H,W] map alive, and <grad, out> is more accurate in the
  // accumulation type for half types); nothing of size K*C*H*W is allocated.
  // grad_base_weight may be None (base_weight unused); without coverage its
  // gradient is an empty Tensor[0].
  m.def(
      "_roi_unpool_blend_backward(Tensor grad_out, Tensor? grad_base_weight, "
      "Tensor base, Tensor base_logit, Tensor input, Tensor input_logit, "
      "Tensor rois, float spatial_scale, bool aligned, Tensor? coverage=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Internal (roi_ops._ops.trusted_boxes): the calling thread's trusted-boxes
  // scope, and the count of box-table reads on the host (host_checks.h).
  m.def("_set_trusted_boxes(bool trusted) -> bool", &set_trusted_boxes);
  m.def("_trusted_boxes() -> bool", &trusted_boxes);
  m.def("_host_box_reads() -> int", &host_box_reads);
}

#ifdef ROI_OPS_PYTHON_MODULE
// An empty Python module: importing roi_ops._C loads this library, whose
// static initialisers register the ops above.
static struct PyModuleDef roi_ops_module = {PyModuleDef_HEAD_INIT, "_C",
                                            nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&roi_ops_module); }
#endif
