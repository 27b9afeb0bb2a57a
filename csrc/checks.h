// Argument checks shared by the CPU and CUDA registrations. The Python wrappers give
// users friendlier messages first; these guard direct torch.ops.dmmd.* calls.
#pragma once
#include <torch/library.h>

namespace dmmd {

inline void check_philox_args(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.scalar_type() == at::kLong, "philox4x32: counter must be int64, got ",
              counter.scalar_type());
  TORCH_CHECK(key.scalar_type() == at::kLong, "philox4x32: key must be int64, got ", key.scalar_type());
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4, "philox4x32: counter must be [n, 4], got ",
              counter.sizes());
  TORCH_CHECK(key.dim() == 2 && key.size(1) == 2 && key.size(0) == counter.size(0),
              "philox4x32: key must be [n, 2] with n = counter.size(0), got ", key.sizes());
  TORCH_CHECK(counter.device() == key.device(), "philox4x32: counter and key must be on one device");
}

}  // namespace dmmd
