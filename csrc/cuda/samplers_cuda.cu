// CUDA registration of the samplers: sample_categorical, denoise_step and posterior_sample: the
// shared host prologue (prologue.h), then the launch (launch.cuh) on the current stream. The
// kernels are in samplers_kernels.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "../prologue.h"
#include "launch_samplers.cuh"

namespace dmmd::cuda {
namespace {

at::Tensor sample_categorical_cuda(const at::Tensor& logits, double temperature, double top_p, int64_t seed,
                                   int64_t offset) {
  const SampleCall c = sample_categorical_call(logits, temperature, top_p, seed, offset);
  const c10::cuda::CUDAGuard guard(c.x.device());
  if (c.x.size(0) == 0) return c.out;
  dispatch_logits(c.x.scalar_type(), "sample_categorical", [&](auto tag) {
    launch_sample_categorical(c.params<decltype(tag)>(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c.out;
}

at::Tensor denoise_step_cuda(const at::Tensor& logits, const at::Tensor& z_t, const at::Tensor& alpha_s,
                             const at::Tensor& alpha_t, c10::string_view process, int64_t mask_id, double temperature,
                             double top_p, int64_t seed, int64_t offset) {
  const DenoiseCall c =
      denoise_step_call(logits, z_t, alpha_s, alpha_t, std::string(process), mask_id, temperature, top_p, seed, offset);
  const c10::cuda::CUDAGuard guard(c.x.device());
  if (c.x.size(0) == 0) return c.out;
  dispatch_logits(c.x.scalar_type(), "denoise_step", [&](auto tag) {
    launch_denoise_step(c.params<decltype(tag)>(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c.out;
}

at::Tensor posterior_sample_cuda(const at::Tensor& z_t, const at::Tensor& x, const at::Tensor& alpha_s,
                                 const at::Tensor& alpha_t, c10::string_view process, int64_t mask_id,
                                 int64_t num_classes, int64_t seed, int64_t offset) {
  const PosteriorCall c =
      posterior_sample_call(z_t, x, alpha_s, alpha_t, std::string(process), mask_id, num_classes, seed, offset);
  const c10::cuda::CUDAGuard guard(c.z.device());
  if (c.z.size(0) == 0) return c.out;
  launch_posterior_sample(c.params(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c.out;
}

}  // namespace
}  // namespace dmmd::cuda

TORCH_LIBRARY_IMPL(dmmd, CUDA, m) {
  m.impl("sample_categorical", &dmmd::cuda::sample_categorical_cuda);
  m.impl("denoise_step", &dmmd::cuda::denoise_step_cuda);
  m.impl("posterior_sample", &dmmd::cuda::posterior_sample_cuda);
}
