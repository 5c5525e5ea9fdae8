// `import pf_kernels._C` loads this library: its static initialisers register the ops
// (torch.ops.pf_kernels.*, the entry points torch.compile traces), and the module holds the eager
// entry points pf_kernels.ops calls first outside torch.compile (eager.cpp).
#include <torch/extension.h>

#include "ops/eager.h"

PYBIND11_MODULE(_C, m) { pf_kernels::define_eager(m); }
