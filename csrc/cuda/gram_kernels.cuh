// grad_gram's fused Gram-trick kernel (device code only; grad_gram_cuda.cu picks the path and
// launches): K_ij = sum_{t,t'} (a_i a_j^T)_{tt'} (g_i g_j^T)_{tt'} without ever writing a T x T
// product. A block per pair i <= j walks the 16 x 16 tiles of (t, t'), builds the tile of
// a_i a_j^T and of g_i g_j^T in registers from 16-wide slices staged in shared memory, and
// accumulates their elementwise product; the block's sum (fixed order) is written to K_ij and
// K_ji alike, so K is exactly symmetric. Math in float32, each thread's sum in float64.
#pragma once
#include "row_block.cuh"

namespace dmmd::cuda {

constexpr int kTile = kThreads == 256 ? 16 : 8;  // (t, t') tile edge: kTile x kTile = kThreads
static_assert(kTile * kTile == kThreads, "one thread per tile element");

// The pair (i, j), i <= j, of linear index p in row-major order of the upper triangle.
__device__ __forceinline__ void pair_of(int64_t p, int64_t n, int64_t* i, int64_t* j) {
  // Row i starts at i n - i (i - 1) / 2; solve with doubles, then correct the rounding.
  const double nn = static_cast<double>(n);
  int64_t r = static_cast<int64_t>(((2 * nn + 1) - sqrt((2 * nn + 1) * (2 * nn + 1) - 8.0 * static_cast<double>(p))) / 2);
  auto start = [n](int64_t row) { return row * n - row * (row - 1) / 2; };
  if (r < 0) r = 0;
  if (r > n - 1) r = n - 1;
  while (r > 0 && start(r) > p) --r;
  while (r + 1 < n && start(r + 1) <= p) ++r;
  *i = r;
  *j = r + (p - start(r));
}

// Row stride of a staged kTile x kTile slice in shared memory (one padding column: no bank
// conflicts when a column is read).
constexpr int kSliceStride = kTile + 1;

// acc[t][t'] += sum_k x_i[t0 + t, k] x_j[s0 + t', k] over one tile, for x of width d; si and sj
// are shared arrays of kTile x kSliceStride floats.
template <typename Sh>
__device__ __forceinline__ float tile_dot(const float* xi, const float* xj, int64_t t, int64_t d, int64_t t0,
                                          int64_t s0, Sh& si, Sh& sj) {
  const int ty = threadIdx.x / kTile, tx = threadIdx.x % kTile;
  float acc = 0.f;
  for (int64_t k0 = 0; k0 < d; k0 += kTile) {
    // Thread (ty, tx) stages element (row ty, column tx) of both slices.
    const int64_t ri = t0 + ty, rj = s0 + ty, k = k0 + tx;
    si[ty * kSliceStride + tx] = (ri < t && k < d) ? xi[ri * d + k] : 0.f;
    sj[ty * kSliceStride + tx] = (rj < t && k < d) ? xj[rj * d + k] : 0.f;
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kTile; ++q) {
      acc = fmaf(static_cast<float>(si[ty * kSliceStride + q]), static_cast<float>(sj[tx * kSliceStride + q]), acc);
    }
    __syncthreads();
  }
  return acc;
}

__global__ void __launch_bounds__(kThreads)
    gram_trick_kernel(const float* __restrict__ a, const float* __restrict__ g, float* __restrict__ out, int64_t n,
                      int64_t t, int64_t d_in, int64_t d_out) {
  __shared__ DMMD_SHARED_ARRAY(float, si, kTile * kSliceStride);
  __shared__ DMMD_SHARED_ARRAY(float, sj, kTile * kSliceStride);
  __shared__ Scratch s;
  const int64_t pairs = n * (n + 1) / 2;
  for (int64_t p = blockIdx.x; p < pairs; p += gridDim.x) {
    int64_t i, j;
    pair_of(p, n, &i, &j);
    const float *ai = a + i * t * d_in, *aj = a + j * t * d_in;
    const float *gi = g + i * t * d_out, *gj = g + j * t * d_out;
    double acc = 0;
    for (int64_t t0 = 0; t0 < t; t0 += kTile) {
      for (int64_t s0 = 0; s0 < t; s0 += kTile) {
        const float aa = tile_dot(ai, aj, t, d_in, t0, s0, si, sj);
        const float gg = tile_dot(gi, gj, t, d_out, t0, s0, si, sj);
        acc += static_cast<double>(aa) * static_cast<double>(gg);  // 0 outside [0, T)^2
      }
    }
    const double k = block_sum(acc, s);
    if (threadIdx.x == 0) {
      DMMD_STORE(out + i * n + j, static_cast<float>(k));
      if (j != i) DMMD_STORE(out + j * n + i, static_cast<float>(k));
    }
  }
}

}  // namespace dmmd::cuda
