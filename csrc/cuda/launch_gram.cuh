// The launch of the Gram-trick kernel (see launch.cuh).
#pragma once
#include "launch.cuh"
#include "gram_kernels.cuh"

namespace dmmd::cuda {

// The Gram trick: one block per pair i <= j.
inline void launch_gram_trick(const GramParams& p, cudaStream_t stream) {
  const int64_t pairs = p.n * (p.n + 1) / 2;
  DMMD_LAUNCH(gram_trick_kernel, row_grid(pairs), kThreads, stream)(p.a, p.g, p.k, p.n, p.t, p.d_in, p.d_out);
}

}  // namespace dmmd::cuda
