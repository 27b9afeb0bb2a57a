// The sampler kernels (device code only; the launches are in samplers_cuda.cu).
//
// A categorical draw from logits takes one thread block per row: the row maximum, with
// top_p < 1 the nucleus by radix selection (row_block.cuh), then an inverse CDF with the
// row's Philox uniform over the weights exp(s - max s) (float32) summed in float64 in index
// order: the same rule and the same uniforms as the CPU kernels, so both backends give the
// same draws except within float rounding of a CDF step. posterior_sample with a hard x is
// elementwise (one thread per row, the CPU's float64 math). Kernels cannot raise: a row they
// cannot draw from gets -1 and the Python wrapper raises, naming the argument.
#pragma once
#include "dmmd/philox.h"
#include "dmmd/rowmath.h"
#include "row_block.cuh"

namespace dmmd::cuda {

// One draw from softmax(row / temperature) restricted to the nucleus, class `exclude` (the
// mask of a masked denoiser; -1 for none) never drawn; -1 for an unusable row. With a `stage`
// (nullptr for none) the row is read from global memory once, into it, and every pass runs there.
template <typename T, int N>
__device__ int64_t block_draw(const T* row, int64_t v, float inv_t, double top_p, int64_t exclude, double u,
                              unsigned char* stage, Scratch& s) {
  const void* streams[1] = {row};
  const int bytes[1] = {static_cast<int>(sizeof(T))};
  const RowPlan p = make_plan<N>(v, streams, bytes, 1);
  if (stage != nullptr) row = stage_row<T, N>(row, p, stage);
  bool bad;
  const float m = row_max<T, N>(row, p, exclude, s, &bad);
  if (bad) return -1;
  const float ms = __fmul_rn(m, inv_t);
  const bool masked = top_p < 1.0;
  NucleusRow nu{neg_inf(), v - 1, 0, 0};
  if (masked) nu = block_nucleus<T, N>(row, p, inv_t, ms, exclude, top_p, s);
  return block_inverse_cdf<N>(p, u, s, [&](int64_t i, int n, double (&w)[N]) {
    float x[N];
    load_f<T, N>(row, i, n, neg_inf(), x);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const bool keep = k < n && i + k != exclude && (!masked || nucleus_keeps(x[k], i + k, nu.a_star, nu.i_star));
      w[k] = keep ? static_cast<double>(expf(tempered(x[k], inv_t, ms))) : 0.0;
    }
  });
}

// Both samplers ask for two resident blocks per SM (at most 128 registers): without a minimum
// ptxas aims for three on sm_80 (80 registers) and spills in the 16-bit instantiations (68 / 144
// bytes in denoise_step); with a minimum of one it takes 140 on sm_90, one block per SM
// (scripts/ptxas_report.py prints what each arch gets).
template <typename T, bool kStaged>
__global__ void __launch_bounds__(kThreads, 2)
    sample_categorical_kernel(const T* __restrict__ logits, int64_t sl, int64_t* __restrict__ out, int64_t rows,
                              int64_t v, float inv_t, double top_p, uint64_t seed, uint64_t offset) {
  constexpr int N = vec_width<T>();
  __shared__ Scratch s;
  unsigned char* const stage = kStaged ? DMMD_ROW_STAGE() : nullptr;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const double u = element_uniforms(seed, offset, static_cast<uint64_t>(r)).u0;
    const int64_t x = block_draw<T, N>(logits + r * sl, v, inv_t, top_p, -1, u, stage, s);
    if (threadIdx.x == 0) DMMD_STORE(out + r, x);
  }
}

template <typename T, bool kStaged>
__global__ void __launch_bounds__(kThreads, 2)
    denoise_step_kernel(const T* __restrict__ logits, int64_t sl, const int64_t* __restrict__ z_t,
                        const double* __restrict__ alpha_s, const double* __restrict__ alpha_t,
                        int64_t* __restrict__ out, int64_t rows, int64_t v, bool is_masked, int64_t mask_id,
                        float inv_t, double top_p, uint64_t seed, uint64_t offset) {
  constexpr int N = vec_width<T>();
  __shared__ Scratch s;
  unsigned char* const stage = kStaged ? DMMD_ROW_STAGE() : nullptr;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t z = z_t[r];
    const double a_s = alpha_s[r], a_t = alpha_t[r];
    const Uniform2 u = element_uniforms(seed, offset, static_cast<uint64_t>(r));
    int64_t result;
    if (z < 0 || z >= v || !(a_t >= 0 && a_t <= a_s && a_s <= 1)) {
      result = -1;
    } else if (is_masked) {
      // The reveal coin first: rows that stay as they are never touch their logits.
      const bool reveal = z == mask_id && u.u0 < unmask_probability(a_s, a_t);
      result = reveal ? block_draw<T, N>(logits + r * sl, v, inv_t, top_p, mask_id, u.u1, stage, s) : z;
    } else {
      const int64_t x = block_draw<T, N>(logits + r * sl, v, inv_t, top_p, -1, u.u0, stage, s);
      result = x < 0 ? -1 : uniform_posterior_hard(z, x, a_s, a_t, v, u.u1);
    }
    if (threadIdx.x == 0) DMMD_STORE(out + r, result);
  }
}

// Hard x: one thread per row, the CPU kernel's float64 math.
__global__ void posterior_hard_kernel(const int64_t* __restrict__ z_t, const int64_t* __restrict__ x,
                                      const double* __restrict__ alpha_s, const double* __restrict__ alpha_t,
                                      int64_t* __restrict__ out, int64_t rows, bool is_masked, int64_t mask_id,
                                      int64_t v, uint64_t seed, uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += stride) {
    const int64_t z = z_t[r], xh = x[r];
    const double a_s = alpha_s[r], a_t = alpha_t[r];
    const bool ids_ok = z >= 0 && xh >= 0 && (v < 0 || (z < v && xh < v)) && !(is_masked && xh == mask_id);
    if (!ids_ok || !(a_t >= 0 && a_t <= a_s && a_s <= 1)) {
      DMMD_STORE(out + r, int64_t{-1});
      continue;
    }
    const Uniform2 u = element_uniforms(seed, offset, static_cast<uint64_t>(r));
    if (is_masked) {
      DMMD_STORE(out + r, (z == mask_id && u.u0 < unmask_probability(a_s, a_t)) ? xh : z);
    } else {
      DMMD_STORE(out + r, uniform_posterior_hard(z, xh, a_s, a_t, v, u.u0));
    }
  }
}

// Soft x: one block per row, an inverse CDF over eq. 4's class weights (float64).
__global__ void __launch_bounds__(kThreads)
    posterior_soft_kernel(const int64_t* __restrict__ z_t, const float* __restrict__ x, int64_t sx,
                          const double* __restrict__ alpha_s, const double* __restrict__ alpha_t,
                          int64_t* __restrict__ out, int64_t rows, int64_t v, bool is_masked, int64_t mask_id,
                          uint64_t seed, uint64_t offset) {
  constexpr int N = 4;
  __shared__ Scratch s;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t z = z_t[r];
    const double a_s = alpha_s[r], a_t = alpha_t[r];
    const float* xr = x + r * sx;
    const Uniform2 u = element_uniforms(seed, offset, static_cast<uint64_t>(r));
    const void* streams[1] = {xr};
    const int bytes[1] = {4};
    const RowPlan p = make_plan<N>(v, streams, bytes, 1);
    int64_t result;
    if (z < 0 || z >= v || !(a_t >= 0 && a_t <= a_s && a_s <= 1)) {
      result = -1;
    } else if (is_masked) {
      if (z != mask_id || !(u.u0 < unmask_probability(a_s, a_t))) {
        result = z;
      } else {
        result = block_inverse_cdf<N>(p, u.u1, s, [&](int64_t i, int n, double (&w)[N]) {
          float xs[N];
          load_f<float, N>(xr, i, n, 0.f, xs);
#pragma unroll
          for (int k = 0; k < N; ++k) w[k] = i + k == mask_id ? 0.0 : static_cast<double>(xs[k]);
        });
      }
    } else {
      // eq. 4 over all classes: (a_ts [c = z] + beta) (alpha_s x_c + gamma); no mass keeps z.
      const double a_ts = alpha_ts(a_s, a_t), beta = (1 - a_ts) / v, gamma = (1 - a_s) / v;
      const int64_t c = block_inverse_cdf<N>(p, u.u0, s, [&](int64_t i, int n, double (&w)[N]) {
        float xs[N];
        load_f<float, N>(xr, i, n, 0.f, xs);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          w[k] = k < n ? ((i + k == z ? a_ts : 0.0) + beta) * (a_s * static_cast<double>(xs[k]) + gamma) : 0.0;
        }
      });
      result = c >= 0 ? c : z;
    }
    if (threadIdx.x == 0) DMMD_STORE(out + r, result);
  }
}

}  // namespace dmmd::cuda
