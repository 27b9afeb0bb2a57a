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
  check_top_p_args(temperature, top_p, 0.0, op);
  const bool is_masked = is_masked_process(std::string(process), op);
  const at::Tensor x = logit_rows(logits, op, "logits");
  const int64_t rows = x.size(0), v = x.size(1);
  const at::Tensor z = row_vector(z_t, rows, at::kLong, op, "z_t");
  const at::Tensor as = row_vector(alpha_s, rows, at::kDouble, op, "alpha_s");
  const at::Tensor at_ = row_vector(alpha_t, rows, at::kDouble, op, "alpha_t");
  TORCH_CHECK_VALUE(z.device() == x.device() && as.device() == x.device() && at_.device() == x.device(), op,
                    ": z_t, alpha_s and alpha_t must be on the device of logits");
  if (is_masked) {
    TORCH_CHECK_VALUE(mask_id >= 0 && mask_id < v, op, ": mask_id must be in [0, ", v,
                      ") for process=\"masked\", got ", mask_id);
    TORCH_CHECK_VALUE(v >= 2, op, ": masked diffusion needs V >= 2");
  }
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
  const bool is_masked = is_masked_process(std::string(process), op);
  TORCH_CHECK_VALUE(z_t.dim() == 1, op, ": z_t must be 1-D [rows], got ", z_t.sizes());
  const int64_t rows = z_t.size(0);
  const at::Tensor z = row_vector(z_t, rows, at::kLong, op, "z_t");
  const at::Tensor as = row_vector(alpha_s, rows, at::kDouble, op, "alpha_s");
  const at::Tensor at_ = row_vector(alpha_t, rows, at::kDouble, op, "alpha_t");
  TORCH_CHECK_VALUE(x.device() == z.device() && as.device() == z.device() && at_.device() == z.device(), op,
                    ": x, alpha_s and alpha_t must be on the device of z_t");
  const bool soft = x.is_floating_point();
  at::Tensor xs;
  int64_t v = num_classes;
  if (soft) {
    TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) == rows, op,
                      ": soft x must be float32 [rows, V], got ", x.scalar_type(), " ", x.sizes());
    xs = x.stride(1) == 1 ? x : x.contiguous();
    TORCH_CHECK_VALUE(num_classes < 0 || num_classes == x.size(1), op, ": num_classes=", num_classes,
                      " disagrees with soft x's V=", x.size(1));
    v = x.size(1);
  } else {
    xs = row_vector(x, rows, at::kLong, op, "x");
    TORCH_CHECK_VALUE(is_masked || num_classes >= 1, op, ": num_classes is required for process=\"uniform\" ",
                      "with hard x");
  }
  if (is_masked) {
    TORCH_CHECK_VALUE(mask_id >= 0 && (v < 0 || mask_id < v), op, ": mask_id must be a class id for ",
                      "process=\"masked\", got ", mask_id);
  }
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
