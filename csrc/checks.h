// Argument checks and dtype dispatch shared by the CPU and CUDA registrations (the per-op
// prologues of prologue.h are built from them). The Python wrappers give users friendlier
// messages first; these guard direct torch.ops.dmmd.* calls.
// TORCH_CHECK_VALUE raises a Python ValueError, like the wrappers.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <utility>

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

// A [rows, V] logits argument with a unit last stride (copied only when it has none).
inline at::Tensor logit_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D [rows, V], got ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op, ": ", name,
                    " must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK_VALUE(t.size(1) >= 1 && t.size(1) < (int64_t{1} << 24), op, ": ", name,
                    " must have 1 <= V < 2^24 classes, got ", t.size(1));
  return t.stride(1) == 1 ? t : t.contiguous();
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, " ",
                    ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name,
                    " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name);
}

// A contiguous 1-D [rows] tensor of the given dtype.
inline at::Tensor row_vector(const at::Tensor& t, int64_t rows, at::ScalarType st, const char* op,
                             const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows, op, ": ", name, " must be 1-D [", rows, "], got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == st, op, ": ", name, " must be ", st, ", got ", t.scalar_type());
  return t.contiguous();
}

// The per-row statistics a loss forward saved for its backward: float32 [rows, k], contiguous.
inline at::Tensor stats_rows(const at::Tensor& stats, int64_t rows, int64_t k, const char* op) {
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == k &&
                        stats.scalar_type() == at::kFloat,
                    op, ": stats must be float32 [", rows, ", ", k, "], got ", stats.scalar_type(), " ",
                    stats.sizes());
  return stats.contiguous();
}

inline void check_top_p_args(double temperature, double top_p, double delta, const char* op) {
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), op, ": temperature must be > 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, op, ": top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK_VALUE(delta >= 0 && std::isfinite(delta), op, ": delta must be finite and >= 0, got ", delta);
}

// true for "masked", false for "uniform"; anything else is a ValueError.
inline bool is_masked_process(const std::string& process, const char* op) {
  TORCH_CHECK_VALUE(process == "masked" || process == "uniform", op,
                    ": process must be \"masked\" or \"uniform\", got \"", process, "\"");
  return process == "masked";
}

// Calls f(T{}) with T the C++ type of a float32 / bfloat16 / float16 logits dtype.
template <typename F>
inline void dispatch_logits(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK_VALUE(false, op, ": unsupported logits dtype ", st);
  }
}

}  // namespace dmmd
