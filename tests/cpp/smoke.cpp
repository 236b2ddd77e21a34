// ctest smoke test of the LibTorch build: the ops are registered with the
// dispatcher, ROI-Align of a constant map is that constant, and ROI-Unpool
// pastes a constant grid back as that constant inside the box and 0 outside.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>

int main() {
  auto align = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("roi_ops::roi_align", "")
                   .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double,
                                     c10::SymInt, c10::SymInt, int64_t, bool)>();
  auto unpool = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("roi_ops::roi_unpool", "")
                    .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double,
                                      c10::SymInt, c10::SymInt, bool)>();
  const at::Tensor input = torch::full({1, 3, 16, 16}, 2.5);
  const at::Tensor rois = torch::tensor({0.0, 2.0, 3.0, 11.0, 9.0}).reshape({1, 5});
  const at::Tensor crop = align.call(input, rois, 1.0, 4, 4, 2, true);
  if (crop.sizes() != at::IntArrayRef({1, 3, 4, 4}) ||
      !torch::allclose(crop, torch::full_like(crop, 2.5))) {
    std::fprintf(stderr, "roi_align of a constant map is not that constant\n");
    return 1;
  }
  const at::Tensor pasted = unpool.call(crop, rois, 1.0, 16, 16, true);
  // aligned box in feature frame: x in [1.5, 10.5), y in [2.5, 8.5)
  const at::Tensor inside = pasted.index({0, 0, torch::indexing::Slice(3, 9),
                                          torch::indexing::Slice(2, 11)});
  const double outside_sum = pasted.abs().sum().item<double>() - inside.abs().sum().item<double>() * 3;
  if (!torch::allclose(inside, torch::full_like(inside, 2.5)) || std::abs(outside_sum) > 1e-4) {
    std::fprintf(stderr, "roi_unpool of a constant grid is not that constant inside / 0 outside\n");
    return 1;
  }
  bool raised = false;
  try {
    align.call(input, torch::tensor({3.0, 0.0, 0.0, 4.0, 4.0}).reshape({1, 5}), 1.0, 2, 2, 2, true);
  } catch (const c10::Error&) {
    raised = true;
  }
  if (!raised) {
    std::fprintf(stderr, "a batch index out of range did not raise\n");
    return 1;
  }
  std::printf("roi_ops LibTorch smoke test passed\n");
  return 0;
}
