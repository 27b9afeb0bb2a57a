// One host prologue per op, shared by the CPU and CUDA registrations (and the tests' CUDA
// emulation): check the arguments (checks.h), allocate the outputs, and fill the op's plain
// params struct (dmmd/params.h) for the logits type T the dispatch picks. The backends then
// only run their kernel (CPU) or launch (csrc/cuda/launch*.cuh) on those params.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <string>

#include "checks.h"
#include "dmmd/params.h"
#include "dmmd/rowmath.h"

namespace dmmd {

// The scalars every logits op shares, converted once as the kernels use them.
struct Tempering {
  float inv_t;
  double top_p;
  float delta;
};

inline Tempering tempering(double temperature, double top_p, double delta, const char* op) {
  check_top_p_args(temperature, top_p, delta, op);
  return {static_cast<float>(1.0 / temperature), top_p, static_cast<float>(delta)};
}

// ----------------------------------------------------------------------------- teacher_logprobs

struct TeacherLogprobsCall {
  at::Tensor a, out;
  Tempering k;

  template <typename T>
  TeacherLogprobsParams<T> params() const {
    return {a.const_data_ptr<T>(), a.stride(0), out.mutable_data_ptr<float>(), a.size(0), a.size(1),
            k.inv_t, k.top_p, k.delta};
  }
};

inline TeacherLogprobsCall teacher_logprobs_call(const at::Tensor& teacher, double temperature, double top_p,
                                                 double delta) {
  constexpr const char* op = "teacher_logprobs";
  TeacherLogprobsCall c;
  c.k = tempering(temperature, top_p, delta, op);
  c.a = logit_rows(teacher, op, "teacher_logits");
  c.out = at::empty({c.a.size(0), c.a.size(1)}, c.a.options().dtype(at::kFloat));
  return c;
}

// ----------------------------------------------------------------------------- generator_loss

struct GenForwardCall {
  at::Tensor u, a, b, loss, stats;
  Tempering k;

  template <typename T>
  GenForwardParams<T> params() const {
    return {u.const_data_ptr<T>(), a.const_data_ptr<T>(), b.const_data_ptr<T>(), u.stride(0), a.stride(0),
            b.stride(0), loss.mutable_data_ptr<float>(), stats.mutable_data_ptr<float>(), u.size(0), u.size(1),
            k.inv_t, k.top_p, k.delta};
  }
};

inline void generator_logits(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& aux,
                             const char* op, at::Tensor& u, at::Tensor& a, at::Tensor& b) {
  u = logit_rows(student, op, "student_logits");
  a = logit_rows(teacher, op, "teacher_logits");
  b = logit_rows(aux, op, "aux_logits");
  check_like(a, u, op, "teacher_logits", "student_logits");
  check_like(b, u, op, "aux_logits", "student_logits");
}

inline GenForwardCall generator_forward_call(const at::Tensor& student, const at::Tensor& teacher,
                                             const at::Tensor& aux, double temperature, double top_p,
                                             double delta) {
  constexpr const char* op = "generator_loss";
  GenForwardCall c;
  c.k = tempering(temperature, top_p, delta, op);
  generator_logits(student, teacher, aux, op, c.u, c.a, c.b);
  c.loss = at::empty({c.u.size(0)}, c.u.options().dtype(at::kFloat));
  c.stats = at::empty({c.u.size(0), kGenStats}, c.u.options().dtype(at::kFloat));
  return c;
}

// A loss backward's grad_loss (float32 [rows]) and the forward's stats (float32 [rows, k]), on
// the device of the logits `ref`.
inline void loss_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& stats, int64_t k,
                                 const at::Tensor& ref, const char* op, at::Tensor& g, at::Tensor& st) {
  const int64_t rows = ref.size(0);
  g = row_vector(grad_loss, rows, at::kFloat, op, "grad_loss");
  st = stats_rows(stats, rows, k, op);
  TORCH_CHECK_VALUE(g.device() == ref.device() && st.device() == ref.device(), op,
                    ": grad_loss and stats must be on the device of the logits");
}

struct GenBackwardCall {
  at::Tensor g, u, a, b, stats, grad;
  Tempering k;

  template <typename T>
  GenBackwardParams<T> params() const {
    return {g.const_data_ptr<float>(), u.const_data_ptr<T>(), a.const_data_ptr<T>(), b.const_data_ptr<T>(),
            u.stride(0), a.stride(0), b.stride(0), stats.const_data_ptr<float>(), grad.mutable_data_ptr<T>(),
            u.size(0), u.size(1), k.inv_t, k.top_p, k.delta};
  }
};

inline GenBackwardCall generator_backward_call(const at::Tensor& grad_loss, const at::Tensor& student,
                                               const at::Tensor& teacher, const at::Tensor& aux,
                                               const at::Tensor& stats, double temperature, double top_p,
                                               double delta) {
  constexpr const char* op = "generator_loss_backward";
  GenBackwardCall c;
  c.k = tempering(temperature, top_p, delta, op);
  generator_logits(student, teacher, aux, op, c.u, c.a, c.b);
  loss_backward_inputs(grad_loss, stats, kGenStats, c.u, op, c.g, c.stats);
  c.grad = at::empty({c.u.size(0), c.u.size(1)}, c.u.options());
  return c;
}

// ----------------------------------------------------------------------------- aux_loss

// aux_loss's inputs as the kernels take them: b, the teacher a (undefined without one), and the
// target x, int64 [rows] (hard) or float32 [rows, V] (soft).
struct AuxInputs {
  at::Tensor b, a, x;
  bool soft = false, teacher = false;

  template <typename T>
  const T* a_ptr() const { return teacher ? a.const_data_ptr<T>() : nullptr; }
  int64_t sa() const { return teacher ? a.stride(0) : 0; }
  const float* soft_ptr() const { return soft ? x.const_data_ptr<float>() : nullptr; }
  int64_t sx() const { return soft ? x.stride(0) : 0; }
  const int64_t* hard_ptr() const { return soft ? nullptr : x.const_data_ptr<int64_t>(); }
};

inline AuxInputs aux_inputs(const at::Tensor& aux, const at::Tensor& target, const std::optional<at::Tensor>& teacher,
                            const char* op) {
  AuxInputs in;
  in.b = logit_rows(aux, op, "aux_logits");
  in.teacher = teacher.has_value() && teacher->defined();
  if (in.teacher) {
    in.a = logit_rows(*teacher, op, "teacher_logits");
    check_like(in.a, in.b, op, "teacher_logits", "aux_logits");
  }
  TORCH_CHECK_VALUE(target.device() == in.b.device(), op, ": target must be on the device of aux_logits");
  in.soft = target.is_floating_point();
  const int64_t rows = in.b.size(0), v = in.b.size(1);
  if (in.soft) {
    TORCH_CHECK_VALUE(target.scalar_type() == at::kFloat, op, ": a soft target must be float32, got ",
                      target.scalar_type());
    TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == rows && target.size(1) == v, op,
                      ": a soft target must be [rows, V] like aux_logits, got ", target.sizes());
    in.x = target.stride(1) == 1 ? target : target.contiguous();
  } else {
    in.x = row_vector(target, rows, at::kLong, op, "target");
  }
  return in;
}

struct AuxForwardCall {
  AuxInputs in;
  at::Tensor loss, stats;
  Tempering k;

  template <typename T>
  AuxForwardParams<T> params() const {
    return {in.b.const_data_ptr<T>(), in.b.stride(0), in.a_ptr<T>(), in.sa(), in.soft_ptr(), in.sx(), in.hard_ptr(),
            loss.mutable_data_ptr<float>(), stats.mutable_data_ptr<float>(), in.b.size(0), in.b.size(1), k.inv_t,
            k.top_p, k.delta};
  }
};

inline AuxForwardCall aux_forward_call(const at::Tensor& aux, const at::Tensor& target,
                                       const std::optional<at::Tensor>& teacher, double temperature, double top_p,
                                       double delta) {
  constexpr const char* op = "aux_loss";
  AuxForwardCall c;
  c.k = tempering(temperature, top_p, delta, op);
  c.in = aux_inputs(aux, target, teacher, op);
  c.loss = at::empty({c.in.b.size(0)}, c.in.b.options().dtype(at::kFloat));
  c.stats = at::empty({c.in.b.size(0), kAuxStats}, c.in.b.options().dtype(at::kFloat));
  return c;
}

struct AuxBackwardCall {
  AuxInputs in;
  at::Tensor g, stats, grad;
  Tempering k;

  template <typename T>
  AuxBackwardParams<T> params() const {
    return {g.const_data_ptr<float>(), in.b.const_data_ptr<T>(), in.b.stride(0), in.a_ptr<T>(), in.sa(),
            in.soft_ptr(), in.sx(), in.hard_ptr(), stats.const_data_ptr<float>(), grad.mutable_data_ptr<T>(),
            in.b.size(0), in.b.size(1), k.inv_t, k.top_p, k.delta};
  }
};

inline AuxBackwardCall aux_backward_call(const at::Tensor& grad_loss, const at::Tensor& aux, const at::Tensor& target,
                                         const std::optional<at::Tensor>& teacher, const at::Tensor& stats,
                                         double temperature, double top_p, double delta) {
  constexpr const char* op = "aux_loss_backward";
  AuxBackwardCall c;
  c.k = tempering(temperature, top_p, delta, op);
  c.in = aux_inputs(aux, target, teacher, op);
  loss_backward_inputs(grad_loss, stats, kAuxStats, c.in.b, op, c.g, c.stats);
  c.grad = at::empty({c.in.b.size(0), c.in.b.size(1)}, c.in.b.options());
  return c;
}

// ----------------------------------------------------------------------------- samplers

struct SampleCall {
  at::Tensor x, out;
  Tempering k;
  uint64_t seed, offset;

  template <typename T>
  SampleParams<T> params() const {
    return {x.const_data_ptr<T>(), x.stride(0), out.mutable_data_ptr<int64_t>(), x.size(0), x.size(1), k.inv_t,
            k.top_p, seed, offset};
  }
};

inline SampleCall sample_categorical_call(const at::Tensor& logits, double temperature, double top_p, int64_t seed,
                                          int64_t offset) {
  constexpr const char* op = "sample_categorical";
  SampleCall c;
  c.k = tempering(temperature, top_p, 0.0, op);
  c.x = logit_rows(logits, op, "logits");
  c.out = at::empty({c.x.size(0)}, c.x.options().dtype(at::kLong));
  c.seed = static_cast<uint64_t>(seed);
  c.offset = static_cast<uint64_t>(offset);
  return c;
}

struct DenoiseCall {
  at::Tensor x, z, a_s, a_t, out;
  bool masked;
  int64_t mask_id;
  Tempering k;
  uint64_t seed, offset;

  template <typename T>
  DenoiseParams<T> params() const {
    return {x.const_data_ptr<T>(), x.stride(0), z.const_data_ptr<int64_t>(), a_s.const_data_ptr<double>(),
            a_t.const_data_ptr<double>(), out.mutable_data_ptr<int64_t>(), x.size(0), x.size(1), masked, mask_id,
            k.inv_t, k.top_p, seed, offset};
  }
};

inline DenoiseCall denoise_step_call(const at::Tensor& logits, const at::Tensor& z_t, const at::Tensor& alpha_s,
                                     const at::Tensor& alpha_t, const std::string& process, int64_t mask_id,
                                     double temperature, double top_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "denoise_step";
  DenoiseCall c;
  c.k = tempering(temperature, top_p, 0.0, op);
  c.masked = is_masked_process(process, op);
  c.mask_id = mask_id;
  c.x = logit_rows(logits, op, "logits");
  const int64_t rows = c.x.size(0), v = c.x.size(1);
  c.z = row_vector(z_t, rows, at::kLong, op, "z_t");
  c.a_s = row_vector(alpha_s, rows, at::kDouble, op, "alpha_s");
  c.a_t = row_vector(alpha_t, rows, at::kDouble, op, "alpha_t");
  TORCH_CHECK_VALUE(c.z.device() == c.x.device() && c.a_s.device() == c.x.device() && c.a_t.device() == c.x.device(),
                    op, ": z_t, alpha_s and alpha_t must be on the device of logits");
  if (c.masked) {
    TORCH_CHECK_VALUE(mask_id >= 0 && mask_id < v, op, ": mask_id must be in [0, ", v,
                      ") for process=\"masked\", got ", mask_id);
    TORCH_CHECK_VALUE(v >= 2, op, ": masked diffusion needs V >= 2");
  }
  c.out = at::empty({rows}, c.z.options());
  c.seed = static_cast<uint64_t>(seed);
  c.offset = static_cast<uint64_t>(offset);
  return c;
}

struct PosteriorCall {
  at::Tensor z, a_s, a_t, x, out;  // x: int64 [rows] or float32 [rows, V]
  bool masked, soft;
  int64_t v, mask_id;  // v: -1 when unknown (hard x, masked, no num_classes)
  uint64_t seed, offset;

  PosteriorParams params() const {
    return {z.const_data_ptr<int64_t>(), soft ? nullptr : x.const_data_ptr<int64_t>(),
            soft ? x.const_data_ptr<float>() : nullptr, soft ? x.stride(0) : 0, a_s.const_data_ptr<double>(),
            a_t.const_data_ptr<double>(), out.mutable_data_ptr<int64_t>(), z.size(0), v, masked, mask_id, seed,
            offset};
  }
};

inline PosteriorCall posterior_sample_call(const at::Tensor& z_t, const at::Tensor& x, const at::Tensor& alpha_s,
                                           const at::Tensor& alpha_t, const std::string& process, int64_t mask_id,
                                           int64_t num_classes, int64_t seed, int64_t offset) {
  constexpr const char* op = "posterior_sample";
  PosteriorCall c;
  c.masked = is_masked_process(process, op);
  c.mask_id = mask_id;
  TORCH_CHECK_VALUE(z_t.dim() == 1, op, ": z_t must be 1-D [rows], got ", z_t.sizes());
  const int64_t rows = z_t.size(0);
  c.z = row_vector(z_t, rows, at::kLong, op, "z_t");
  c.a_s = row_vector(alpha_s, rows, at::kDouble, op, "alpha_s");
  c.a_t = row_vector(alpha_t, rows, at::kDouble, op, "alpha_t");
  TORCH_CHECK_VALUE(x.device() == c.z.device() && c.a_s.device() == c.z.device() && c.a_t.device() == c.z.device(),
                    op, ": x, alpha_s and alpha_t must be on the device of z_t");
  c.soft = x.is_floating_point();
  c.v = num_classes;
  if (c.soft) {
    TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) == rows, op,
                      ": soft x must be float32 [rows, V], got ", x.scalar_type(), " ", x.sizes());
    c.x = x.stride(1) == 1 ? x : x.contiguous();
    TORCH_CHECK_VALUE(num_classes < 0 || num_classes == x.size(1), op, ": num_classes=", num_classes,
                      " disagrees with soft x's V=", x.size(1));
    c.v = x.size(1);
  } else {
    c.x = row_vector(x, rows, at::kLong, op, "x");
    TORCH_CHECK_VALUE(c.masked || num_classes >= 1, op, ": num_classes is required for process=\"uniform\" ",
                      "with hard x");
  }
  if (c.masked) {
    TORCH_CHECK_VALUE(mask_id >= 0 && (c.v < 0 || mask_id < c.v), op, ": mask_id must be a class id for ",
                      "process=\"masked\", got ", mask_id);
  }
  c.out = at::empty({rows}, c.z.options());
  c.seed = static_cast<uint64_t>(seed);
  c.offset = static_cast<uint64_t>(offset);
  return c;
}

}  // namespace dmmd
