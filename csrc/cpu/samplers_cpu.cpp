// CPU kernels of the samplers: sample_categorical, posterior_sample and denoise_step.
//
// A categorical draw from logits: the row maximum, exp(s - max) into a per-thread scratch
// row, the top-p nucleus threshold (row_scan.h) applied in place, float32 sums of blocks of
// 64 weights, and an inverse CDF in float64 with the row's Philox uniform: find the block,
// then walk its weights. Each draw depends only on (seed, offset, row), never on threads.
// A row the kernels cannot use (bad logits, an id out of range, alphas out of order) gets -1,
// as on CUDA; dmmd_ops raises naming the argument and row.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <string>

#include "../prologue.h"
#include "dmmd/philox.h"
#include "dmmd/rowmath.h"
#include "row_scan.h"

namespace dmmd::cpu {
namespace {

// The first index whose float64 cumulative weight exceeds u * total, over weights w[0..n).
// `blocks` holds the sums of consecutive kBlock-element blocks. Zero weights are never drawn.
inline int64_t inverse_cdf(const float* w, int64_t n, const double* blocks, double u) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  double total = 0;
  for (int64_t k = 0; k < nb; ++k) total += blocks[k];
  const double target = u * total;
  double cum = 0;
  int64_t last = -1;  // last class with weight, in case rounding walks past the end
  for (int64_t k = 0; k < nb; ++k) {
    if (blocks[k] <= 0) continue;
    const int64_t lo = k * kBlock, hi = std::min(n, lo + kBlock);
    if (cum + blocks[k] > target) {
      double c = cum;
      for (int64_t i = lo; i < hi; ++i) {
        if (w[i] > 0) {
          c += w[i];
          last = i;
          if (c > target) return i;
        }
      }
      // The float32 block sum exceeded the float64 walk by rounding: the block's last class.
      return last;
    }
    cum += blocks[k];
    for (int64_t i = hi - 1; i >= lo; --i)
      if (w[i] > 0) {
        last = i;
        break;
      }
  }
  return last;
}

// One draw from softmax(row / temperature) restricted to the nucleus, class `exclude`
// (the mask of a masked denoiser; -1 for none) never drawn; -1 for a row with bad logits.
template <typename T>
int64_t draw_from_logits(const T* row, int64_t v, float inv_t, double top_p, int64_t exclude, double u,
                         Workspace& ws) {
  const float m = row_max(row, v, exclude);
  if (bad_row_max(m)) return -1;
  const float ms = m * inv_t;
  const bool masked = top_p < 1.0;
  teacher_exp(row, v, inv_t, ms, exclude, masked, ws);
  float* e = ws.e.data();
  Nucleus nu{-kInf, v - 1, 0, 0};
  if (masked) nu = find_nucleus(row, v, inv_t, ms, top_p, ws);
  // Weights outside the nucleus to zero, and the block sums.
  double* blocks = ws.blocks.data();
  for (int64_t lo = 0; lo < v; lo += kBlock) {
    const int64_t hi = std::min(v, lo + kBlock);
    fVec acc(0.f);
    for (int64_t i = lo; i < hi; i += kW) {
      const int n = static_cast<int>(std::min<int64_t>(kW, hi - i));
      fVec w = fVec::loadu(e + i, n);
      if (masked) {
        w = w & keep_mask(load(row, i, n, -kInf), i, nu.a_star, static_cast<float>(nu.i_star));
        w.store(e + i, n);
      }
      acc = acc + w;
    }
    blocks[lo / kBlock] = hsum(acc);
  }
  return inverse_cdf(e, v, blocks, u);
}

inline bool alphas_ok(double a_s, double a_t) { return a_t >= 0 && a_t <= a_s && a_s <= 1; }

// ----------------------------------------------------------------------------- sample_categorical

template <typename T>
void sample_rows(const SampleParams<T>& p) {
  at::parallel_for(0, p.rows, grain(p.v), [&](int64_t begin, int64_t end) {
    Workspace ws(p.v);
    for (int64_t r = begin; r < end; ++r) {
      const double u = element_uniforms(p.seed, p.offset, r).u0;
      p.out[r] = draw_from_logits(p.x + r * p.sx, p.v, p.inv_t, p.top_p, -1, u, ws);
    }
  });
}

// ----------------------------------------------------------------------------- denoise_step

template <typename T>
void denoise_rows(const DenoiseParams<T>& p) {
  const int64_t v = p.v;
  at::parallel_for(0, p.rows, grain(v), [&](int64_t begin, int64_t end) {
    Workspace ws(v);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t zr = p.z[r];
      const double a_s = p.alpha_s[r], a_t = p.alpha_t[r];
      const Uniform2 u = element_uniforms(p.seed, p.offset, r);
      const T* row = p.x + r * p.sx;
      if (zr < 0 || zr >= v || !alphas_ok(a_s, a_t)) {
        p.out[r] = -1;
      } else if (p.masked) {
        // The reveal coin first: rows that stay as they are never touch their logits.
        const bool reveal = zr == p.mask_id && u.u0 < unmask_probability(a_s, a_t);
        p.out[r] = reveal ? draw_from_logits(row, v, p.inv_t, p.top_p, p.mask_id, u.u1, ws) : zr;
      } else {
        const int64_t xr = draw_from_logits(row, v, p.inv_t, p.top_p, -1, u.u0, ws);
        p.out[r] = xr < 0 ? -1 : uniform_posterior_hard(zr, xr, a_s, a_t, v, u.u1);
      }
    }
  });
}

// ----------------------------------------------------------------------------- posterior_sample

// Inverse CDF over class weights given by w(c), summed in float64 in class order.
template <typename W>
int64_t walk_weights(int64_t v, double u, W&& w) {
  double total = 0;
  for (int64_t c = 0; c < v; ++c) total += w(c);
  if (!(total > 0)) return -1;
  const double target = u * total;
  double cum = 0;
  int64_t last = -1;
  for (int64_t c = 0; c < v; ++c) {
    const double wc = w(c);
    if (wc > 0) {
      cum += wc;
      last = c;
      if (cum > target) return c;
    }
  }
  return last;
}

void posterior_rows(const PosteriorParams& p) {
  const bool soft = p.soft != nullptr;
  const int64_t v = p.v;
  const int64_t id_bound = v > 0 ? v : std::numeric_limits<int64_t>::max();
  at::parallel_for(0, p.rows, soft ? grain(v) : 4096, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t zr = p.z[r];
      const double a_s = p.alpha_s[r], a_t = p.alpha_t[r];
      const Uniform2 u = element_uniforms(p.seed, p.offset, r);
      const float* xr = soft ? p.soft + r * p.sx : nullptr;
      const int64_t xh = soft ? 0 : p.hard[r];
      const bool ids_ok = zr >= 0 && zr < id_bound && xh >= 0 && xh < id_bound && !(p.masked && !soft && xh == p.mask_id);
      if (!ids_ok || !alphas_ok(a_s, a_t)) {
        p.out[r] = -1;
      } else if (p.masked) {
        if (zr != p.mask_id || !(u.u0 < unmask_probability(a_s, a_t))) {
          p.out[r] = zr;
        } else if (!soft) {
          p.out[r] = xh;
        } else {  // -1 when soft x has no mass outside mask_id
          p.out[r] = walk_weights(v, u.u1, [&](int64_t c) { return c == p.mask_id ? 0.0 : static_cast<double>(xr[c]); });
        }
      } else if (!soft) {
        p.out[r] = uniform_posterior_hard(zr, xh, a_s, a_t, v, u.u0);
      } else {
        // eq. 4 over all classes: (a_ts [c = z] + beta) (alpha_s x_c + gamma)
        const double a_ts = alpha_ts(a_s, a_t), beta = (1 - a_ts) / v, gamma = (1 - a_s) / v;
        const int64_t c = walk_weights(v, u.u0, [&](int64_t c) {
          return ((c == zr ? a_ts : 0.0) + beta) * (a_s * static_cast<double>(xr[c]) + gamma);
        });
        p.out[r] = c >= 0 ? c : zr;
      }
    }
  });
}

// ----------------------------------------------------------------------------- registrations

at::Tensor sample_categorical_cpu(const at::Tensor& logits, double temperature, double top_p, int64_t seed,
                                  int64_t offset) {
  const SampleCall c = sample_categorical_call(logits, temperature, top_p, seed, offset);
  dispatch_logits(c.x.scalar_type(), "sample_categorical", [&](auto tag) { sample_rows(c.params<decltype(tag)>()); });
  return c.out;
}

at::Tensor denoise_step_cpu(const at::Tensor& logits, const at::Tensor& z_t, const at::Tensor& alpha_s,
                            const at::Tensor& alpha_t, c10::string_view process, int64_t mask_id,
                            double temperature, double top_p, int64_t seed, int64_t offset) {
  const DenoiseCall c =
      denoise_step_call(logits, z_t, alpha_s, alpha_t, std::string(process), mask_id, temperature, top_p, seed, offset);
  dispatch_logits(c.x.scalar_type(), "denoise_step", [&](auto tag) { denoise_rows(c.params<decltype(tag)>()); });
  return c.out;
}

at::Tensor posterior_sample_cpu(const at::Tensor& z_t, const at::Tensor& x, const at::Tensor& alpha_s,
                                const at::Tensor& alpha_t, c10::string_view process, int64_t mask_id,
                                int64_t num_classes, int64_t seed, int64_t offset) {
  const PosteriorCall c =
      posterior_sample_call(z_t, x, alpha_s, alpha_t, std::string(process), mask_id, num_classes, seed, offset);
  posterior_rows(c.params());
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmmd, CPU, m) {
  m.impl("sample_categorical", &sample_categorical_cpu);
  m.impl("denoise_step", &denoise_step_cpu);
  m.impl("posterior_sample", &posterior_sample_cpu);
}

}  // namespace dmmd::cpu
