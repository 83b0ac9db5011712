// The operator schema, declared once for every device, and the Python module stub that lets
// `import torch_spatialnorm._C` load the kernels.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(spatialnorm, m) {
  m.def("forward(Tensor input, int kernel_width, int kernel_height, float alpha, float beta, float delta) -> Tensor");
  m.def(
      "backward(Tensor grad_output, Tensor input, int kernel_width, int kernel_height, float alpha, float beta, "
      "float delta) -> Tensor");
}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
