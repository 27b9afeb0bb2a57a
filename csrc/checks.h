// Argument checks and dtype dispatch shared by the CPU and CUDA registrations. The Python
// wrappers give users friendlier messages first; these guard direct torch.ops.dmmd.* calls.
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

// aux_loss's arguments as the kernels take them.
struct AuxArgs {
  at::Tensor b, a, x;  // a undefined without a teacher; x int64 [rows] or float32 [rows, V]
  bool soft, teacher;
};

inline AuxArgs aux_loss_args(const at::Tensor& aux, const at::Tensor& target,
                             const std::optional<at::Tensor>& teacher, const char* op) {
  AuxArgs out;
  out.b = logit_rows(aux, op, "aux_logits");
  out.teacher = teacher.has_value() && teacher->defined();
  if (out.teacher) {
    out.a = logit_rows(*teacher, op, "teacher_logits");
    check_like(out.a, out.b, op, "teacher_logits", "aux_logits");
  }
  TORCH_CHECK_VALUE(target.device() == out.b.device(), op, ": target must be on the device of aux_logits");
  out.soft = target.is_floating_point();
  const int64_t rows = out.b.size(0), v = out.b.size(1);
  if (out.soft) {
    TORCH_CHECK_VALUE(target.scalar_type() == at::kFloat, op, ": a soft target must be float32, got ",
                      target.scalar_type());
    TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == rows && target.size(1) == v, op,
                      ": a soft target must be [rows, V] like aux_logits, got ", target.sizes());
    out.x = target.stride(1) == 1 ? target : target.contiguous();
  } else {
    out.x = row_vector(target, rows, at::kLong, op, "target");
  }
  return out;
}

// generator_loss's logits as the kernels take them.
struct GenArgs {
  at::Tensor u, a, b;
};

inline GenArgs generator_loss_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& aux,
                                   const char* op) {
  GenArgs g{logit_rows(student, op, "student_logits"), logit_rows(teacher, op, "teacher_logits"),
            logit_rows(aux, op, "aux_logits")};
  check_like(g.a, g.u, op, "teacher_logits", "student_logits");
  check_like(g.b, g.u, op, "aux_logits", "student_logits");
  return g;
}

// A loss backward's grad_loss (float32 [rows]) and the forward's stats (float32 [rows, k]), on
// the device of the logits `ref`.
inline std::pair<at::Tensor, at::Tensor> loss_backward_args(const at::Tensor& grad_loss, const at::Tensor& stats,
                                                            int64_t k, const at::Tensor& ref, const char* op) {
  const int64_t rows = ref.size(0);
  at::Tensor g = row_vector(grad_loss, rows, at::kFloat, op, "grad_loss");
  at::Tensor st = stats_rows(stats, rows, k, op);
  TORCH_CHECK_VALUE(g.device() == ref.device() && st.device() == ref.device(), op,
                    ": grad_loss and stats must be on the device of the logits");
  return {g, st};
}

// denoise_step's arguments as the kernels take them.
struct DenoiseArgs {
  at::Tensor x, z, as, at;
  bool masked;
};

inline DenoiseArgs denoise_step_args(const at::Tensor& logits, const at::Tensor& z_t, const at::Tensor& alpha_s,
                                     const at::Tensor& alpha_t, const std::string& process, int64_t mask_id,
                                     double temperature, double top_p, const char* op) {
  check_top_p_args(temperature, top_p, 0.0, op);
  DenoiseArgs in;
  in.masked = is_masked_process(process, op);
  in.x = logit_rows(logits, op, "logits");
  const int64_t rows = in.x.size(0), v = in.x.size(1);
  in.z = row_vector(z_t, rows, at::kLong, op, "z_t");
  in.as = row_vector(alpha_s, rows, at::kDouble, op, "alpha_s");
  in.at = row_vector(alpha_t, rows, at::kDouble, op, "alpha_t");
  TORCH_CHECK_VALUE(in.z.device() == in.x.device() && in.as.device() == in.x.device() &&
                        in.at.device() == in.x.device(),
                    op, ": z_t, alpha_s and alpha_t must be on the device of logits");
  if (in.masked) {
    TORCH_CHECK_VALUE(mask_id >= 0 && mask_id < v, op, ": mask_id must be in [0, ", v,
                      ") for process=\"masked\", got ", mask_id);
    TORCH_CHECK_VALUE(v >= 2, op, ": masked diffusion needs V >= 2");
  }
  return in;
}

// posterior_sample's arguments as the kernels take them; v is -1 when unknown (hard x, masked,
// no num_classes).
struct PosteriorArgs {
  at::Tensor z, as, at, x;  // x: int64 [rows] or float32 [rows, V]
  bool masked, soft;
  int64_t v;
};

inline PosteriorArgs posterior_sample_args(const at::Tensor& z_t, const at::Tensor& x, const at::Tensor& alpha_s,
                                           const at::Tensor& alpha_t, const std::string& process, int64_t mask_id,
                                           int64_t num_classes, const char* op) {
  PosteriorArgs in;
  in.masked = is_masked_process(process, op);
  TORCH_CHECK_VALUE(z_t.dim() == 1, op, ": z_t must be 1-D [rows], got ", z_t.sizes());
  const int64_t rows = z_t.size(0);
  in.z = row_vector(z_t, rows, at::kLong, op, "z_t");
  in.as = row_vector(alpha_s, rows, at::kDouble, op, "alpha_s");
  in.at = row_vector(alpha_t, rows, at::kDouble, op, "alpha_t");
  TORCH_CHECK_VALUE(x.device() == in.z.device() && in.as.device() == in.z.device() && in.at.device() == in.z.device(),
                    op, ": x, alpha_s and alpha_t must be on the device of z_t");
  in.soft = x.is_floating_point();
  in.v = num_classes;
  if (in.soft) {
    TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) == rows, op,
                      ": soft x must be float32 [rows, V], got ", x.scalar_type(), " ", x.sizes());
    in.x = x.stride(1) == 1 ? x : x.contiguous();
    TORCH_CHECK_VALUE(num_classes < 0 || num_classes == x.size(1), op, ": num_classes=", num_classes,
                      " disagrees with soft x's V=", x.size(1));
    in.v = x.size(1);
  } else {
    in.x = row_vector(x, rows, at::kLong, op, "x");
    TORCH_CHECK_VALUE(in.masked || num_classes >= 1, op, ": num_classes is required for process=\"uniform\" ",
                      "with hard x");
  }
  if (in.masked) {
    TORCH_CHECK_VALUE(mask_id >= 0 && (in.v < 0 || mask_id < in.v), op, ": mask_id must be a class id for ",
                      "process=\"masked\", got ", mask_id);
  }
  return in;
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
