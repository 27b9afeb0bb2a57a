// The dmmd op schemas: the one TORCH_LIBRARY block of the project. Each backend
// registers its kernels beside them (csrc/cpu, csrc/cuda) with TORCH_LIBRARY_IMPL.
// Python (dmmd_ops) validates user arguments, registers fake and autograd
// implementations, and falls back to dmmd_ops.reference where no kernel exists.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import dmmd_ops._C` only needs to load this library so that the registrations
// below run; the module itself is empty (no pybind11, which keeps the build fast).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dmmd, m) {
  // Raw Philox4x32-10 words: counter int64 [n, 4], key int64 [n, 2] (values in [0, 2^32))
  // -> int64 [n, 4]. Exposed so tests can hold every backend to the known-answer vectors.
  m.def("philox4x32(Tensor counter, Tensor key) -> Tensor");

  // All row ops take 2-D [rows, V] inputs with a unit last stride; the Python wrappers
  // flatten the leading dimensions and apply weights and reductions.
  m.def("teacher_logprobs(Tensor teacher_logits, float temperature, float top_p, float delta) -> Tensor");
  // loss: float32 [rows]; stats: float32 [rows, k], per-row statistics for the backward.
  m.def(
      "generator_loss_forward(Tensor student_logits, Tensor teacher_logits, Tensor aux_logits, "
      "float temperature, float top_p, float delta) -> (Tensor loss, Tensor stats)");
  m.def(
      "generator_loss_backward(Tensor grad_loss, Tensor student_logits, Tensor teacher_logits, "
      "Tensor aux_logits, Tensor stats, float temperature, float top_p, float delta) -> Tensor");
  // target: int64 [rows] (hard) or float [rows, V] (soft).
  m.def(
      "aux_loss_forward(Tensor aux_logits, Tensor target, Tensor? teacher_logits, "
      "float temperature, float top_p, float delta) -> (Tensor loss, Tensor stats)");
  m.def(
      "aux_loss_backward(Tensor grad_loss, Tensor aux_logits, Tensor target, Tensor? teacher_logits, "
      "Tensor stats, float temperature, float top_p, float delta) -> Tensor");
  m.def("sample_categorical(Tensor logits, float temperature, float top_p, int seed, int offset) -> Tensor");
  // z_t: int64 [rows]; x: int64 [rows] or float [rows, V]; alpha_s, alpha_t: float [rows].
  // mask_id / num_classes: -1 when not given.
  m.def(
      "posterior_sample(Tensor z_t, Tensor x, Tensor alpha_s, Tensor alpha_t, str process, "
      "int mask_id, int num_classes, int seed, int offset) -> Tensor");
  m.def(
      "denoise_step(Tensor logits, Tensor z_t, Tensor alpha_s, Tensor alpha_t, str process, "
      "int mask_id, float temperature, float top_p, int seed, int offset) -> Tensor");
  // a: [n, T, d_in], g: [n, T, d_out] -> float32 [n, n]
  m.def("grad_gram(Tensor a, Tensor g) -> Tensor");
}
