// Makes the compiled library importable as `r1mega._C`. The ops register themselves with the
// dispatcher (TORCH_LIBRARY_FRAGMENT in each op's file) when the library is loaded; no Python
// bindings are needed, as in pytorch/extension-cpp.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}
