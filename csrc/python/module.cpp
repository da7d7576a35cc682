// The Python module pykd._C. It holds no functions: importing it loads this shared library, whose
// static initialisers register the pykd ops with the dispatcher (see csrc/ops.cpp).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
