// grad_gram: the Gram matrix K_ij = <g_i^T a_i, g_j^T a_j>_F of per-example weight gradients
// of a linear layer, with every GEMM through ATen (MKL/oneDNN on CPU).
//
// Two ways, picked by cost: with T tokens per example, the Gram trick
//   K_ij = sum_{t,t'} (a_i a_j^T)_{tt'} (g_i g_j^T)_{tt'}
// costs T^2 (d_in + d_out) per pair and never forms a gradient; materialising the per-example
// gradients G_i = g_i^T a_i costs d_in d_out per pair. We use the trick when
// 2 T^2 < d_in d_out, and otherwise materialise the gradients a chunk of examples at a time.
// Memory stays bounded by chunking in both cases. Math in float32 (inputs upcast).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"

namespace dmmd::cpu {
namespace {

constexpr int64_t kChunkBytes = int64_t{128} << 20;  // per intermediate block

// K is symmetric by definition; a diagonal block summed in two orders is made exactly so.
at::Tensor symmetric(const at::Tensor& blk) { return blk.add(blk.t()).mul_(0.5); }

at::Tensor gram_trick(const at::Tensor& a, const at::Tensor& g) {
  const int64_t n = a.size(0), t = a.size(1);
  // Examples per chunk so that one [m T, m T] product stays within kChunkBytes.
  const int64_t m = std::max<int64_t>(1, static_cast<int64_t>(std::sqrt(kChunkBytes / 4.0) / std::max<int64_t>(t, 1)));
  at::Tensor k = at::empty({n, n}, a.options());
  const at::Tensor af = a.reshape({n * t, a.size(2)}), gf = g.reshape({n * t, g.size(2)});
  for (int64_t i0 = 0; i0 < n; i0 += m) {
    const int64_t mi = std::min(m, n - i0);
    const at::Tensor ai = af.narrow(0, i0 * t, mi * t), gi = gf.narrow(0, i0 * t, mi * t);
    for (int64_t j0 = i0; j0 < n; j0 += m) {
      const int64_t mj = std::min(m, n - j0);
      const at::Tensor aa = at::mm(ai, af.narrow(0, j0 * t, mj * t).t());
      const at::Tensor gg = at::mm(gi, gf.narrow(0, j0 * t, mj * t).t());
      at::Tensor blk = aa.mul_(gg).view({mi, t, mj, t}).sum({1, 3});
      if (j0 == i0) blk = symmetric(blk);
      k.narrow(0, i0, mi).narrow(1, j0, mj).copy_(blk);
      if (j0 != i0) k.narrow(0, j0, mj).narrow(1, i0, mi).copy_(blk.t());
    }
  }
  return k;
}

at::Tensor materialised(const at::Tensor& a, const at::Tensor& g) {
  const int64_t n = a.size(0), d = a.size(2) * g.size(2);
  const int64_t m = std::max<int64_t>(1, kChunkBytes / 4 / std::max<int64_t>(d, 1));
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

at::Tensor grad_gram_cpu(const at::Tensor& a_in, const at::Tensor& g_in) {
  constexpr const char* op = "grad_gram";
  TORCH_CHECK_VALUE(a_in.dim() == 3, op, ": a must be [n, T, d_in], got ", a_in.sizes());
  TORCH_CHECK_VALUE(g_in.dim() == 3, op, ": g must be [n, T, d_out], got ", g_in.sizes());
  TORCH_CHECK_VALUE(a_in.size(0) == g_in.size(0) && a_in.size(1) == g_in.size(1), op, ": a ", a_in.sizes(),
                    " and g ", g_in.sizes(), " must agree on [n, T]");
  TORCH_CHECK_VALUE(a_in.is_floating_point() && g_in.is_floating_point(), op, ": a and g must be float tensors");
  const at::Tensor a = a_in.to(at::kFloat).contiguous(), g = g_in.to(at::kFloat).contiguous();
  const int64_t t = a.size(1);
  if (a.size(0) == 0) return at::zeros({0, 0}, a.options());
  return 2 * t * t < a.size(2) * g.size(2) ? gram_trick(a, g) : materialised(a, g);
}

}  // namespace

TORCH_LIBRARY_IMPL(dmmd, CPU, m) { m.impl("grad_gram", &grad_gram_cpu); }

}  // namespace dmmd::cpu
