// The launches of the samplers (see launch.cuh). The categorical draws stage their rows in shared
// memory where they fit (row_block.cuh): every draw reads its row three times, five or more with a
// nucleus.
#pragma once
#include "launch.cuh"
#include "samplers_kernels.cuh"

namespace dmmd::cuda {

template <typename T>
void launch_sample_categorical(const SampleParams<T>& p, cudaStream_t stream) {
  auto* const sample_categorical_staged = sample_categorical_kernel<T, true>;
  auto* const sample_categorical_unstaged = sample_categorical_kernel<T, false>;
  const int64_t stage = stage_bytes_for(sample_categorical_staged, p.v, sizeof(T));
  DMMD_LAUNCH_STAGED_OR_NOT(sample_categorical_staged, sample_categorical_unstaged, stage, row_grid(p.rows),
                            kThreads, stream, p.x, p.sx, p.out, p.rows, p.v, p.inv_t, p.top_p, p.seed, p.offset);
}

template <typename T>
void launch_denoise_step(const DenoiseParams<T>& p, cudaStream_t stream) {
  auto* const denoise_step_staged = denoise_step_kernel<T, true>;
  auto* const denoise_step_unstaged = denoise_step_kernel<T, false>;
  const int64_t stage = stage_bytes_for(denoise_step_staged, p.v, sizeof(T));
  DMMD_LAUNCH_STAGED_OR_NOT(denoise_step_staged, denoise_step_unstaged, stage, row_grid(p.rows), kThreads, stream,
                            p.x, p.sx, p.z, p.alpha_s, p.alpha_t, p.out, p.rows, p.v, p.masked, p.mask_id, p.inv_t,
                            p.top_p, p.seed, p.offset);
}

// Soft x: one block per row. Hard x: one thread per row, 256-thread blocks.
inline void launch_posterior_sample(const PosteriorParams& p, cudaStream_t stream) {
  if (p.soft != nullptr) {
    DMMD_LAUNCH(posterior_soft_kernel, row_grid(p.rows), kThreads, stream)
    (p.z, p.soft, p.sx, p.alpha_s, p.alpha_t, p.out, p.rows, p.v, p.masked, p.mask_id, p.seed, p.offset);
  } else {
    constexpr int kElemThreads = 256;
    const int64_t blocks = (p.rows + kElemThreads - 1) / kElemThreads;
    const unsigned grid = static_cast<unsigned>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
    DMMD_LAUNCH(posterior_hard_kernel, grid, kElemThreads, stream)
    (p.z, p.hard, p.alpha_s, p.alpha_t, p.out, p.rows, p.masked, p.mask_id, p.v, p.seed, p.offset);
  }
}

}  // namespace dmmd::cuda
