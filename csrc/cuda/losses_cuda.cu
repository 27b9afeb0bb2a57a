// CUDA registration of the loss ops: teacher_logprobs, generator_loss (+ backward) and aux_loss
// (+ backward): the shared host prologue (prologue.h), then the launch (launch.cuh) on the
// current stream. The kernels are in losses_kernels.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../prologue.h"
#include "launch_losses.cuh"

namespace dmmd::cuda {
namespace {

at::Tensor teacher_logprobs_cuda(const at::Tensor& teacher, double temperature, double top_p, double delta) {
  const TeacherLogprobsCall c = teacher_logprobs_call(teacher, temperature, top_p, delta);
  const c10::cuda::CUDAGuard guard(c.a.device());
  if (c.a.size(0) == 0) return c.out;
  dispatch_logits(c.a.scalar_type(), "teacher_logprobs", [&](auto tag) {
    launch_teacher_logprobs(c.params<decltype(tag)>(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c.out;
}

std::tuple<at::Tensor, at::Tensor> generator_loss_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                               const at::Tensor& aux, double temperature,
                                                               double top_p, double delta) {
  const GenForwardCall c = generator_forward_call(student, teacher, aux, temperature, top_p, delta);
  const c10::cuda::CUDAGuard guard(c.u.device());
  if (c.u.size(0) == 0) return {c.loss, c.stats};
  dispatch_logits(c.u.scalar_type(), "generator_loss", [&](auto tag) {
    launch_generator_forward(c.params<decltype(tag)>(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {c.loss, c.stats};
}

at::Tensor generator_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student,
                                        const at::Tensor& teacher, const at::Tensor& aux, const at::Tensor& stats,
                                        double temperature, double top_p, double delta) {
  const GenBackwardCall c =
      generator_backward_call(grad_loss, student, teacher, aux, stats, temperature, top_p, delta);
  const c10::cuda::CUDAGuard guard(c.u.device());
  if (c.u.size(0) == 0) return c.grad;
  dispatch_logits(c.u.scalar_type(), "generator_loss_backward", [&](auto tag) {
    launch_generator_backward(c.params<decltype(tag)>(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c.grad;
}

std::tuple<at::Tensor, at::Tensor> aux_loss_forward_cuda(const at::Tensor& aux, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& teacher,
                                                         double temperature, double top_p, double delta) {
  const AuxForwardCall c = aux_forward_call(aux, target, teacher, temperature, top_p, delta);
  const c10::cuda::CUDAGuard guard(c.in.b.device());
  if (c.in.b.size(0) == 0) return {c.loss, c.stats};
  dispatch_logits(c.in.b.scalar_type(), "aux_loss", [&](auto tag) {
    launch_aux_forward(c.params<decltype(tag)>(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {c.loss, c.stats};
}

at::Tensor aux_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& aux, const at::Tensor& target,
                                  const std::optional<at::Tensor>& teacher, const at::Tensor& stats,
                                  double temperature, double top_p, double delta) {
  const AuxBackwardCall c = aux_backward_call(grad_loss, aux, target, teacher, stats, temperature, top_p, delta);
  const c10::cuda::CUDAGuard guard(c.in.b.device());
  if (c.in.b.size(0) == 0) return c.grad;
  dispatch_logits(c.in.b.scalar_type(), "aux_loss_backward", [&](auto tag) {
    launch_aux_backward(c.params<decltype(tag)>(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c.grad;
}

}  // namespace
}  // namespace dmmd::cuda

TORCH_LIBRARY_IMPL(dmmd, CUDA, m) {
  m.impl("teacher_logprobs", &dmmd::cuda::teacher_logprobs_cuda);
  m.impl("generator_loss_forward", &dmmd::cuda::generator_loss_forward_cuda);
  m.impl("generator_loss_backward", &dmmd::cuda::generator_loss_backward_cuda);
  m.impl("aux_loss_forward", &dmmd::cuda::aux_loss_forward_cuda);
  m.impl("aux_loss_backward", &dmmd::cuda::aux_loss_backward_cuda);
}
