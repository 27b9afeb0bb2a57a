// CUDA registration of the samplers: sample_categorical, denoise_step and posterior_sample.
// Argument checks and launches; the kernels are in samplers_kernels.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "../checks.h"
#include "samplers_kernels.cuh"

namespace dmmd::cuda {
namespace {

at::Tensor sample_categorical_cuda(const at::Tensor& logits, double temperature, double top_p, int64_t seed,
                                   int64_t offset) {
  constexpr const char* op = "sample_categorical";
  check_top_p_args(temperature, top_p, 0.0, op);
  const at::Tensor x = logit_rows(logits, op, "logits");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), v = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  if (rows == 0) return out;
  dispatch_logits(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    sample_categorical_kernel<T><<<row_grid(rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<T>(), x.stride(0), out.mutable_data_ptr<int64_t>(), rows, v,
        static_cast<float>(1.0 / temperature), top_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor denoise_step_cuda(const at::Tensor& logits, const at::Tensor& z_t, const at::Tensor& alpha_s,
                             const at::Tensor& alpha_t, c10::string_view process, int64_t mask_id, double temperature,
                             double top_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "denoise_step";
  const DenoiseArgs in =
      denoise_step_args(logits, z_t, alpha_s, alpha_t, std::string(process), mask_id, temperature, top_p, op);
  const at::Tensor &x = in.x, &z = in.z, &as = in.as, &at_ = in.at;
  const bool is_masked = in.masked;
  const int64_t rows = x.size(0), v = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({rows}, z.options());
  if (rows == 0) return out;
  dispatch_logits(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    denoise_step_kernel<T><<<row_grid(rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<T>(), x.stride(0), z.const_data_ptr<int64_t>(), as.const_data_ptr<double>(),
        at_.const_data_ptr<double>(), out.mutable_data_ptr<int64_t>(), rows, v, is_masked, mask_id,
        static_cast<float>(1.0 / temperature), top_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor posterior_sample_cuda(const at::Tensor& z_t, const at::Tensor& x, const at::Tensor& alpha_s,
                                 const at::Tensor& alpha_t, c10::string_view process, int64_t mask_id,
                                 int64_t num_classes, int64_t seed, int64_t offset) {
  constexpr const char* op = "posterior_sample";
  const PosteriorArgs in =
      posterior_sample_args(z_t, x, alpha_s, alpha_t, std::string(process), mask_id, num_classes, op);
  const at::Tensor &z = in.z, &as = in.as, &at_ = in.at, &xs = in.x;
  const bool is_masked = in.masked, soft = in.soft;
  const int64_t rows = z.size(0), v = in.v;
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor out = at::empty({rows}, z.options());
  if (rows == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (soft) {
    posterior_soft_kernel<<<row_grid(rows), kThreads, 0, stream>>>(
        z.const_data_ptr<int64_t>(), xs.const_data_ptr<float>(), xs.stride(0), as.const_data_ptr<double>(),
        at_.const_data_ptr<double>(), out.mutable_data_ptr<int64_t>(), rows, v, is_masked, mask_id,
        static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  } else {
    constexpr int kElemThreads = 256;
    const int64_t blocks = std::min<int64_t>((rows + kElemThreads - 1) / kElemThreads, int64_t{1} << 20);
    posterior_hard_kernel<<<static_cast<unsigned>(blocks), kElemThreads, 0, stream>>>(
        z.const_data_ptr<int64_t>(), xs.const_data_ptr<int64_t>(), as.const_data_ptr<double>(),
        at_.const_data_ptr<double>(), out.mutable_data_ptr<int64_t>(), rows, is_masked, mask_id, v,
        static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace dmmd::cuda

TORCH_LIBRARY_IMPL(dmmd, CUDA, m) {
  m.impl("sample_categorical", &dmmd::cuda::sample_categorical_cuda);
  m.impl("denoise_step", &dmmd::cuda::denoise_step_cuda);
  m.impl("posterior_sample", &dmmd::cuda::posterior_sample_cuda);
}
