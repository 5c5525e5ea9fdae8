// Makes `import pf_kernels._C` load this library, whose static initialisers register the ops.
// No Python bindings: every entry point is torch.ops.pf_kernels.*, which torch.compile can trace.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
