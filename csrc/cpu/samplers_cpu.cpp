// CPU kernels of the samplers: sample_categorical, posterior_sample and denoise_step.
//
// A categorical draw from logits: the row maximum, exp(s - max) into a per-thread scratch
// row, the top-p nucleus threshold (row_scan.h) applied in place, float32 sums of blocks of
// 64 weights, and an inverse CDF in float64 with the row's Philox uniform: find the block,
// then walk its weights. Each draw depends only on (seed, offset, row), never on threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

#include "../checks.h"
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
// (the mask of a masked denoiser; -1 for none) never drawn.
template <typename T>
int64_t draw_from_logits(const T* row, int64_t v, float inv_t, double top_p, int64_t exclude, double u,
                         Workspace& ws, const char* op, int64_t r) {
  const float m = row_max(row, v, exclude);
  check_row_max(m, op, "logits", r);
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

void check_alphas(double a_s, double a_t, const char* op, int64_t r) {
  TORCH_CHECK_VALUE(a_t >= 0 && a_t <= a_s && a_s <= 1, op, ": alpha_s and alpha_t must satisfy 0 <= alpha_t <= ",
                    "alpha_s <= 1, got alpha_s=", a_s, ", alpha_t=", a_t, " (row ", r, ")");
}

void check_id(int64_t id, int64_t v, const char* op, const char* name, int64_t r) {
  TORCH_CHECK_VALUE(id >= 0 && id < v, op, ": ", name, " id ", id, " out of range [0, ", v, ") (row ", r, ")");
}

// ----------------------------------------------------------------------------- sample_categorical

at::Tensor sample_categorical_cpu(const at::Tensor& logits, double temperature, double top_p, int64_t seed,
                                  int64_t offset) {
  constexpr const char* op = "sample_categorical";
  check_top_p_args(temperature, top_p, 0.0, op);
  const at::Tensor x = logit_rows(logits, op, "logits");
  const int64_t rows = x.size(0), v = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  const float inv_t = static_cast<float>(1.0 / temperature);
  dispatch_logits(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    int64_t* op_ = out.mutable_data_ptr<int64_t>();
    at::parallel_for(0, rows, grain(v), [&](int64_t begin, int64_t end) {
      Workspace ws(v);
      for (int64_t r = begin; r < end; ++r) {
        const double u = element_uniforms(seed, offset, r).u0;
        op_[r] = draw_from_logits(xp + r * x.stride(0), v, inv_t, top_p, -1, u, ws, op, r);
      }
    });
  });
  return out;
}

// ----------------------------------------------------------------------------- denoise_step

at::Tensor denoise_step_cpu(const at::Tensor& logits, const at::Tensor& z_t, const at::Tensor& alpha_s,
                            const at::Tensor& alpha_t, c10::string_view process, int64_t mask_id,
                            double temperature, double top_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "denoise_step";
  const DenoiseArgs in =
      denoise_step_args(logits, z_t, alpha_s, alpha_t, std::string(process), mask_id, temperature, top_p, op);
  const at::Tensor &x = in.x, &z = in.z, &as = in.as, &at_ = in.at;
  const bool is_masked = in.masked;
  const int64_t rows = x.size(0), v = x.size(1);
  at::Tensor out = at::empty({rows}, z.options());
  const float inv_t = static_cast<float>(1.0 / temperature);
  dispatch_logits(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    const int64_t* zp = z.const_data_ptr<int64_t>();
    const double *asp = as.const_data_ptr<double>(), *atp = at_.const_data_ptr<double>();
    int64_t* op_ = out.mutable_data_ptr<int64_t>();
    at::parallel_for(0, rows, grain(v), [&](int64_t begin, int64_t end) {
      Workspace ws(v);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t zr = zp[r];
        check_id(zr, v, op, "z_t", r);
        check_alphas(asp[r], atp[r], op, r);
        const Uniform2 u = element_uniforms(seed, offset, r);
        const T* row = xp + r * x.stride(0);
        if (is_masked) {
          // The reveal coin first: rows that stay as they are never touch their logits.
          const bool reveal = zr == mask_id && u.u0 < unmask_probability(asp[r], atp[r]);
          op_[r] = reveal ? draw_from_logits(row, v, inv_t, top_p, mask_id, u.u1, ws, op, r) : zr;
        } else {
          const int64_t xr = draw_from_logits(row, v, inv_t, top_p, -1, u.u0, ws, op, r);
          op_[r] = uniform_posterior_hard(zr, xr, asp[r], atp[r], v, u.u1);
        }
      }
    });
  });
  return out;
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

at::Tensor posterior_sample_cpu(const at::Tensor& z_t, const at::Tensor& x, const at::Tensor& alpha_s,
                                const at::Tensor& alpha_t, c10::string_view process, int64_t mask_id,
                                int64_t num_classes, int64_t seed, int64_t offset) {
  constexpr const char* op = "posterior_sample";
  const PosteriorArgs in =
      posterior_sample_args(z_t, x, alpha_s, alpha_t, std::string(process), mask_id, num_classes, op);
  const at::Tensor &z = in.z, &as = in.as, &at_ = in.at, &xs = in.x;
  const bool is_masked = in.masked, soft = in.soft;
  const int64_t rows = z.size(0), v = in.v;
  at::Tensor out = at::empty({rows}, z.options());
  const int64_t* zp = z.const_data_ptr<int64_t>();
  const double *asp = as.const_data_ptr<double>(), *atp = at_.const_data_ptr<double>();
  int64_t* op_ = out.mutable_data_ptr<int64_t>();
  const int64_t id_bound = v > 0 ? v : std::numeric_limits<int64_t>::max();
  at::parallel_for(0, rows, soft ? grain(v) : 4096, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t zr = zp[r];
      const double a_s = asp[r], a_t = atp[r];
      check_id(zr, id_bound, op, "z_t", r);
      check_alphas(a_s, a_t, op, r);
      const Uniform2 u = element_uniforms(seed, offset, r);
      const float* xr = soft ? xs.const_data_ptr<float>() + r * xs.stride(0) : nullptr;
      if (is_masked) {
        if (zr != mask_id || !(u.u0 < unmask_probability(a_s, a_t))) {
          op_[r] = zr;
        } else if (!soft) {
          const int64_t xh = xs.const_data_ptr<int64_t>()[r];
          check_id(xh, id_bound, op, "x", r);
          TORCH_CHECK_VALUE(xh != mask_id, op, ": x must not contain mask_id (row ", r, ")");
          op_[r] = xh;
        } else {
          const int64_t c = walk_weights(v, u.u1, [&](int64_t c) {
            return c == mask_id ? 0.0 : static_cast<double>(xr[c]);
          });
          TORCH_CHECK_VALUE(c >= 0, op, ": soft x has no mass outside mask_id (row ", r, ")");
          op_[r] = c;
        }
      } else if (!soft) {
        const int64_t xh = xs.const_data_ptr<int64_t>()[r];
        check_id(xh, id_bound, op, "x", r);
        op_[r] = uniform_posterior_hard(zr, xh, a_s, a_t, v, u.u0);
      } else {
        // eq. 4 over all classes: (a_ts [c = z] + beta) (alpha_s x_c + gamma)
        const double a_ts = alpha_ts(a_s, a_t), beta = (1 - a_ts) / v, gamma = (1 - a_s) / v;
        const int64_t c = walk_weights(v, u.u0, [&](int64_t c) {
          return ((c == zr ? a_ts : 0.0) + beta) * (a_s * static_cast<double>(xr[c]) + gamma);
        });
        op_[r] = c >= 0 ? c : zr;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmmd, CPU, m) {
  m.impl("sample_categorical", &sample_categorical_cpu);
  m.impl("denoise_step", &denoise_step_cpu);
  m.impl("posterior_sample", &posterior_sample_cpu);
}

}  // namespace dmmd::cpu
