// CPU registration of the raw Philox op (the row kernels live in their own files).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../checks.h"
#include "dmmd/philox.h"

namespace dmmd {
namespace {

at::Tensor philox4x32_cpu(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_args(counter, key);
  const at::Tensor c = counter.contiguous();
  const at::Tensor k = key.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t* cp = c.data_ptr<int64_t>();
  const int64_t* kp = k.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, c.size(0), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const PhiloxWords r = philox4x32_10(
          static_cast<uint32_t>(cp[4 * i]), static_cast<uint32_t>(cp[4 * i + 1]),
          static_cast<uint32_t>(cp[4 * i + 2]), static_cast<uint32_t>(cp[4 * i + 3]),
          static_cast<uint32_t>(kp[2 * i]), static_cast<uint32_t>(kp[2 * i + 1]));
      for (int j = 0; j < 4; ++j) op[4 * i + j] = static_cast<int64_t>(r.w[j]);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmmd, CPU, m) { m.impl("philox4x32", &philox4x32_cpu); }

}  // namespace dmmd
