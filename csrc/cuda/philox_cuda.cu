// CUDA registration of the raw Philox op: the same header as the CPU path, so both
// backends produce identical words for the same (key, counter).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "dmmd/philox.h"

namespace dmmd {
namespace {

__global__ void philox4x32_kernel(const int64_t* __restrict__ counter, const int64_t* __restrict__ key,
                                  int64_t* __restrict__ out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const PhiloxWords r = philox4x32_10(
      static_cast<uint32_t>(counter[4 * i]), static_cast<uint32_t>(counter[4 * i + 1]),
      static_cast<uint32_t>(counter[4 * i + 2]), static_cast<uint32_t>(counter[4 * i + 3]),
      static_cast<uint32_t>(key[2 * i]), static_cast<uint32_t>(key[2 * i + 1]));
#pragma unroll
  for (int j = 0; j < 4; ++j) out[4 * i + j] = static_cast<int64_t>(r.w[j]);
}

at::Tensor philox4x32_cuda(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_args(counter, key);
  const c10::cuda::CUDAGuard guard(counter.device());
  const at::Tensor c = counter.contiguous();
  const at::Tensor k = key.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t n = c.size(0);
  if (n == 0) return out;
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  philox4x32_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      c.data_ptr<int64_t>(), k.data_ptr<int64_t>(), out.data_ptr<int64_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmmd, CUDA, m) { m.impl("philox4x32", &philox4x32_cuda); }

}  // namespace dmmd
