// The CUDA kernels of dmmd (csrc/cuda/*_kernels.cuh), compiled for the host on top of
// cuda_emulation.h and registered as torch ops `dmmd_emu::*` on CPU tensors, so that the tests
// run the device code itself against the reference and the CPU kernels without a GPU. Each
// launch uses a grid of up to 3 blocks, so the kernels' grid-stride loops over rows are run too.
// Arguments are assumed valid (the tests pass what the public ops would).
#include "cuda_emulation.h"
// clang-format off: the emulation must come first
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cuda/gram_kernels.cuh"
#include "cuda/losses_kernels.cuh"
#include "cuda/samplers_kernels.cuh"
// clang-format on

namespace dmmd::cuda {
namespace {

unsigned grid_of(int64_t rows) { return static_cast<unsigned>(rows < 3 ? (rows < 1 ? 1 : rows) : 3); }

template <typename F>
void launch(int64_t rows, F&& kernel) {
  emu::launch(grid_of(rows), kThreads, std::function<void()>(kernel));
}

at::Tensor teacher_logprobs(const at::Tensor& a, double temperature, double top_p, double delta) {
  const int64_t rows = a.size(0), v = a.size(1);
  at::Tensor out = at::empty({rows, v}, a.options().dtype(at::kFloat));
  dispatch_logits(a.scalar_type(), "emu", [&](auto tag) {
    using T = decltype(tag);
    launch(rows, [&] {
      teacher_logprobs_kernel<T>(a.const_data_ptr<T>(), a.stride(0), out.mutable_data_ptr<float>(), rows, v,
                                 static_cast<float>(1.0 / temperature), top_p, static_cast<float>(delta));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> generator_forward(const at::Tensor& u, const at::Tensor& a, const at::Tensor& b,
                                                     double temperature, double top_p, double delta) {
  const int64_t rows = u.size(0), v = u.size(1);
  at::Tensor loss = at::empty({rows}, u.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({rows, kGenStats}, u.options().dtype(at::kFloat));
  dispatch_logits(u.scalar_type(), "emu", [&](auto tag) {
    using T = decltype(tag);
    launch(rows, [&] {
      generator_forward_kernel<T>(u.const_data_ptr<T>(), u.stride(0), a.const_data_ptr<T>(), a.stride(0),
                                  b.const_data_ptr<T>(), b.stride(0), loss.mutable_data_ptr<float>(),
                                  stats.mutable_data_ptr<float>(), rows, v, static_cast<float>(1.0 / temperature),
                                  top_p, static_cast<float>(delta));
    });
  });
  return {loss, stats};
}

at::Tensor generator_backward(const at::Tensor& g, const at::Tensor& u, const at::Tensor& a, const at::Tensor& b,
                              const at::Tensor& stats, double temperature, double top_p, double delta) {
  const int64_t rows = u.size(0), v = u.size(1);
  at::Tensor grad = at::empty({rows, v}, u.options());
  dispatch_logits(u.scalar_type(), "emu", [&](auto tag) {
    using T = decltype(tag);
    launch(rows, [&] {
      generator_backward_kernel<T>(g.const_data_ptr<float>(), u.const_data_ptr<T>(), u.stride(0),
                                   a.const_data_ptr<T>(), a.stride(0), b.const_data_ptr<T>(), b.stride(0),
                                   stats.const_data_ptr<float>(), grad.mutable_data_ptr<T>(), rows, v,
                                   static_cast<float>(1.0 / temperature), top_p, static_cast<float>(delta));
    });
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> aux_forward(const at::Tensor& b, const at::Tensor& target,
                                               const std::optional<at::Tensor>& teacher, double temperature,
                                               double top_p, double delta) {
  const AuxArgs in = aux_loss_args(b, target, teacher, "emu");
  const int64_t rows = b.size(0), v = b.size(1);
  at::Tensor loss = at::empty({rows}, b.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({rows, kAuxStats}, b.options().dtype(at::kFloat));
  dispatch_logits(b.scalar_type(), "emu", [&](auto tag) {
    using T = decltype(tag);
    launch(rows, [&] {
      aux_forward_kernel<T>(in.b.const_data_ptr<T>(), in.b.stride(0), in.teacher ? in.a.const_data_ptr<T>() : nullptr,
                            in.teacher ? in.a.stride(0) : 0, in.soft ? in.x.const_data_ptr<float>() : nullptr,
                            in.soft ? in.x.stride(0) : 0, in.soft ? nullptr : in.x.const_data_ptr<int64_t>(),
                            loss.mutable_data_ptr<float>(), stats.mutable_data_ptr<float>(), rows, v,
                            static_cast<float>(1.0 / temperature), top_p, static_cast<float>(delta));
    });
  });
  return {loss, stats};
}

at::Tensor aux_backward(const at::Tensor& g, const at::Tensor& b, const at::Tensor& target,
                        const std::optional<at::Tensor>& teacher, const at::Tensor& stats, double temperature,
                        double top_p, double delta) {
  const AuxArgs in = aux_loss_args(b, target, teacher, "emu");
  const int64_t rows = b.size(0), v = b.size(1);
  at::Tensor grad = at::empty({rows, v}, b.options());
  dispatch_logits(b.scalar_type(), "emu", [&](auto tag) {
    using T = decltype(tag);
    launch(rows, [&] {
      aux_backward_kernel<T>(g.const_data_ptr<float>(), in.b.const_data_ptr<T>(), in.b.stride(0),
                             in.teacher ? in.a.const_data_ptr<T>() : nullptr, in.teacher ? in.a.stride(0) : 0,
                             in.soft ? in.x.const_data_ptr<float>() : nullptr, in.soft ? in.x.stride(0) : 0,
                             in.soft ? nullptr : in.x.const_data_ptr<int64_t>(), stats.const_data_ptr<float>(),
                             grad.mutable_data_ptr<T>(), rows, v, static_cast<float>(1.0 / temperature), top_p,
                             static_cast<float>(delta));
    });
  });
  return grad;
}

at::Tensor sample_categorical(const at::Tensor& x, double temperature, double top_p, int64_t seed, int64_t offset) {
  const int64_t rows = x.size(0), v = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  dispatch_logits(x.scalar_type(), "emu", [&](auto tag) {
    using T = decltype(tag);
    launch(rows, [&] {
      sample_categorical_kernel<T>(x.const_data_ptr<T>(), x.stride(0), out.mutable_data_ptr<int64_t>(), rows, v,
                                   static_cast<float>(1.0 / temperature), top_p, static_cast<uint64_t>(seed),
                                   static_cast<uint64_t>(offset));
    });
  });
  return out;
}

at::Tensor denoise_step(const at::Tensor& x, const at::Tensor& z, const at::Tensor& as, const at::Tensor& at_,
                        bool masked, int64_t mask_id, double temperature, double top_p, int64_t seed, int64_t offset) {
  const int64_t rows = x.size(0), v = x.size(1);
  at::Tensor out = at::empty({rows}, z.options());
  dispatch_logits(x.scalar_type(), "emu", [&](auto tag) {
    using T = decltype(tag);
    launch(rows, [&] {
      denoise_step_kernel<T>(x.const_data_ptr<T>(), x.stride(0), z.const_data_ptr<int64_t>(),
                             as.const_data_ptr<double>(), at_.const_data_ptr<double>(),
                             out.mutable_data_ptr<int64_t>(), rows, v, masked, mask_id,
                             static_cast<float>(1.0 / temperature), top_p, static_cast<uint64_t>(seed),
                             static_cast<uint64_t>(offset));
    });
  });
  return out;
}

at::Tensor posterior_sample(const at::Tensor& z, const at::Tensor& x, const at::Tensor& as, const at::Tensor& at_,
                            bool masked, int64_t mask_id, int64_t num_classes, int64_t seed, int64_t offset) {
  const int64_t rows = z.size(0);
  at::Tensor out = at::empty({rows}, z.options());
  if (x.is_floating_point()) {
    launch(rows, [&] {
      posterior_soft_kernel(z.const_data_ptr<int64_t>(), x.const_data_ptr<float>(), x.stride(0),
                            as.const_data_ptr<double>(), at_.const_data_ptr<double>(),
                            out.mutable_data_ptr<int64_t>(), rows, x.size(1), masked, mask_id,
                            static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
    });
  } else {
    emu::launch(2, 64, [&] {
      posterior_hard_kernel(z.const_data_ptr<int64_t>(), x.const_data_ptr<int64_t>(), as.const_data_ptr<double>(),
                            at_.const_data_ptr<double>(), out.mutable_data_ptr<int64_t>(), rows, masked, mask_id,
                            num_classes, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
    });
  }
  return out;
}

at::Tensor grad_gram(const at::Tensor& a, const at::Tensor& g) {
  const int64_t n = a.size(0), t = a.size(1), d_in = a.size(2), d_out = g.size(2);
  at::Tensor k = at::empty({n, n}, a.options());
  const int64_t pairs = n * (n + 1) / 2;
  launch(pairs, [&] {
    gram_trick_kernel(a.const_data_ptr<float>(), g.const_data_ptr<float>(), k.mutable_data_ptr<float>(), n, t, d_in,
                      d_out);
  });
  return k;
}

// How many 16-byte vector loads and stores the last launch made (the fast path was taken).
int64_t last_vector_accesses() { return emu::last_vector_accesses; }

}  // namespace
}  // namespace dmmd::cuda

// The op namespace names the thread count, so builds for several block sizes load side by side.
#ifndef DMMD_EMU_LIB
#define DMMD_EMU_LIB dmmd_emu
#endif
#define DMMD_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // expands DMMD_EMU_LIB first

DMMD_TORCH_LIBRARY(DMMD_EMU_LIB, m) {
  m.def("teacher_logprobs", &dmmd::cuda::teacher_logprobs);
  m.def("generator_forward", &dmmd::cuda::generator_forward);
  m.def("generator_backward", &dmmd::cuda::generator_backward);
  m.def("aux_forward", &dmmd::cuda::aux_forward);
  m.def("aux_backward", &dmmd::cuda::aux_backward);
  m.def("sample_categorical", &dmmd::cuda::sample_categorical);
  m.def("denoise_step", &dmmd::cuda::denoise_step);
  m.def("posterior_sample", &dmmd::cuda::posterior_sample);
  m.def("grad_gram", &dmmd::cuda::grad_gram);
  m.def("last_vector_accesses", &dmmd::cuda::last_vector_accesses);
}
