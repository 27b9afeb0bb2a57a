// grad_gram on CUDA: the fused Gram-trick kernel (gram_kernels.cuh) or, when materialising the
// per-example gradients costs less (grad_gram_paths.h), GEMMs through ATen (cuBLAS).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../grad_gram_paths.h"
#include "launch_gram.cuh"

namespace dmmd::cuda {
namespace {

at::Tensor grad_gram_cuda(const at::Tensor& a_in, const at::Tensor& g_in) {
  const auto [a, g] = grad_gram_args(a_in, g_in);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t n = a.size(0), t = a.size(1), d_in = a.size(2), d_out = g.size(2);
  if (n == 0) return at::zeros({0, 0}, a.options());
  if (!use_gram_trick(n, t, d_in, d_out)) return materialised(a, g);
  at::Tensor k = at::empty({n, n}, a.options());
  launch_gram_trick(GramParams{a.const_data_ptr<float>(), g.const_data_ptr<float>(), k.mutable_data_ptr<float>(), n,
                               t, d_in, d_out},
                    at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return k;
}

}  // namespace
}  // namespace dmmd::cuda

TORCH_LIBRARY_IMPL(dmmd, CUDA, m) { m.impl("grad_gram", &dmmd::cuda::grad_gram_cuda); }
