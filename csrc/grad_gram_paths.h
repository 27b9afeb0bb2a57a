// grad_gram's shared host side (ATen only, so CPU and CUDA use it alike): the argument
// checks, the cost model that picks the Gram trick or materialised per-example gradients,
// and the materialised path, whose GEMMs go through ATen (MKL/oneDNN on CPU, cuBLAS on CUDA).
//
// The Gram trick K_ij = sum_{t,t'} (a_i a_j^T)_{tt'} (g_i g_j^T)_{tt'} never forms a gradient
// (its intermediates are T x T, so it is the only way when d_in d_out is huge); materialising
// the per-example gradients G_i = g_i^T a_i forms d_in x d_out per example. We pick the one
// with fewer multiply-adds, counting the gradients a chunked materialisation recomputes: with
// short sequences and big layers that is usually the trick (2 T^2 << d_in d_out), but not
// always (n = 64, T = 64, 768 x 3072: the trick costs 1.7x more). Math in float32.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "checks.h"

namespace dmmd {

constexpr int64_t kGradBytes = int64_t{1} << 30;      // one chunk of materialised gradients

// Examples per chunk of materialised gradients of d = d_in d_out floats each.
inline int64_t grad_chunk(int64_t d) { return std::max<int64_t>(1, kGradBytes / 4 / std::max<int64_t>(d, 1)); }

// Multiply-adds of each way (the elementwise products and sums of the trick included).
inline bool use_gram_trick(int64_t n, int64_t t, int64_t d_in, int64_t d_out) {
  const double nn = static_cast<double>(n), tt = static_cast<double>(t);
  const double d = static_cast<double>(d_in) * static_cast<double>(d_out);
  const double trick = nn * nn * tt * tt * (static_cast<double>(d_in + d_out) + 2);
  const double chunks = std::ceil(nn / static_cast<double>(grad_chunk(d_in * d_out)));
  const double materialise = (chunks + 1) / 2 * nn * tt * d + nn * nn * d;
  return trick < materialise;
}

// K is symmetric by definition; a diagonal block summed in two orders is made exactly so.
inline at::Tensor symmetric(const at::Tensor& blk) { return blk.add(blk.t()).mul_(0.5); }

inline at::Tensor materialised(const at::Tensor& a, const at::Tensor& g) {
  const int64_t n = a.size(0), d = a.size(2) * g.size(2);
  const int64_t m = grad_chunk(d);
  auto grads = [&](int64_t i0, int64_t mi) {  // [mi, d_out * d_in]
    return at::bmm(g.narrow(0, i0, mi).transpose(1, 2), a.narrow(0, i0, mi)).reshape({mi, d});
  };
  at::Tensor k = at::empty({n, n}, a.options());
  for (int64_t i0 = 0; i0 < n; i0 += m) {
    const int64_t mi = std::min(m, n - i0);
    const at::Tensor gi = grads(i0, mi);
    for (int64_t j0 = i0; j0 < n; j0 += m) {
      const int64_t mj = std::min(m, n - j0);
      const at::Tensor blk = j0 == i0 ? symmetric(at::mm(gi, gi.t())) : at::mm(gi, grads(j0, mj).t());
      k.narrow(0, i0, mi).narrow(1, j0, mj).copy_(blk);
      if (j0 != i0) k.narrow(0, j0, mj).narrow(1, i0, mi).copy_(blk.t());
    }
  }
  return k;
}

// The checked float32 contiguous inputs of grad_gram.
inline std::pair<at::Tensor, at::Tensor> grad_gram_args(const at::Tensor& a_in, const at::Tensor& g_in) {
  constexpr const char* op = "grad_gram";
  TORCH_CHECK_VALUE(a_in.dim() == 3, op, ": a must be [n, T, d_in], got ", a_in.sizes());
  TORCH_CHECK_VALUE(g_in.dim() == 3, op, ": g must be [n, T, d_out], got ", g_in.sizes());
  TORCH_CHECK_VALUE(a_in.size(0) == g_in.size(0) && a_in.size(1) == g_in.size(1), op, ": a ", a_in.sizes(),
                    " and g ", g_in.sizes(), " must agree on [n, T]");
  TORCH_CHECK_VALUE(a_in.is_floating_point() && g_in.is_floating_point(), op, ": a and g must be float tensors");
  TORCH_CHECK_VALUE(a_in.device() == g_in.device(), op, ": a and g must be on one device");
  return {a_in.to(at::kFloat).contiguous(), g_in.to(at::kFloat).contiguous()};
}

}  // namespace dmmd
