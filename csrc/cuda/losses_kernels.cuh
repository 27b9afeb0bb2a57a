// The loss kernels (device code only; the launches are in losses_cuda.cu). One thread block per
// row (row_block.cuh). Without a nucleus (top_p = 1) a forward reads each input row once:
// per-thread online softmax (running max and rescaled sums) for every normaliser and for the
// loss's weighted sum, combined over the block in a fixed order. With top_p < 1 the teacher
// row is first scanned for its maximum and nucleus (radix selection). Each backward is one pass
// over the inputs from the forward's per-row statistics (the layout of dmmd/rowmath.h, shared
// with the CPU kernels). With a nucleus the teacher row is staged in shared memory when it fits
// (row_block.cuh, stage_row): read from global memory once for the scan's passes and the rest.
// The forwards are built twice: unstaged (no nucleus, or a row too big: ptxas's own register
// choice, as before staging; a minimum of 0 blocks emits no bound) and staged (at least two
// blocks per SM, all a 100 KB staged row allows: the registers staging needs without spills).
//
// Kernels cannot raise: a row with a NaN, a +inf or only -inf logits (or a soft target that
// is not a finite non-negative vector) gets a NaN loss (NaN log-probs) and -1 in its i_star
// statistic; the Python wrapper sees it and raises, naming the argument.
#pragma once
#include "dmmd/rowmath.h"
#include "row_block.cuh"

namespace dmmd::cuda {

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fc00000); }

// A teacher row after its scan: maximum of s = a / temperature and, with top_p < 1, the nucleus
// and the log normaliser of the masked tempered logits (relative to ms).
struct TeacherScan {
  float ms;
  NucleusRow nu;
  double log_z;
  bool bad;
};

template <typename T, int N>
__device__ TeacherScan scan_teacher(const T* a, const RowPlan& p, float inv_t, double top_p, float delta,
                                    Scratch& s) {
  TeacherScan t{0.f, NucleusRow{neg_inf(), p.v - 1, 0, 0}, 0, false};
  const float ma = row_max<T, N>(a, p, -1, s, &t.bad);
  if (t.bad) return t;
  t.ms = __fmul_rn(ma, inv_t);
  t.nu = block_nucleus<T, N>(a, p, inv_t, t.ms, -1, top_p, s);
  t.log_z = masked_log_normaliser(t.nu.kept, t.nu.total, static_cast<double>(delta));
  return t;
}

// s = a / temperature with the soft top-p mask (before the normaliser), not relative to ms.
__device__ __forceinline__ float masked_s(float a, int64_t i, float inv_t, bool masked, const NucleusRow& nu,
                                          float delta) {
  const float x = __fmul_rn(a, inv_t);
  return masked && !nucleus_keeps(a, i, nu.a_star, nu.i_star) ? __fsub_rn(x, delta) : x;
}

// --------------------------------------------------------------------------- teacher_logprobs

template <typename T, bool kStaged>
__global__ void __launch_bounds__(kThreads, kStaged ? 2 : 0)
    teacher_logprobs_kernel(const T* __restrict__ a, int64_t sa, float* __restrict__ out, int64_t rows, int64_t v,
                            float inv_t, double top_p, float delta) {
  constexpr int N = vec_width<T>();
  __shared__ Scratch s;
  const bool masked = top_p < 1.0;
  unsigned char* const stage = kStaged && masked ? DMMD_ROW_STAGE() : nullptr;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = a + r * sa;
    float* o = out + r * v;
    const void* streams[1] = {row};
    const int bytes[1] = {static_cast<int>(sizeof(T))};
    const RowPlan p = make_plan<N>(v, streams, bytes, 1);
    float ms, lz;
    NucleusRow nu{neg_inf(), v - 1, 0, 0};
    bool bad;
    if (stage != nullptr) row = stage_row<T, N>(row, p, stage);  // the scan's passes and the output's
    if (masked) {
      const TeacherScan t = scan_teacher<T, N>(row, p, inv_t, top_p, delta, s);
      bad = t.bad;
      ms = t.ms;
      nu = t.nu;
      lz = static_cast<float>(t.log_z);
    } else {
      Online on;
      int nan = 0;
      for_each_tile<N>(p, [&](int64_t i, int n) {
        float x[N], e[N];
        load_f<T, N>(row, i, n, neg_inf(), x);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          nan |= x[k] != x[k];
          x[k] = __fmul_rn(x[k], inv_t);
        }
        on.add<N>(x, e);
      });
      nan = __syncthreads_or(nan);
      const RowLse l = block_lse(on, 0.0, s);
      bad = nan || bad_max(l.m);
      ms = l.m;
      lz = static_cast<float>(l.log_z);
    }
    for_each_tile<N>(p, [&](int64_t i, int n) {
      float x[N];
      load_f<T, N>(row, i, n, neg_inf(), x);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        x[k] = bad ? nan_f() : masked_s(x[k], i + k, inv_t, masked, nu, delta) - ms - lz;
      }
      store_any<float, N>(o, i, n, x);
    });
  }
}

// ----------------------------------------------------------------------------- generator_loss

// Per row: L = -sum_c p_c (log q_c - log softmax(b)_c), p = softmax(u). With W = sum_c e^{u_c -
// m_u} (s'_c - b_c) (s' the masked tempered teacher logit, raw) and Z_u = sum_c e^{u_c - m_u}:
// L = -W / Z_u + (m_s - m_b) + (log Z_t - log Z_b). Terms with p_c = 0 add exactly nothing.
template <typename T, bool kStaged>
__global__ void __launch_bounds__(kThreads, kStaged ? 2 : 0)
    generator_forward_kernel(const T* __restrict__ u, int64_t su, const T* __restrict__ a, int64_t sa,
                             const T* __restrict__ b, int64_t sb, float* __restrict__ loss,
                             float* __restrict__ stats, int64_t rows, int64_t v, float inv_t, double top_p,
                             float delta) {
  constexpr int N = vec_width<T>();
  __shared__ Scratch s;
  const bool masked = top_p < 1.0;
  unsigned char* const stage = kStaged && masked ? DMMD_ROW_STAGE() : nullptr;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T *ur = u + r * su, *ar = a + r * sa, *br = b + r * sb;
    const void* streams[3] = {ur, ar, br};
    const int bytes[3] = {static_cast<int>(sizeof(T)), static_cast<int>(sizeof(T)), static_cast<int>(sizeof(T))};
    const RowPlan p = make_plan<N>(v, streams, bytes, 3);
    TeacherScan t{0.f, NucleusRow{neg_inf(), v - 1, 0, 0}, 0, false};
    if (stage != nullptr) ar = stage_row<T, N>(ar, p, stage);  // the teacher row: the scan's passes and the loss's
    if (masked) t = scan_teacher<T, N>(ar, p, inv_t, top_p, delta, s);
    Online ou, ob, ot;
    double w = 0;
    int nan = 0;
    if (!t.bad) {
      for_each_tile<N>(p, [&](int64_t i, int n) {
        float xu[N], xa[N], xb[N], eu[N], eb[N], et[N];
        load_f<T, N>(ur, i, n, neg_inf(), xu);
        load_f<T, N>(ar, i, n, neg_inf(), xa);
        load_f<T, N>(br, i, n, neg_inf(), xb);
        float sa_[N];
#pragma unroll
        for (int k = 0; k < N; ++k) {
          nan |= (xu[k] != xu[k]) | (xa[k] != xa[k]) | (xb[k] != xb[k]);
          sa_[k] = masked_s(xa[k], i + k, inv_t, masked, t.nu, delta);
        }
        w *= ou.add<N>(xu, eu);
        ob.add<N>(xb, eb);
        if (!masked) ot.add<N>(sa_, et);
        // float64 differences: exact for float inputs, so that L cancels cleanly (V = 1: L = 0).
        double part = 0;
#pragma unroll
        for (int k = 0; k < N; ++k) {
          part += eu[k] > 0.f ? static_cast<double>(eu[k]) * (static_cast<double>(sa_[k]) - xb[k]) : 0.0;
        }
        w += part;
      });
    }
    nan = __syncthreads_or(nan);
    const RowLse lu = block_lse(ou, w, s);
    const RowLse lb = block_lse(ob, 0.0, s);
    float ms = t.ms;
    double log_zt = t.log_z;
    if (!masked) {
      const RowLse lt = block_lse(ot, 0.0, s);
      ms = lt.m;
      log_zt = lt.log_z;
    }
    if (threadIdx.x == 0) {
      const bool bad = t.bad || nan || bad_max(lu.m) || bad_max(lb.m) || bad_max(ms);
      const double l = -lu.companion / lu.z + (static_cast<double>(ms) - lb.m) + (log_zt - lb.log_z);
      float* st = stats + r * kGenStats;
      DMMD_STORE(st + kGenMaxU, lu.m);
      DMMD_STORE(st + kGenLogZU, static_cast<float>(lu.log_z));
      DMMD_STORE(st + kGenMaxT, ms);
      DMMD_STORE(st + kGenLogZT, static_cast<float>(log_zt));
      DMMD_STORE(st + kGenMaxB, lb.m);
      DMMD_STORE(st + kGenLogZB, static_cast<float>(lb.log_z));
      DMMD_STORE(st + kGenAStar, t.nu.a_star);
      DMMD_STORE(st + kGenIStar, bad ? -1.f : static_cast<float>(t.nu.i_star));
      DMMD_STORE(st + kGenLoss, bad ? nan_f() : static_cast<float>(l));
      DMMD_STORE(loss + r, bad ? nan_f() : static_cast<float>(l));
    }
  }
}

// dL/du_c = -g p_c (D_c + L), D_c = log q_c - log softmax(b)_c; zero where p_c = 0.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    generator_backward_kernel(const float* __restrict__ grad_loss, const T* __restrict__ u, int64_t su,
                              const T* __restrict__ a, int64_t sa, const T* __restrict__ b, int64_t sb,
                              const float* __restrict__ stats, T* __restrict__ grad, int64_t rows, int64_t v,
                              float inv_t, double top_p, float delta) {
  constexpr int N = vec_width<T>();
  const bool masked = top_p < 1.0;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T *ur = u + r * su, *ar = a + r * sa, *br = b + r * sb;
    T* o = grad + r * v;
    const float* st = stats + r * kGenStats;
    const float mu = st[kGenMaxU] + st[kGenLogZU], mb = st[kGenMaxB] + st[kGenLogZB];
    const float ms = st[kGenMaxT], lzt = st[kGenLogZT], l = st[kGenLoss], ng = -grad_loss[r];
    const NucleusRow nu{st[kGenAStar], static_cast<int64_t>(st[kGenIStar]), 0, 0};
    const void* streams[3] = {ur, ar, br};
    const int bytes[3] = {static_cast<int>(sizeof(T)), static_cast<int>(sizeof(T)), static_cast<int>(sizeof(T))};
    const RowPlan p = make_plan<N>(v, streams, bytes, 3);
    for_each_tile<N>(p, [&](int64_t i, int n) {
      float xu[N], xa[N], xb[N], g[N];
      load_f<T, N>(ur, i, n, neg_inf(), xu);
      load_f<T, N>(ar, i, n, neg_inf(), xa);
      load_f<T, N>(br, i, n, neg_inf(), xb);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float pk = expf(xu[k] - mu);
        const float d = ((masked_s(xa[k], i + k, inv_t, masked, nu, delta) - ms) - lzt) - (xb[k] - mb);
        g[k] = pk > 0.f ? ng * pk * (d + l) : 0.f;
      }
      store_any<T, N>(o, i, n, g);
    });
  }
}

// ----------------------------------------------------------------------------- aux_loss

// Per row: L = -sum_c x_c b_c + sum_x (m_b + log Z_b) [- sum_c q_c b_c + (m_b + log Z_b) with a
// teacher], b raw; zero weights (x_c = 0, q_c = 0) add exactly nothing.
template <typename T, bool kStaged>
__global__ void __launch_bounds__(kThreads, kStaged ? 2 : 0)
    aux_forward_kernel(const T* __restrict__ b, int64_t sb, const T* __restrict__ a, int64_t sa,
                       const float* __restrict__ soft, int64_t sx, const int64_t* __restrict__ hard,
                       float* __restrict__ loss, float* __restrict__ stats, int64_t rows, int64_t v, float inv_t,
                       double top_p, float delta) {
  constexpr int N = vec_width<T>();
  __shared__ Scratch s;
  const bool teacher = a != nullptr, masked = teacher && top_p < 1.0;
  unsigned char* const stage = kStaged && masked ? DMMD_ROW_STAGE() : nullptr;
  const float drop = expf(-delta);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* br = b + r * sb;
    const T* ar = teacher ? a + r * sa : nullptr;
    const float* xr = soft != nullptr ? soft + r * sx : nullptr;
    const void* streams[3] = {br, ar != nullptr ? static_cast<const void*>(ar) : br,
                              xr != nullptr ? static_cast<const void*>(xr) : br};
    const int bytes[3] = {static_cast<int>(sizeof(T)), static_cast<int>(sizeof(T)),
                          xr != nullptr ? 4 : static_cast<int>(sizeof(T))};
    const RowPlan p = make_plan<N>(v, streams, bytes, 3);
    TeacherScan t{0.f, NucleusRow{neg_inf(), v - 1, 0, 0}, 0, false};
    if (stage != nullptr) ar = stage_row<T, N>(ar, p, stage);
    if (masked) t = scan_teacher<T, N>(ar, p, inv_t, top_p, delta, s);
    Online ob, ot;
    double sum_x = 0, sum_xb = 0, sum_qb = 0;
    int bad_in = 0;
    if (!t.bad) {
      for_each_tile<N>(p, [&](int64_t i, int n) {
        float xb[N], eb[N];
        load_f<T, N>(br, i, n, neg_inf(), xb);
        ob.add<N>(xb, eb);
        float px = 0.f;
        double pxb = 0, pqb = 0;  // float64 products: the loss subtracts sums of similar size
#pragma unroll
        for (int k = 0; k < N; ++k) bad_in |= xb[k] != xb[k];
        if (xr != nullptr) {
          float x[N];
          load_f<float, N>(xr, i, n, 0.f, x);
#pragma unroll
          for (int k = 0; k < N; ++k) {
            bad_in |= !(x[k] >= 0.f) | (x[k] == -neg_inf());
            px += x[k];
            pxb += x[k] > 0.f ? static_cast<double>(x[k]) * xb[k] : 0.0;
          }
        }
        if (teacher) {
          float xa[N], q[N];
          load_f<T, N>(ar, i, n, neg_inf(), xa);
          if (masked) {
#pragma unroll
            for (int k = 0; k < N; ++k) {
              q[k] = expf(tempered(xa[k], inv_t, t.ms)) *
                     (nucleus_keeps(xa[k], i + k, t.nu.a_star, t.nu.i_star) ? 1.f : drop);
            }
          } else {
#pragma unroll
            for (int k = 0; k < N; ++k) {
              bad_in |= xa[k] != xa[k];
              xa[k] = __fmul_rn(xa[k], inv_t);
            }
            sum_qb *= ot.add<N>(xa, q);
          }
#pragma unroll
          for (int k = 0; k < N; ++k) pqb += q[k] > 0.f ? static_cast<double>(q[k]) * xb[k] : 0.0;
        }
        sum_x += px;
        sum_xb += pxb;
        sum_qb += pqb;
      });
    }
    bad_in = __syncthreads_or(bad_in);
    const RowLse lb = block_lse(ob, 0.0, s);
    double sums[2] = {sum_x, sum_xb};
    block_reduce<2>(sums, s.red, SumOp{});
    float ms = t.ms;
    double log_zt = t.log_z, qb = 0;
    if (masked) {
      qb = block_sum(sum_qb, s) / ::exp(log_zt);
    } else if (teacher) {
      const RowLse lt = block_lse(ot, sum_qb, s);
      ms = lt.m;
      log_zt = lt.log_z;
      qb = lt.companion / lt.z;
    }
    if (threadIdx.x == 0) {
      bool bad = t.bad || bad_in || bad_max(lb.m) || (teacher && bad_max(ms));
      double sx_ = sums[0], sxb = sums[1];
      if (hard != nullptr) {
        const int64_t c = hard[r];
        bad = bad || c < 0 || c >= v;
        sx_ = 1.0;
        sxb = bad ? 0.0 : static_cast<double>(static_cast<float>(br[c]));
      }
      const double lse_b = static_cast<double>(lb.m) + lb.log_z;
      double l = -sxb + sx_ * lse_b;
      if (teacher) l += -qb + lse_b;
      float* st = stats + r * kAuxStats;
      DMMD_STORE(st + kAuxMaxB, lb.m);
      DMMD_STORE(st + kAuxLogZB, static_cast<float>(lb.log_z));
      DMMD_STORE(st + kAuxMaxT, teacher ? ms : 0.f);
      DMMD_STORE(st + kAuxLogZT, teacher ? static_cast<float>(log_zt) : 0.f);
      DMMD_STORE(st + kAuxAStar, t.nu.a_star);
      DMMD_STORE(st + kAuxIStar, bad ? -1.f : static_cast<float>(t.nu.i_star));
      DMMD_STORE(st + kAuxSumX, static_cast<float>(sx_));
      DMMD_STORE(loss + r, bad ? nan_f() : static_cast<float>(l));
    }
  }
}

// dL/db_c = g ((sum x + sum q) softmax(b)_c - x_c - q_c).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    aux_backward_kernel(const float* __restrict__ grad_loss, const T* __restrict__ b, int64_t sb,
                        const T* __restrict__ a, int64_t sa, const float* __restrict__ soft, int64_t sx,
                        const int64_t* __restrict__ hard, const float* __restrict__ stats, T* __restrict__ grad,
                        int64_t rows, int64_t v, float inv_t, double top_p, float delta) {
  constexpr int N = vec_width<T>();
  const bool teacher = a != nullptr, masked = teacher && top_p < 1.0;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* br = b + r * sb;
    const T* ar = teacher ? a + r * sa : nullptr;
    const float* xr = soft != nullptr ? soft + r * sx : nullptr;
    T* o = grad + r * v;
    const float* st = stats + r * kAuxStats;
    const float mb = st[kAuxMaxB] + st[kAuxLogZB], ms = st[kAuxMaxT], lzt = st[kAuxLogZT], gv = grad_loss[r];
    const float coef = st[kAuxSumX] + (teacher ? 1.f : 0.f);
    const NucleusRow nu{st[kAuxAStar], static_cast<int64_t>(st[kAuxIStar]), 0, 0};
    const int64_t target = hard != nullptr ? hard[r] : -1;
    const void* streams[3] = {br, ar != nullptr ? static_cast<const void*>(ar) : br,
                              xr != nullptr ? static_cast<const void*>(xr) : br};
    const int bytes[3] = {static_cast<int>(sizeof(T)), static_cast<int>(sizeof(T)),
                          xr != nullptr ? 4 : static_cast<int>(sizeof(T))};
    const RowPlan p = make_plan<N>(v, streams, bytes, 3);
    for_each_tile<N>(p, [&](int64_t i, int n) {
      float xb[N], d[N];
      load_f<T, N>(br, i, n, neg_inf(), xb);
#pragma unroll
      for (int k = 0; k < N; ++k) d[k] = coef * expf(xb[k] - mb) - (i + k == target ? 1.f : 0.f);
      if (xr != nullptr) {
        float x[N];
        load_f<float, N>(xr, i, n, 0.f, x);
#pragma unroll
        for (int k = 0; k < N; ++k) d[k] -= x[k];
      }
      if (teacher) {
        float xa[N];
        load_f<T, N>(ar, i, n, neg_inf(), xa);
#pragma unroll
        for (int k = 0; k < N; ++k) d[k] -= expf((masked_s(xa[k], i + k, inv_t, masked, nu, delta) - ms) - lzt);
      }
#pragma unroll
      for (int k = 0; k < N; ++k) d[k] *= gv;
      store_any<T, N>(o, i, n, d);
    });
  }
}

}  // namespace dmmd::cuda
