// The Python module `malloc_kernels._C`. Ops are registered with the torch dispatcher (TORCH_LIBRARY_FRAGMENT in
// each csrc/torch/*.cpp file, one file per op family) and called as torch.ops.malloc_kernels.<name>; importing this
// module is what loads those registrations. The library itself is declared once, here.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(malloc_kernels, m) {}

static struct PyModuleDef malloc_kernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&malloc_kernels_module); }
