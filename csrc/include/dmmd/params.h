// What one call of a row kernel needs: pointers, row strides, sizes and scalars. Each op's
// host prologue (csrc/prologue.h) checks the arguments, allocates the outputs and fills one of
// these once; the CPU kernels take it as is, and so do the CUDA launches (csrc/cuda/launch*.cuh),
// which the host emulation of the tests runs too. Torch-free, so device code may include it.
#pragma once
#include <cstdint>

namespace dmmd {

template <typename T>
struct TeacherLogprobsParams {
  const T* a;
  int64_t sa;
  float* out;  // [rows, V], contiguous
  int64_t rows, v;
  float inv_t;
  double top_p;
  float delta;
};

template <typename T>
struct GenForwardParams {
  const T *u, *a, *b;  // student, teacher, auxiliary logits
  int64_t su, sa, sb;
  float* loss;   // [rows]
  float* stats;  // [rows, kGenStats]
  int64_t rows, v;
  float inv_t;
  double top_p;
  float delta;
};

template <typename T>
struct GenBackwardParams {
  const float* grad_loss;  // [rows]
  const T *u, *a, *b;
  int64_t su, sa, sb;
  const float* stats;
  T* grad;  // [rows, V], contiguous
  int64_t rows, v;
  float inv_t;
  double top_p;
  float delta;
};

template <typename T>
struct AuxForwardParams {
  const T* b;
  int64_t sb;
  const T* a;  // nullptr without a teacher
  int64_t sa;
  const float* soft;    // soft target [rows, V] (row stride sx), or nullptr
  int64_t sx;
  const int64_t* hard;  // hard target [rows], or nullptr
  float* loss;
  float* stats;  // [rows, kAuxStats]
  int64_t rows, v;
  float inv_t;
  double top_p;
  float delta;
};

template <typename T>
struct AuxBackwardParams {
  const float* grad_loss;
  const T* b;
  int64_t sb;
  const T* a;
  int64_t sa;
  const float* soft;
  int64_t sx;
  const int64_t* hard;
  const float* stats;
  T* grad;
  int64_t rows, v;
  float inv_t;
  double top_p;
  float delta;
};

template <typename T>
struct SampleParams {
  const T* x;
  int64_t sx;
  int64_t* out;
  int64_t rows, v;
  float inv_t;
  double top_p;
  uint64_t seed, offset;
};

template <typename T>
struct DenoiseParams {
  const T* x;
  int64_t sx;
  const int64_t* z;
  const double *alpha_s, *alpha_t;
  int64_t* out;
  int64_t rows, v;
  bool masked;
  int64_t mask_id;
  float inv_t;
  double top_p;
  uint64_t seed, offset;
};

struct PosteriorParams {
  const int64_t* z;
  const int64_t* hard;  // hard x [rows], or nullptr
  const float* soft;    // soft x [rows, V] (row stride sx), or nullptr
  int64_t sx;
  const double *alpha_s, *alpha_t;
  int64_t* out;
  int64_t rows;
  int64_t v;  // -1 when unknown (masked diffusion, hard x, no num_classes)
  bool masked;
  int64_t mask_id;
  uint64_t seed, offset;
};

struct GramParams {
  const float *a, *g;  // [n, T, d_in], [n, T, d_out], contiguous
  float* k;            // [n, n]
  int64_t n, t, d_in, d_out;
};

}  // namespace dmmd
