// The eager entry points of pf_kernels.ops (eager.cpp), defined on pf_kernels._C.
#pragma once

#include <torch/extension.h>

namespace pf_kernels {

void define_eager(pybind11::module_& m);

}  // namespace pf_kernels
