// The one place where every cvsparse operator's schema is declared.
// Implementations live in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu (TORCH_LIBRARY_IMPL).
// The schema strings must stay identical to cvsparse/ops/schemas.py (a test checks it).
//
// Conventions shared by every list operator:
//   * an empty optional list (masks, momentum_bufs, precond) means "absent";
//   * lambda1 / lambda2 are float64 tensors of shape (n,), one value per list entry,
//     on the same device as the params;
//   * arguments are validated once, in Python (cvsparse/ops/_checks.py), before any backend runs;
//     kernels only TORCH_CHECK the invariants they rely on for memory safety.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A Python module named cvsparse._C with no functions: importing it runs the static
// registrations below (the extension-cpp pattern, usable with the limited API).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(cvsparse, m) {
  m.def(
      "prox_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_bufs, "
      "Tensor[] masks, Tensor lambda1, Tensor lambda2, float lr, float momentum) -> Tensor");
  m.def("mixed_partial_dot(Tensor[] params, Tensor[] vectors, Tensor[] precond) -> Tensor");
  m.def("max_abs(Tensor[] tensors) -> Tensor");
  m.def(
      "threshold_(Tensor(a!)[] params, Tensor(b!)[] momentum_bufs, Tensor(c!)[] masks, "
      "float tau) -> Tensor");
  m.def(
      "gated_weight(Tensor weight, Tensor aux, int ste, float slope, bool sign_rule) -> "
      "Tensor");
  m.def(
      "gated_weight_backward(Tensor grad, Tensor weight, Tensor aux, int ste, float slope, "
      "bool sign_rule) -> (Tensor, Tensor)");
  // Sparse inference.  W (M x K) is stored per output row: values (nnz,), col_deltas (nnz,)
  // int32 (a row's first column, then the difference to the previous column, >= 1), row_ptr
  // (M + 1,) int32 (cvsparse/ops/sparse_format.py).
  m.def(
      "sparse_matmul(Tensor input, Tensor values, Tensor col_deltas, Tensor row_ptr, "
      "Tensor? bias, bool relu) -> Tensor");
  m.def(
      "sparse_conv2d(Tensor input, Tensor values, Tensor col_deltas, Tensor row_ptr, "
      "Tensor? bias, int[2] kernel_size, int[2] stride, int[2] padding, bool relu) -> Tensor");
}
