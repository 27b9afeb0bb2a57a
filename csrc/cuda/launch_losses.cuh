// The launches of the loss ops (see launch.cuh). A forward with a nucleus stages its teacher
// row in shared memory where it fits (row_block.cuh): the scan reads it six to ten times.
#pragma once
#include "launch.cuh"
#include "losses_kernels.cuh"

namespace dmmd::cuda {

template <typename T>
void launch_teacher_logprobs(const TeacherLogprobsParams<T>& p, cudaStream_t stream) {
  auto* const teacher_logprobs_staged = teacher_logprobs_kernel<T, true>;
  auto* const teacher_logprobs_unstaged = teacher_logprobs_kernel<T, false>;
  const int64_t stage = p.top_p < 1.0 ? stage_bytes_for(teacher_logprobs_staged, p.v, sizeof(T)) : 0;
  DMMD_LAUNCH_STAGED_OR_NOT(teacher_logprobs_staged, teacher_logprobs_unstaged, stage, row_grid(p.rows), kThreads,
                            stream, p.a, p.sa, p.out, p.rows, p.v, p.inv_t, p.top_p, p.delta);
}

template <typename T>
void launch_generator_forward(const GenForwardParams<T>& p, cudaStream_t stream) {
  auto* const generator_forward_staged = generator_forward_kernel<T, true>;
  auto* const generator_forward_unstaged = generator_forward_kernel<T, false>;
  const int64_t stage = p.top_p < 1.0 ? stage_bytes_for(generator_forward_staged, p.v, sizeof(T)) : 0;
  DMMD_LAUNCH_STAGED_OR_NOT(generator_forward_staged, generator_forward_unstaged, stage, row_grid(p.rows), kThreads,
                            stream, p.u, p.su, p.a, p.sa, p.b, p.sb, p.loss, p.stats, p.rows, p.v, p.inv_t, p.top_p,
                            p.delta);
}

template <typename T>
void launch_generator_backward(const GenBackwardParams<T>& p, cudaStream_t stream) {
  DMMD_LAUNCH(generator_backward_kernel<T>, row_grid(p.rows), kThreads, stream)
  (p.grad_loss, p.u, p.su, p.a, p.sa, p.b, p.sb, p.stats, p.grad, p.rows, p.v, p.inv_t, p.top_p, p.delta);
}

template <typename T>
void launch_aux_forward(const AuxForwardParams<T>& p, cudaStream_t stream) {
  auto* const aux_forward_staged = aux_forward_kernel<T, true>;
  auto* const aux_forward_unstaged = aux_forward_kernel<T, false>;
  const int64_t stage = p.a != nullptr && p.top_p < 1.0 ? stage_bytes_for(aux_forward_staged, p.v, sizeof(T)) : 0;
  DMMD_LAUNCH_STAGED_OR_NOT(aux_forward_staged, aux_forward_unstaged, stage, row_grid(p.rows), kThreads, stream, p.b,
                            p.sb, p.a, p.sa, p.soft, p.sx, p.hard, p.loss, p.stats, p.rows, p.v, p.inv_t, p.top_p,
                            p.delta);
}

template <typename T>
void launch_aux_backward(const AuxBackwardParams<T>& p, cudaStream_t stream) {
  DMMD_LAUNCH(aux_backward_kernel<T>, row_grid(p.rows), kThreads, stream)
  (p.grad_loss, p.b, p.sb, p.a, p.sa, p.soft, p.sx, p.hard, p.stats, p.grad, p.rows, p.v, p.inv_t, p.top_p,
   p.delta);
}

}  // namespace dmmd::cuda
