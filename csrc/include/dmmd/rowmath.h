// Per-row scalar math shared by the CPU and CUDA kernels (torch-free, host + device).
// The streaming loops live with each backend; what a row's answer *means* lives here.
#pragma once
#include <cmath>
#include <cstdint>

#include "dmmd/common.h"

namespace dmmd {

// Layout of the per-row statistics the loss forwards save for their backwards (float32).
// generator_loss: u = student, t = teacher (after temperature and the soft top-p mask), b = aux.
enum GenStat : int { kGenMaxU, kGenLogZU, kGenMaxT, kGenLogZT, kGenMaxB, kGenLogZB, kGenAStar, kGenIStar,
                     kGenLoss, kGenStats };
// aux_loss: b = aux, t = teacher; kAuxSumX is sum_c x_c of the target (1 for a hard one).
enum AuxStat : int { kAuxMaxB, kAuxLogZB, kAuxMaxT, kAuxLogZT, kAuxAStar, kAuxIStar, kAuxSumX, kAuxStats };

// log of the teacher's normaliser after the soft top-p mask, relative to max(s):
// Z' = kept + e^{-delta} (total - kept), from the masses (relative to max(s)) of the kept
// classes and of all classes.
DMMD_HD double masked_log_normaliser(double kept, double total, double delta) {
  const double dropped = total - kept > 0 ? total - kept : 0.0;
  return ::log(kept + ::exp(-delta) * dropped);
}

// alpha_{t|s} = alpha_t / alpha_s, taken as 1 when alpha_s = 0 (then alpha_t = 0 too).
DMMD_HD double alpha_ts(double alpha_s, double alpha_t) { return alpha_s > 0 ? alpha_t / alpha_s : 1.0; }

// Masked diffusion: the probability that a masked z_t is revealed at s.
DMMD_HD double unmask_probability(double alpha_s, double alpha_t) {
  return alpha_t < 1 ? (alpha_s - alpha_t) / (1 - alpha_t) : 0.0;
}

// Uniform diffusion with a hard x: eq. 4 has three distinct masses (z_t, x, any other class),
// so a draw is O(1): u picks the group in the order (z_t, x, others) and, rescaled, the index
// among the others (skipping z_t and x). A posterior without mass keeps z_t.
DMMD_HD int64_t uniform_posterior_hard(int64_t z, int64_t x, double alpha_s, double alpha_t, int64_t v,
                                       double u) {
  const double a_ts = alpha_ts(alpha_s, alpha_t);
  const double beta = (1 - a_ts) / static_cast<double>(v);
  const double gamma = (1 - alpha_s) / static_cast<double>(v);
  const bool same = z == x;
  const double m_z = same ? (a_ts + beta) * (alpha_s + gamma) : (a_ts + beta) * gamma;
  const double m_x = same ? 0.0 : beta * (alpha_s + gamma);
  const int64_t n_other = same ? v - 1 : v - 2;
  const double bg = beta * gamma;
  const double total = m_z + m_x + bg * static_cast<double>(n_other);
  if (!(total > 0)) return z;
  const double t = u * total;
  if (t < m_z) return z;
  if (t < m_z + m_x) return x;
  int64_t r = static_cast<int64_t>((t - m_z - m_x) / (bg > 0 ? bg : 1.0));
  if (r < 0) r = 0;
  if (r > n_other - 1) r = n_other > 0 ? n_other - 1 : 0;
  const int64_t lo = z < x ? z : x, hi = z < x ? x : z;
  int64_t c = r >= lo ? r + 1 : r;
  if (!same && c >= hi) c += 1;
  return c;
}

}  // namespace dmmd
