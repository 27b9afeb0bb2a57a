// CPU kernels of the loss ops: teacher_logprobs, generator_loss (+ backward) and aux_loss
// (+ backward). One row per task of at::parallel_for; each row is streamed a few times in
// AVX2 vectors with float32 math from the raw logits and float64 row sums:
//   1. the row maxima (and the NaN / infinity checks),
//   2. with top_p < 1: the teacher's exponentials into a per-thread scratch row and the
//      nucleus threshold (row_scan.h),
//   3. one fused pass for the normalisers and the loss.
// The forward keeps a few float32 statistics per row (rowmath.h) so that each backward is
// a single pass with one exp per element. A row the kernels cannot use is flagged as the CUDA
// kernels flag it (NaN loss / log-probs, i_star = -1); dmmd_ops raises naming the argument.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "../prologue.h"
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
  bool bad = false;  // NaN, +inf or only -inf logits: the row is flagged, nothing else computed
};

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// A flagged loss row: NaN loss and statistics, i_star = -1 (what the CUDA kernels write).
inline void flag_loss_row(float* loss, float* stats, int k, int i_star) {
  *loss = kNaN;
  for (int j = 0; j < k; ++j) stats[j] = kNaN;
  stats[i_star] = -1.f;
}

// Passes 1-2 on a teacher row. Without a nucleus the normaliser is left to the fused pass.
template <typename T>
TeacherRow scan_teacher(const T* a, int64_t v, float inv_t, double top_p, double delta, Workspace& ws) {
  const float ma = row_max(a, v);
  TeacherRow t{ma * inv_t, top_p < 1.0, Nucleus{-kInf, v - 1, 0, 0}, 0, bad_row_max(ma)};
  if (t.bad) return t;
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

template <typename T>
void teacher_logprobs_rows(const TeacherLogprobsParams<T>& p) {
  const int64_t v = p.v;
  at::parallel_for(0, p.rows, grain(v), [&](int64_t begin, int64_t end) {
    Workspace ws(v);
    for (int64_t r = begin; r < end; ++r) {
      const T* row = p.a + r * p.sa;
      float* o = p.out + r * v;
      TeacherRow t = scan_teacher(row, v, p.inv_t, p.top_p, p.delta, ws);
      if (t.bad) {
        std::fill(o, o + v, kNaN);
        continue;
      }
      if (!t.masked) t.log_z = std::log(teacher_exp(row, v, p.inv_t, t.ms, -1, false, ws));
      const fVec lz(static_cast<float>(t.log_z));
      over_row(v, [&](int64_t i, int n) {
        const fVec x = masked_tempered(load(row, i, n, -kInf), i, p.inv_t, t, p.delta);
        store(o, i, n, x - lz);
      });
    }
  });
}

// ----------------------------------------------------------------------------- generator_loss

template <typename T>
void generator_forward_rows(const GenForwardParams<T>& p) {
  const int64_t v = p.v;
  const float inv_t = p.inv_t, dl = p.delta;
  at::parallel_for(0, p.rows, grain(v), [&](int64_t begin, int64_t end) {
    Workspace ws(v);
    for (int64_t r = begin; r < end; ++r) {
      const T *ur = p.u + r * p.su, *ar = p.a + r * p.sa, *br = p.b + r * p.sb;
      const float mu = row_max(ur, v), mb = row_max(br, v);
      float* s = p.stats + r * kGenStats;
      const TeacherRow t = scan_teacher(ar, v, inv_t, p.top_p, p.delta, ws);
      if (bad_row_max(mu) || bad_row_max(mb) || t.bad) {
        flag_loss_row(p.loss + r, s, kGenStats, kGenIStar);
        continue;
      }
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
      s[kGenMaxU] = mu;
      s[kGenLogZU] = static_cast<float>(log_zu);
      s[kGenMaxT] = t.ms;
      s[kGenLogZT] = static_cast<float>(log_zt);
      s[kGenMaxB] = mb;
      s[kGenLogZB] = static_cast<float>(log_zb);
      s[kGenAStar] = t.nu.a_star;
      s[kGenIStar] = static_cast<float>(t.nu.i_star);
      s[kGenLoss] = static_cast<float>(l);
      p.loss[r] = static_cast<float>(l);
    }
  });
}

template <typename T>
void generator_backward_rows(const GenBackwardParams<T>& p) {
  const int64_t v = p.v;
  const float inv_t = p.inv_t, dl = p.delta;
  at::parallel_for(0, p.rows, grain(v), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T *ur = p.u + r * p.su, *ar = p.a + r * p.sa, *br = p.b + r * p.sb;
      const float* s = p.stats + r * kGenStats;
      TeacherRow t{s[kGenMaxT], p.top_p < 1.0, Nucleus{s[kGenAStar], static_cast<int64_t>(s[kGenIStar]), 0, 0},
                   s[kGenLogZT]};
      // dL/du_c = -p_c (D_c + L), D_c = log q_c - log softmax(b)_c; zero where p_c = 0.
      const fVec mu(s[kGenMaxU] + s[kGenLogZU]), mb(s[kGenMaxB] + s[kGenLogZB]);
      const fVec lzt(s[kGenLogZT]), lossv(s[kGenLoss]), ng(-p.grad_loss[r]);
      T* o = p.grad + r * v;
      over_row(v, [&](int64_t i, int n) {
        const fVec pc = vexp(load(ur, i, n, -kInf) - mu);
        const fVec d = (masked_tempered(load(ar, i, n, -kInf), i, inv_t, t, dl) - lzt) -
                       (load(br, i, n, -kInf) - mb);
        store(o, i, n, fVec::blendv(fVec(0.f), ng * pc * (d + lossv), pc > fVec(0.f)));
      });
    }
  });
}

// ----------------------------------------------------------------------------- aux_loss

template <typename T>
void aux_forward_rows(const AuxForwardParams<T>& p) {
  const int64_t v = p.v;
  const bool soft = p.soft != nullptr, teacher = p.a != nullptr;
  const float inv_t = p.inv_t;
  const float drop = std::exp(-p.delta);
  at::parallel_for(0, p.rows, grain(v), [&](int64_t begin, int64_t end) {
    Workspace ws(v);
    for (int64_t r = begin; r < end; ++r) {
      const T* br = p.b + r * p.sb;
      const float mb = row_max(br, v);
      float* s = p.stats + r * kAuxStats;
      const T* ar = teacher ? p.a + r * p.sa : nullptr;
      TeacherRow t{0, false, Nucleus{-kInf, v - 1, 0, 0}, 0};
      if (teacher) t = scan_teacher(ar, v, inv_t, p.top_p, p.delta, ws);
      const int64_t c = soft ? 0 : p.hard[r];
      if (bad_row_max(mb) || t.bad || c < 0 || c >= v) {
        flag_loss_row(p.loss + r, s, kAuxStats, kAuxIStar);
        continue;
      }
      const float* xr = soft ? p.soft + r * p.sx : nullptr;
      const float* e = ws.e.data();
      BlockSum zb, zt, sx, sxb, sqb;
      fVec bad(0.f);
      over_row(v, [&](int64_t i, int n) {
        const fVec bm = load(br, i, n, -kInf) - fVec(mb);
        zb.add(vexp(bm));
        if (soft) {
          const fVec x = load(xr, i, n, 0.f);
          bad = bad | nan_mask(x) | (x < fVec(0.f)) | (x == fVec(kInf));
          sx.add(x);
          sxb.add(fVec::blendv(fVec(0.f), x * bm, x > fVec(0.f)));  // x_c = 0 adds exactly 0
        }
        if (teacher) {
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
      if (any(bad)) {  // a soft target that is not a finite non-negative vector
        flag_loss_row(p.loss + r, s, kAuxStats, kAuxIStar);
        continue;
      }
      const double log_zb = std::log(zb.get());
      double sum_x, sum_xb;
      if (soft) {
        sum_x = sx.get();
        sum_xb = sxb.get();
      } else {
        sum_x = 1.0;
        sum_xb = static_cast<double>(static_cast<float>(br[c]) - mb);
      }
      double l = -sum_xb + sum_x * log_zb;
      double log_zt = 0;
      if (teacher) {
        log_zt = t.masked ? t.log_z : std::log(zt.get());
        l += -sqb.get() / std::exp(log_zt) + log_zb;
      }
      s[kAuxMaxB] = mb;
      s[kAuxLogZB] = static_cast<float>(log_zb);
      s[kAuxMaxT] = t.ms;
      s[kAuxLogZT] = static_cast<float>(log_zt);
      s[kAuxAStar] = t.nu.a_star;
      s[kAuxIStar] = static_cast<float>(t.nu.i_star);
      s[kAuxSumX] = static_cast<float>(sum_x);
      p.loss[r] = static_cast<float>(l);
    }
  });
}

template <typename T>
void aux_backward_rows(const AuxBackwardParams<T>& p) {
  const int64_t v = p.v;
  const bool soft = p.soft != nullptr, teacher = p.a != nullptr;
  const float inv_t = p.inv_t, dl = p.delta;
  at::parallel_for(0, p.rows, grain(v), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* s = p.stats + r * kAuxStats;
      const T* br = p.b + r * p.sb;
      const T* ar = teacher ? p.a + r * p.sa : nullptr;
      const float* xr = soft ? p.soft + r * p.sx : nullptr;
      const float hard = soft ? -1.f : static_cast<float>(p.hard[r]);
      const TeacherRow t{s[kAuxMaxT], p.top_p < 1.0,
                         Nucleus{s[kAuxAStar], static_cast<int64_t>(s[kAuxIStar]), 0, 0}, s[kAuxLogZT]};
      // dL/db_c = (sum x + sum q) softmax(b)_c - x_c - q_c
      const fVec mb(s[kAuxMaxB] + s[kAuxLogZB]), lzt(s[kAuxLogZT]), gv(p.grad_loss[r]);
      const fVec coef(s[kAuxSumX] + (teacher ? 1.f : 0.f));
      T* o = p.grad + r * v;
      over_row(v, [&](int64_t i, int n) {
        fVec d = coef * vexp(load(br, i, n, -kInf) - mb);
        if (soft) {
          d = d - load(xr, i, n, 0.f);
        } else {
          d = d - (fVec(1.f) & (fVec::arange(static_cast<float>(i), 1.f) == fVec(hard)));
        }
        if (teacher) d = d - vexp(masked_tempered(load(ar, i, n, -kInf), i, inv_t, t, dl) - lzt);
        store(o, i, n, gv * d);
      });
    }
  });
}

// ----------------------------------------------------------------------------- registrations

at::Tensor teacher_logprobs_cpu(const at::Tensor& teacher, double temperature, double top_p, double delta) {
  const TeacherLogprobsCall c = teacher_logprobs_call(teacher, temperature, top_p, delta);
  prefer_huge_pages(c.out);
  dispatch_logits(c.a.scalar_type(), "teacher_logprobs",
                  [&](auto tag) { teacher_logprobs_rows(c.params<decltype(tag)>()); });
  return c.out;
}

std::tuple<at::Tensor, at::Tensor> generator_loss_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                              const at::Tensor& aux, double temperature,
                                                              double top_p, double delta) {
  const GenForwardCall c = generator_forward_call(student, teacher, aux, temperature, top_p, delta);
  dispatch_logits(c.u.scalar_type(), "generator_loss",
                  [&](auto tag) { generator_forward_rows(c.params<decltype(tag)>()); });
  return {c.loss, c.stats};
}

at::Tensor generator_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student,
                                       const at::Tensor& teacher, const at::Tensor& aux, const at::Tensor& stats,
                                       double temperature, double top_p, double delta) {
  const GenBackwardCall c =
      generator_backward_call(grad_loss, student, teacher, aux, stats, temperature, top_p, delta);
  prefer_huge_pages(c.grad);
  dispatch_logits(c.u.scalar_type(), "generator_loss_backward",
                  [&](auto tag) { generator_backward_rows(c.params<decltype(tag)>()); });
  return c.grad;
}

std::tuple<at::Tensor, at::Tensor> aux_loss_forward_cpu(const at::Tensor& aux, const at::Tensor& target,
                                                        const std::optional<at::Tensor>& teacher,
                                                        double temperature, double top_p, double delta) {
  const AuxForwardCall c = aux_forward_call(aux, target, teacher, temperature, top_p, delta);
  dispatch_logits(c.in.b.scalar_type(), "aux_loss", [&](auto tag) { aux_forward_rows(c.params<decltype(tag)>()); });
  return {c.loss, c.stats};
}

at::Tensor aux_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& aux, const at::Tensor& target,
                                 const std::optional<at::Tensor>& teacher, const at::Tensor& stats,
                                 double temperature, double top_p, double delta) {
  const AuxBackwardCall c = aux_backward_call(grad_loss, aux, target, teacher, stats, temperature, top_p, delta);
  prefer_huge_pages(c.grad);
  dispatch_logits(c.in.b.scalar_type(), "aux_loss_backward",
                  [&](auto tag) { aux_backward_rows(c.params<decltype(tag)>()); });
  return c.grad;
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
