// The CUDA side of dmmd, compiled for the host on top of cuda_emulation.h and registered as torch
// ops `dmmd_emu*::*` on CPU tensors, with the real ops' names and schemas: each op runs the
// shared host prologue (csrc/prologue.h) and the real launch code (csrc/cuda/launch*.cuh), whose
// DMMD_LAUNCH the emulation turns into blocks of fibers. So the tests run the device code and
// its launches against the reference and the CPU kernels without a GPU.
#include "cuda_emulation.h"
// clang-format off: the emulation must come first
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "grad_gram_paths.h"
#include "prologue.h"
#include "cuda/launch_gram.cuh"
#include "cuda/launch_losses.cuh"
#include "cuda/launch_samplers.cuh"
// clang-format on

namespace dmmd::cuda {
namespace {

constexpr cudaStream_t kStream = nullptr;

at::Tensor teacher_logprobs(const at::Tensor& teacher, double temperature, double top_p, double delta) {
  const TeacherLogprobsCall c = teacher_logprobs_call(teacher, temperature, top_p, delta);
  dispatch_logits(c.a.scalar_type(), "emu",
                  [&](auto tag) { launch_teacher_logprobs(c.params<decltype(tag)>(), kStream); });
  return c.out;
}

std::tuple<at::Tensor, at::Tensor> generator_loss_forward(const at::Tensor& u, const at::Tensor& a,
                                                          const at::Tensor& b, double temperature, double top_p,
                                                          double delta) {
  const GenForwardCall c = generator_forward_call(u, a, b, temperature, top_p, delta);
  dispatch_logits(c.u.scalar_type(), "emu",
                  [&](auto tag) { launch_generator_forward(c.params<decltype(tag)>(), kStream); });
  return {c.loss, c.stats};
}

at::Tensor generator_loss_backward(const at::Tensor& g, const at::Tensor& u, const at::Tensor& a, const at::Tensor& b,
                                   const at::Tensor& stats, double temperature, double top_p, double delta) {
  const GenBackwardCall c = generator_backward_call(g, u, a, b, stats, temperature, top_p, delta);
  dispatch_logits(c.u.scalar_type(), "emu",
                  [&](auto tag) { launch_generator_backward(c.params<decltype(tag)>(), kStream); });
  return c.grad;
}

std::tuple<at::Tensor, at::Tensor> aux_loss_forward(const at::Tensor& b, const at::Tensor& target,
                                                    const std::optional<at::Tensor>& teacher, double temperature,
                                                    double top_p, double delta) {
  const AuxForwardCall c = aux_forward_call(b, target, teacher, temperature, top_p, delta);
  dispatch_logits(c.in.b.scalar_type(), "emu",
                  [&](auto tag) { launch_aux_forward(c.params<decltype(tag)>(), kStream); });
  return {c.loss, c.stats};
}

at::Tensor aux_loss_backward(const at::Tensor& g, const at::Tensor& b, const at::Tensor& target,
                             const std::optional<at::Tensor>& teacher, const at::Tensor& stats, double temperature,
                             double top_p, double delta) {
  const AuxBackwardCall c = aux_backward_call(g, b, target, teacher, stats, temperature, top_p, delta);
  dispatch_logits(c.in.b.scalar_type(), "emu",
                  [&](auto tag) { launch_aux_backward(c.params<decltype(tag)>(), kStream); });
  return c.grad;
}

at::Tensor sample_categorical(const at::Tensor& x, double temperature, double top_p, int64_t seed, int64_t offset) {
  const SampleCall c = sample_categorical_call(x, temperature, top_p, seed, offset);
  dispatch_logits(c.x.scalar_type(), "emu",
                  [&](auto tag) { launch_sample_categorical(c.params<decltype(tag)>(), kStream); });
  return c.out;
}

at::Tensor denoise_step(const at::Tensor& x, const at::Tensor& z, const at::Tensor& a_s, const at::Tensor& a_t,
                        c10::string_view process, int64_t mask_id, double temperature, double top_p, int64_t seed,
                        int64_t offset) {
  const DenoiseCall c =
      denoise_step_call(x, z, a_s, a_t, std::string(process), mask_id, temperature, top_p, seed, offset);
  dispatch_logits(c.x.scalar_type(), "emu", [&](auto tag) { launch_denoise_step(c.params<decltype(tag)>(), kStream); });
  return c.out;
}

at::Tensor posterior_sample(const at::Tensor& z, const at::Tensor& x, const at::Tensor& a_s, const at::Tensor& a_t,
                            c10::string_view process, int64_t mask_id, int64_t num_classes, int64_t seed,
                            int64_t offset) {
  const PosteriorCall c =
      posterior_sample_call(z, x, a_s, a_t, std::string(process), mask_id, num_classes, seed, offset);
  launch_posterior_sample(c.params(), kStream);
  return c.out;
}

// The Gram-trick kernel whatever the cost model would pick (the materialised path is ATen's).
at::Tensor grad_gram(const at::Tensor& a_in, const at::Tensor& g_in) {
  const auto [a, g] = grad_gram_args(a_in, g_in);
  const int64_t n = a.size(0);
  at::Tensor k = at::empty({n, n}, a.options());
  launch_gram_trick(GramParams{a.const_data_ptr<float>(), g.const_data_ptr<float>(), k.mutable_data_ptr<float>(), n,
                               a.size(1), a.size(2), g.size(2)},
                    kStream);
  return k;
}

// How many 16-byte vector loads and stores the last launch made (the fast path was taken).
int64_t last_vector_accesses() { return emu::last_vector_accesses; }

// Bytes of dynamic shared memory the last launch had (a staged row's, or 0).
int64_t last_stage_bytes() { return emu::last_stage_bytes; }

// The most dynamic shared memory a launch may have (an emulated smaller GPU); returns the old.
int64_t set_dynamic_shared_limit(int64_t bytes) {
  const int64_t old = emu::dynamic_shared_limit;
  emu::dynamic_shared_limit = bytes;
  return old;
}

// A deliberately racy kernel for the schedule test: every thread writes the same shared slot
// with no barrier between the writes, so thread 0 reads whichever thread ran last.
__global__ void racy_last_writer_kernel(int64_t* out) {
  __shared__ DMMD_SHARED_SCALAR(int64_t, slot);
  slot = threadIdx.x;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = slot;
}

at::Tensor last_writer() {
  at::Tensor out = at::empty({1}, at::kLong);
  int64_t* p = out.mutable_data_ptr<int64_t>();
  DMMD_LAUNCH(racy_last_writer_kernel, 1, kThreads, kStream)(p);
  return out;
}

// Kernels with one hazard each, for the race detector's tests (`hazard` picks one; 0 is the
// correct kernel they are all mutations of): every thread fills its cell of a shared array, a
// barrier, each reads its neighbour's cell, a barrier, each writes its own result.
__global__ void hazard_kernel(int64_t* out, int64_t hazard) {
  __shared__ DMMD_SHARED_ARRAY(int64_t, cells, kThreads);
  const unsigned t = threadIdx.x;
  if (hazard == 1) {
    cells[0] = t;  // 1: every thread writes one cell (write-write)
  } else {
    cells[t] = 10 * t;
  }
  if (hazard != 2) __syncthreads();  // 2: neighbours read before the writes are ordered (write-read)
  int64_t mine = cells[(t + 1) % kThreads];
  if (hazard == 3) cells[t] = mine;  // 3: written while a neighbour may still read it (read-write)
  __syncthreads();
  if (hazard == 4) {
    // 4: a shuffle where a __syncthreads belongs: the emulation's shuffle waits for the whole
    // block, a GPU's orders no memory, not even within the warp.
    cells[t] = mine;
    mine += __shfl_down_sync(kFull, mine, 1);
    mine += cells[t ^ 1];
  }
  int64_t* const result = out + (hazard == 5 ? 0 : t);  // 5: every thread writes out[0] (global)
  DMMD_STORE(result, mine);
}

at::Tensor hazard(int64_t which) {
  at::Tensor out = at::zeros({kThreads}, at::kLong);
  int64_t* p = out.mutable_data_ptr<int64_t>();
  DMMD_LAUNCH(hazard_kernel, 1, kThreads, kStream)(p, which);
  return out;
}

// Whether the race detector runs (the schedule test turns it off to see the schedules alone).
bool set_race_detection(bool on) {
  const bool old = emu::detect_races;
  emu::detect_races = on;
  return old;
}

// How many exchange buffers the emulated shuffles take turns on (1 is a bug of the emulation
// itself, for the detector's test).
int64_t set_exchange_buffers(int64_t n) {
  TORCH_CHECK(n == 1 || n == 2, "exchange buffers: 1 or 2, got ", n);
  const int64_t old = emu::exchange_buffers;
  emu::exchange_buffers = static_cast<int>(n);
  return old;
}

// The thread order between barriers for the launches that follow (see cuda_emulation.h).
int64_t set_schedule(int64_t s) {
  const int64_t old = emu::schedule;
  emu::schedule = s;
  return old;
}

}  // namespace
}  // namespace dmmd::cuda

// The op namespace names the thread count, so builds for several block sizes load side by side.
#ifndef DMMD_EMU_LIB
#define DMMD_EMU_LIB dmmd_emu
#endif
#define DMMD_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // expands DMMD_EMU_LIB first

DMMD_TORCH_LIBRARY(DMMD_EMU_LIB, m) {
  m.def("teacher_logprobs", &dmmd::cuda::teacher_logprobs);
  m.def("generator_loss_forward", &dmmd::cuda::generator_loss_forward);
  m.def("generator_loss_backward", &dmmd::cuda::generator_loss_backward);
  m.def("aux_loss_forward", &dmmd::cuda::aux_loss_forward);
  m.def("aux_loss_backward", &dmmd::cuda::aux_loss_backward);
  m.def("sample_categorical", &dmmd::cuda::sample_categorical);
  m.def("denoise_step", &dmmd::cuda::denoise_step);
  m.def("posterior_sample", &dmmd::cuda::posterior_sample);
  m.def("grad_gram", &dmmd::cuda::grad_gram);
  m.def("last_vector_accesses", &dmmd::cuda::last_vector_accesses);
  m.def("last_stage_bytes", &dmmd::cuda::last_stage_bytes);
  m.def("set_dynamic_shared_limit", &dmmd::cuda::set_dynamic_shared_limit);
  m.def("set_schedule", &dmmd::cuda::set_schedule);
  m.def("last_writer", &dmmd::cuda::last_writer);
  m.def("hazard", &dmmd::cuda::hazard);
  m.def("set_race_detection", &dmmd::cuda::set_race_detection);
  m.def("set_exchange_buffers", &dmmd::cuda::set_exchange_buffers);
}
