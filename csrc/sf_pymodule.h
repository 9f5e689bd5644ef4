// An empty Python module init, so that torch.utils.cpp_extension.load() (which imports the built
// library as a Python module) can load an extension whose only content is TORCH_LIBRARY ops.
// Include from exactly one .cpp per extension; TORCH_EXTENSION_NAME is defined by load().
#pragma once

#include <Python.h>

#define SF_PYINIT_CAT2(a, b) a##b
#define SF_PYINIT_CAT(a, b) SF_PYINIT_CAT2(a, b)
#define SF_PYINIT_STR2(a) #a
#define SF_PYINIT_STR(a) SF_PYINIT_STR2(a)

extern "C" PyMODINIT_FUNC SF_PYINIT_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, SF_PYINIT_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
