// CPU kernels of the loss ops: teacher_logprobs, generator_loss (+ backward) and aux_loss
// (+ backward). One row per task of at::parallel_for; each row is streamed a few times in
// AVX2 vectors with float32 math from the raw logits and float64 row sums:
//   1. the row maxima (and the NaN / infinity checks),
//   2. with top_p < 1: the teacher's exponentials into a per-thread scratch row and the
//      nucleus threshold (row_scan.h),
//   3. one fused pass for the normalisers and the loss.
// The forward keeps a few float32 statistics per row (rowmath.h) so that each backward is
// a single pass with one exp per element.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "../checks.h"
#include "dmmd/rowmath.h"
#include "memory.h"
#include "row_scan.h"

namespace dmmd::cpu {
namespace {

// What the kernels know about a teacher row after passes 1-2.
struct TeacherRow {
  float ms;          // max over classes of s = a / temperature
  bool masked;       // top_p < 1
  Nucleus nu;        // the nucleus, when masked
  double log_z;      // log normaliser of the (masked) tempered logits relative to ms
};

// Passes 1-2 on a teacher row. Without a nucleus the normaliser is left to the fused pass.
template <typename T>
TeacherRow scan_teacher(const T* a, int64_t v, float inv_t, double top_p, double delta, Workspace& ws,
                        const char* op, const char* arg, int64_t r) {
  const float ma = row_max(a, v);
  check_row_max(ma, op, arg, r);
  TeacherRow t{ma * inv_t, top_p < 1.0, Nucleus{-kInf, v - 1, 0, 0}, 0};
  if (t.masked) {
    teacher_exp(a, v, inv_t, t.ms, -1, true, ws);
    t.nu = find_nucleus(a, v, inv_t, t.ms, top_p, ws);
    t.log_z = masked_log_normaliser(t.nu.kept, t.nu.total, delta);
  }
  return t;
}

// The tempered teacher logit with the soft top-p mask, relative to ms (before the normaliser).
inline fVec masked_tempered(const fVec& a, int64_t i, float inv_t, const TeacherRow& t, float delta) {
  const fVec x = tempered(a, inv_t, t.ms);
  if (!t.masked) return x;
  const fVec keep = keep_mask(a, i, t.nu.a_star, static_cast<float>(t.nu.i_star));
  return x - fVec::blendv(fVec(delta), fVec(0.f), keep);
}

// ----------------------------------------------------------------------------- teacher_logprobs

at::Tensor teacher_logprobs_cpu(const at::Tensor& teacher, double temperature, double top_p, double delta) {
  constexpr const char* op = "teacher_logprobs";
  check_top_p_args(temperature, top_p, delta, op);
  const at::Tensor a = logit_rows(teacher, op, "teacher_logits");
  const int64_t rows = a.size(0), v = a.size(1), sa = a.stride(0);
  at::Tensor out = at::empty({rows, v}, a.options().dtype(at::kFloat));
  prefer_huge_pages(out);
  const float inv_t = static_cast<float>(1.0 / temperature), dl = static_cast<float>(delta);
  dispatch_logits(a.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* ap = a.const_data_ptr<T>();
    float* op_ = out.mutable_data_ptr<float>();
    at::parallel_for(0, rows, grain(v), [&](int64_t begin, int64_t end) {
      Workspace ws(v);
      for (int64_t r = begin; r < end; ++r) {
        const T* row = ap + r * sa;
        TeacherRow t = scan_teacher(row, v, inv_t, top_p, delta, ws, op, "teacher_logits", r);
        if (!t.masked) t.log_z = std::log(teacher_exp(row, v, inv_t, t.ms, -1, false, ws));
        const fVec lz(static_cast<float>(t.log_z));
        float* o = op_ + r * v;
        over_row(v, [&](int64_t i, int n) {
          const fVec x = masked_tempered(load(row, i, n, -kInf), i, inv_t, t, dl);
          store(o, i, n, x - lz);
        });
      }
    });
  });
  return out;
}

// ----------------------------------------------------------------------------- generator_loss

std::tuple<at::Tensor, at::Tensor> generator_loss_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                              const at::Tensor& aux, double temperature,
                                                              double top_p, double delta) {
  constexpr const char* op = "generator_loss";
  check_top_p_args(temperature, top_p, delta, op);
  const GenArgs in = generator_loss_args(student, teacher, aux, op);
  const at::Tensor &u = in.u, &a = in.a, &b = in.b;
  const int64_t rows = u.size(0), v = u.size(1);
  at::Tensor loss = at::empty({rows}, u.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({rows, kGenStats}, u.options().dtype(at::kFloat));
  const float inv_t = static_cast<float>(1.0 / temperature), dl = static_cast<float>(delta);
  dispatch_logits(u.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T *up = u.const_data_ptr<T>(), *ap = a.const_data_ptr<T>(), *bp = b.const_data_ptr<T>();
    float* lp = loss.mutable_data_ptr<float>();
    float* sp = stats.mutable_data_ptr<float>();
    at::parallel_for(0, rows, grain(v), [&](int64_t begin, int64_t end) {
      Workspace ws(v);
      for (int64_t r = begin; r < end; ++r) {
        const T *ur = up + r * u.stride(0), *ar = ap + r * a.stride(0), *br = bp + r * b.stride(0);
        const float mu = row_max(ur, v), mb = row_max(br, v);
        check_row_max(mu, op, "student_logits", r);
        check_row_max(mb, op, "aux_logits", r);
        const TeacherRow t = scan_teacher(ar, v, inv_t, top_p, delta, ws, op, "teacher_logits", r);
        BlockSum zu, zb, zt, w;
        over_row(v, [&](int64_t i, int n) {
          const fVec eu = vexp(load(ur, i, n, -kInf) - fVec(mu));
          const fVec bm = load(br, i, n, -kInf) - fVec(mb);
          const fVec a_ = load(ar, i, n, -kInf);
          zu.add(eu);
          zb.add(vexp(bm));
          if (!t.masked) zt.add(vexp(tempered(a_, inv_t, t.ms)));
          const fVec diff = masked_tempered(a_, i, inv_t, t, dl) - bm;
          w.add(fVec::blendv(fVec(0.f), eu * diff, eu > fVec(0.f)));  // p_c = 0 adds exactly 0
        });
        const double log_zu = std::log(zu.get()), log_zb = std::log(zb.get());
        const double log_zt = t.masked ? t.log_z : std::log(zt.get());
        const double l = -w.get() / std::exp(log_zu) + log_zt - log_zb;
        float* s = sp + r * kGenStats;
        s[kGenMaxU] = mu;
        s[kGenLogZU] = static_cast<float>(log_zu);
        s[kGenMaxT] = t.ms;
        s[kGenLogZT] = static_cast<float>(log_zt);
        s[kGenMaxB] = mb;
        s[kGenLogZB] = static_cast<float>(log_zb);
        s[kGenAStar] = t.nu.a_star;
        s[kGenIStar] = static_cast<float>(t.nu.i_star);
        s[kGenLoss] = static_cast<float>(l);
        lp[r] = static_cast<float>(l);
      }
    });
  });
  return {loss, stats};
}

at::Tensor generator_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student,
                                       const at::Tensor& teacher, const at::Tensor& aux, const at::Tensor& stats,
                                       double temperature, double top_p, double delta) {
  constexpr const char* op = "generator_loss_backward";
  check_top_p_args(temperature, top_p, delta, op);
  const GenArgs in = generator_loss_args(student, teacher, aux, op);
  const at::Tensor &u = in.u, &a = in.a, &b = in.b;
  const int64_t rows = u.size(0), v = u.size(1);
  const auto backward = loss_backward_args(grad_loss, stats, kGenStats, u, op);
  const at::Tensor &g = backward.first, &st = backward.second;
  at::Tensor grad = at::empty({rows, v}, u.options());
  prefer_huge_pages(grad);
  const float inv_t = static_cast<float>(1.0 / temperature), dl = static_cast<float>(delta);
  dispatch_logits(u.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T *up = u.const_data_ptr<T>(), *ap = a.const_data_ptr<T>(), *bp = b.const_data_ptr<T>();
    const float* gp = g.const_data_ptr<float>();
    const float* sp = st.const_data_ptr<float>();
    T* op_ = grad.mutable_data_ptr<T>();
    at::parallel_for(0, rows, grain(v), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T *ur = up + r * u.stride(0), *ar = ap + r * a.stride(0), *br = bp + r * b.stride(0);
        const float* s = sp + r * kGenStats;
        TeacherRow t{s[kGenMaxT], top_p < 1.0,
                     Nucleus{s[kGenAStar], static_cast<int64_t>(s[kGenIStar]), 0, 0}, s[kGenLogZT]};
        // dL/du_c = -p_c (D_c + L), D_c = log q_c - log softmax(b)_c; zero where p_c = 0.
        const fVec mu(s[kGenMaxU] + s[kGenLogZU]), mb(s[kGenMaxB] + s[kGenLogZB]);
        const fVec lzt(s[kGenLogZT]), lossv(s[kGenLoss]), ng(-gp[r]);
        T* o = op_ + r * v;
        over_row(v, [&](int64_t i, int n) {
          const fVec p = vexp(load(ur, i, n, -kInf) - mu);
          const fVec d = (masked_tempered(load(ar, i, n, -kInf), i, inv_t, t, dl) - lzt) -
                         (load(br, i, n, -kInf) - mb);
          store(o, i, n, fVec::blendv(fVec(0.f), ng * p * (d + lossv), p > fVec(0.f)));
        });
      }
    });
  });
  return grad;
}

// ----------------------------------------------------------------------------- aux_loss

std::tuple<at::Tensor, at::Tensor> aux_loss_forward_cpu(const at::Tensor& aux, const at::Tensor& target,
                                                        const std::optional<at::Tensor>& teacher,
                                                        double temperature, double top_p, double delta) {
  constexpr const char* op = "aux_loss";
  check_top_p_args(temperature, top_p, delta, op);
  const AuxArgs in = aux_loss_args(aux, target, teacher, op);
  const int64_t rows = in.b.size(0), v = in.b.size(1);
  at::Tensor loss = at::empty({rows}, in.b.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({rows, kAuxStats}, in.b.options().dtype(at::kFloat));
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float drop = std::exp(-static_cast<float>(delta));
  dispatch_logits(in.b.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* bp = in.b.const_data_ptr<T>();
    const T* ap = in.teacher ? in.a.const_data_ptr<T>() : nullptr;
    float* lp = loss.mutable_data_ptr<float>();
    float* sp = stats.mutable_data_ptr<float>();
    at::parallel_for(0, rows, grain(v), [&](int64_t begin, int64_t end) {
      Workspace ws(v);
      for (int64_t r = begin; r < end; ++r) {
        const T* br = bp + r * in.b.stride(0);
        const float mb = row_max(br, v);
        check_row_max(mb, op, "aux_logits", r);
        const T* ar = in.teacher ? ap + r * in.a.stride(0) : nullptr;
        TeacherRow t{0, false, Nucleus{-kInf, v - 1, 0, 0}, 0};
        if (in.teacher) t = scan_teacher(ar, v, inv_t, top_p, delta, ws, op, "teacher_logits", r);
        const float* xr = in.soft ? in.x.const_data_ptr<float>() + r * in.x.stride(0) : nullptr;
        const float* e = ws.e.data();
        BlockSum zb, zt, sx, sxb, sqb;
        fVec bad(0.f);
        over_row(v, [&](int64_t i, int n) {
          const fVec bm = load(br, i, n, -kInf) - fVec(mb);
          zb.add(vexp(bm));
          if (in.soft) {
            const fVec x = load(xr, i, n, 0.f);
            bad = bad | nan_mask(x) | (x < fVec(0.f)) | (x == fVec(kInf));
            sx.add(x);
            sxb.add(fVec::blendv(fVec(0.f), x * bm, x > fVec(0.f)));  // x_c = 0 adds exactly 0
          }
          if (in.teacher) {
            const fVec a_ = load(ar, i, n, -kInf);
            fVec q;
            if (t.masked) {
              const fVec keep = keep_mask(a_, i, t.nu.a_star, static_cast<float>(t.nu.i_star));
              q = fVec::loadu(e + i, n) * fVec::blendv(fVec(drop), fVec(1.f), keep);
            } else {
              q = vexp(tempered(a_, inv_t, t.ms));
              zt.add(q);
            }
            sqb.add(fVec::blendv(fVec(0.f), q * bm, q > fVec(0.f)));
          }
        });
        TORCH_CHECK_VALUE(!any(bad), op, ": target must hold finite non-negative probabilities (row ", r, ")");
        const double log_zb = std::log(zb.get());
        double sum_x, sum_xb;
        if (in.soft) {
          sum_x = sx.get();
          sum_xb = sxb.get();
        } else {
          const int64_t c = in.x.const_data_ptr<int64_t>()[r];
          TORCH_CHECK_VALUE(c >= 0 && c < v, op, ": target id ", c, " out of range [0, ", v, ") (row ", r, ")");
          sum_x = 1.0;
          sum_xb = static_cast<double>(static_cast<float>(br[c]) - mb);
        }
        double l = -sum_xb + sum_x * log_zb;
        double log_zt = 0;
        if (in.teacher) {
          log_zt = t.masked ? t.log_z : std::log(zt.get());
          l += -sqb.get() / std::exp(log_zt) + log_zb;
        }
        float* s = sp + r * kAuxStats;
        s[kAuxMaxB] = mb;
        s[kAuxLogZB] = static_cast<float>(log_zb);
        s[kAuxMaxT] = t.ms;
        s[kAuxLogZT] = static_cast<float>(log_zt);
        s[kAuxAStar] = t.nu.a_star;
        s[kAuxIStar] = static_cast<float>(t.nu.i_star);
        s[kAuxSumX] = static_cast<float>(sum_x);
        lp[r] = static_cast<float>(l);
      }
    });
  });
  return {loss, stats};
}

at::Tensor aux_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& aux, const at::Tensor& target,
                                 const std::optional<at::Tensor>& teacher, const at::Tensor& stats,
                                 double temperature, double top_p, double delta) {
  constexpr const char* op = "aux_loss_backward";
  check_top_p_args(temperature, top_p, delta, op);
  const AuxArgs in = aux_loss_args(aux, target, teacher, op);
  const int64_t rows = in.b.size(0), v = in.b.size(1);
  const auto backward = loss_backward_args(grad_loss, stats, kAuxStats, in.b, op);
  const at::Tensor &g = backward.first, &st = backward.second;
  at::Tensor grad = at::empty({rows, v}, in.b.options());
  prefer_huge_pages(grad);
  const float inv_t = static_cast<float>(1.0 / temperature), dl = static_cast<float>(delta);
  dispatch_logits(in.b.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* bp = in.b.const_data_ptr<T>();
    const T* ap = in.teacher ? in.a.const_data_ptr<T>() : nullptr;
    const float* gp = g.const_data_ptr<float>();
    const float* sp = st.const_data_ptr<float>();
    T* op_ = grad.mutable_data_ptr<T>();
    at::parallel_for(0, rows, grain(v), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* s = sp + r * kAuxStats;
        const T* br = bp + r * in.b.stride(0);
        const T* ar = in.teacher ? ap + r * in.a.stride(0) : nullptr;
        const float* xr = in.soft ? in.x.const_data_ptr<float>() + r * in.x.stride(0) : nullptr;
        const float hard = in.soft ? -1.f : static_cast<float>(in.x.const_data_ptr<int64_t>()[r]);
        const TeacherRow t{s[kAuxMaxT], top_p < 1.0,
                           Nucleus{s[kAuxAStar], static_cast<int64_t>(s[kAuxIStar]), 0, 0}, s[kAuxLogZT]};
        // dL/db_c = (sum x + sum q) softmax(b)_c - x_c - q_c
        const fVec mb(s[kAuxMaxB] + s[kAuxLogZB]), lzt(s[kAuxLogZT]), gv(gp[r]);
        const fVec coef(s[kAuxSumX] + (in.teacher ? 1.f : 0.f));
        T* o = op_ + r * v;
        over_row(v, [&](int64_t i, int n) {
          fVec d = coef * vexp(load(br, i, n, -kInf) - mb);
          if (in.soft) {
            d = d - load(xr, i, n, 0.f);
          } else {
            d = d - (fVec(1.f) & (fVec::arange(static_cast<float>(i), 1.f) == fVec(hard)));
          }
          if (in.teacher) d = d - vexp(masked_tempered(load(ar, i, n, -kInf), i, inv_t, t, dl) - lzt);
          store(o, i, n, gv * d);
        });
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmmd, CPU, m) {
  m.impl("teacher_logprobs", &teacher_logprobs_cpu);
  m.impl("generator_loss_forward", &generator_loss_forward_cpu);
  m.impl("generator_loss_backward", &generator_loss_backward_cpu);
  m.impl("aux_loss_forward", &aux_loss_forward_cpu);
  m.impl("aux_loss_backward", &aux_loss_backward_cpu);
}

}  // namespace dmmd::cpu
