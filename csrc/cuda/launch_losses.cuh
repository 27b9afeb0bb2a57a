// The launches of the loss ops (see launch.cuh).
#pragma once
#include "launch.cuh"
#include "losses_kernels.cuh"

namespace dmmd::cuda {

template <typename T>
void launch_teacher_logprobs(const TeacherLogprobsParams<T>& p, cudaStream_t stream) {
  DMMD_LAUNCH(teacher_logprobs_kernel<T>, row_grid(p.rows), kThreads, stream)
  (p.a, p.sa, p.out, p.rows, p.v, p.inv_t, p.top_p, p.delta);
}

template <typename T>
void launch_generator_forward(const GenForwardParams<T>& p, cudaStream_t stream) {
  DMMD_LAUNCH(generator_forward_kernel<T>, row_grid(p.rows), kThreads, stream)
  (p.u, p.su, p.a, p.sa, p.b, p.sb, p.loss, p.stats, p.rows, p.v, p.inv_t, p.top_p, p.delta);
}

template <typename T>
void launch_generator_backward(const GenBackwardParams<T>& p, cudaStream_t stream) {
  DMMD_LAUNCH(generator_backward_kernel<T>, row_grid(p.rows), kThreads, stream)
  (p.grad_loss, p.u, p.su, p.a, p.sa, p.b, p.sb, p.stats, p.grad, p.rows, p.v, p.inv_t, p.top_p, p.delta);
}

template <typename T>
void launch_aux_forward(const AuxForwardParams<T>& p, cudaStream_t stream) {
  DMMD_LAUNCH(aux_forward_kernel<T>, row_grid(p.rows), kThreads, stream)
  (p.b, p.sb, p.a, p.sa, p.soft, p.sx, p.hard, p.loss, p.stats, p.rows, p.v, p.inv_t, p.top_p, p.delta);
}

template <typename T>
void launch_aux_backward(const AuxBackwardParams<T>& p, cudaStream_t stream) {
  DMMD_LAUNCH(aux_backward_kernel<T>, row_grid(p.rows), kThreads, stream)
  (p.grad_loss, p.b, p.sb, p.a, p.sa, p.soft, p.sx, p.hard, p.stats, p.grad, p.rows, p.v, p.inv_t, p.top_p,
   p.delta);
}

}  // namespace dmmd::cuda
