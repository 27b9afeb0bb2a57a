// grad_gram on CPU: the Gram trick as chunked ATen GEMMs (the [m T, m T] products of a few
// examples at a time), or materialised gradients (grad_gram_paths.h), whichever costs less.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../grad_gram_paths.h"

namespace dmmd::cpu {
namespace {

constexpr int64_t kTrickBytes = int64_t{128} << 20;  // one [m T, m T] product of the trick

at::Tensor gram_trick(const at::Tensor& a, const at::Tensor& g) {
  const int64_t n = a.size(0), t = a.size(1);
  // Examples per chunk so that one [m T, m T] product stays within kTrickBytes.
  const int64_t m = std::max<int64_t>(1, static_cast<int64_t>(std::sqrt(kTrickBytes / 4.0) / std::max<int64_t>(t, 1)));
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

at::Tensor grad_gram_cpu(const at::Tensor& a_in, const at::Tensor& g_in) {
  const auto [a, g] = grad_gram_args(a_in, g_in);
  if (a.size(0) == 0) return at::zeros({0, 0}, a.options());
  return use_gram_trick(a.size(0), a.size(1), a.size(2), g.size(2)) ? gram_trick(a, g) : materialised(a, g);
}

}  // namespace

TORCH_LIBRARY_IMPL(dmmd, CPU, m) { m.impl("grad_gram", &grad_gram_cpu); }

}  // namespace dmmd::cpu
