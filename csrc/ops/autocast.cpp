// Autocast: pf_kernels.ops casts the inputs to the autocast dtype in Python (so torch.compile sees
// the casts); here every op runs with autocast switched off, so that the kernels' own ATen calls
// (fp32 accumulation GEMMs, sums) are not recast to 16 bits under an enabled autocast, in the
// forward and in a backward that runs inside an autocast region.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace pf_kernels {
namespace {

void call_without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

constexpr const char* kOps[] = {"backproj_concat", "backproj_concat_backward", "fusion_head",
                                "fusion_head_backward", "context_linear", "context_linear_backward"};

void register_all(torch::Library& m) {
  for (const char* name : kOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&call_without_autocast>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pf_kernels, AutocastCPU, m) { register_all(m); }
TORCH_LIBRARY_IMPL(pf_kernels, AutocastCUDA, m) { register_all(m); }

}  // namespace pf_kernels
