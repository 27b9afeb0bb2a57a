// CUDA registration of the loss ops: teacher_logprobs, generator_loss (+ backward) and aux_loss
// (+ backward). Argument checks and launches; the kernels are in losses_kernels.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "losses_kernels.cuh"

namespace dmmd::cuda {
namespace {

at::Tensor teacher_logprobs_cuda(const at::Tensor& teacher, double temperature, double top_p, double delta) {
  constexpr const char* op = "teacher_logprobs";
  check_top_p_args(temperature, top_p, delta, op);
  const at::Tensor a = logit_rows(teacher, op, "teacher_logits");
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t rows = a.size(0), v = a.size(1);
  at::Tensor out = at::empty({rows, v}, a.options().dtype(at::kFloat));
  if (rows == 0) return out;
  dispatch_logits(a.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    teacher_logprobs_kernel<T><<<row_grid(rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        a.const_data_ptr<T>(), a.stride(0), out.mutable_data_ptr<float>(), rows, v,
        static_cast<float>(1.0 / temperature), top_p, static_cast<float>(delta));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> generator_loss_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                               const at::Tensor& aux, double temperature,
                                                               double top_p, double delta) {
  constexpr const char* op = "generator_loss";
  check_top_p_args(temperature, top_p, delta, op);
  const GenArgs in = generator_loss_args(student, teacher, aux, op);
  const c10::cuda::CUDAGuard guard(in.u.device());
  const int64_t rows = in.u.size(0), v = in.u.size(1);
  at::Tensor loss = at::empty({rows}, in.u.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({rows, kGenStats}, in.u.options().dtype(at::kFloat));
  if (rows == 0) return {loss, stats};
  dispatch_logits(in.u.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    generator_forward_kernel<T><<<row_grid(rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        in.u.const_data_ptr<T>(), in.u.stride(0), in.a.const_data_ptr<T>(), in.a.stride(0),
        in.b.const_data_ptr<T>(), in.b.stride(0), loss.mutable_data_ptr<float>(), stats.mutable_data_ptr<float>(),
        rows, v, static_cast<float>(1.0 / temperature), top_p, static_cast<float>(delta));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats};
}

at::Tensor generator_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student,
                                        const at::Tensor& teacher, const at::Tensor& aux, const at::Tensor& stats,
                                        double temperature, double top_p, double delta) {
  constexpr const char* op = "generator_loss_backward";
  check_top_p_args(temperature, top_p, delta, op);
  const GenArgs in = generator_loss_args(student, teacher, aux, op);
  const int64_t rows = in.u.size(0), v = in.u.size(1);
  const auto backward = loss_backward_args(grad_loss, stats, kGenStats, in.u, op);
  const at::Tensor &g = backward.first, &st = backward.second;
  const c10::cuda::CUDAGuard guard(in.u.device());
  at::Tensor grad = at::empty({rows, v}, in.u.options());
  if (rows == 0) return grad;
  dispatch_logits(in.u.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    generator_backward_kernel<T><<<row_grid(rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<float>(), in.u.const_data_ptr<T>(), in.u.stride(0), in.a.const_data_ptr<T>(),
        in.a.stride(0), in.b.const_data_ptr<T>(), in.b.stride(0), st.const_data_ptr<float>(),
        grad.mutable_data_ptr<T>(), rows, v, static_cast<float>(1.0 / temperature), top_p,
        static_cast<float>(delta));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> aux_loss_forward_cuda(const at::Tensor& aux, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& teacher,
                                                         double temperature, double top_p, double delta) {
  constexpr const char* op = "aux_loss";
  check_top_p_args(temperature, top_p, delta, op);
  const AuxArgs in = aux_loss_args(aux, target, teacher, op);
  const c10::cuda::CUDAGuard guard(in.b.device());
  const int64_t rows = in.b.size(0), v = in.b.size(1);
  at::Tensor loss = at::empty({rows}, in.b.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({rows, kAuxStats}, in.b.options().dtype(at::kFloat));
  if (rows == 0) return {loss, stats};
  dispatch_logits(in.b.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    aux_forward_kernel<T><<<row_grid(rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        in.b.const_data_ptr<T>(), in.b.stride(0), in.teacher ? in.a.const_data_ptr<T>() : nullptr,
        in.teacher ? in.a.stride(0) : 0, in.soft ? in.x.const_data_ptr<float>() : nullptr,
        in.soft ? in.x.stride(0) : 0, in.soft ? nullptr : in.x.const_data_ptr<int64_t>(),
        loss.mutable_data_ptr<float>(), stats.mutable_data_ptr<float>(), rows, v,
        static_cast<float>(1.0 / temperature), top_p, static_cast<float>(delta));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats};
}

at::Tensor aux_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& aux, const at::Tensor& target,
                                  const std::optional<at::Tensor>& teacher, const at::Tensor& stats,
                                  double temperature, double top_p, double delta) {
  constexpr const char* op = "aux_loss_backward";
  check_top_p_args(temperature, top_p, delta, op);
  const AuxArgs in = aux_loss_args(aux, target, teacher, op);
  const int64_t rows = in.b.size(0), v = in.b.size(1);
  const auto backward = loss_backward_args(grad_loss, stats, kAuxStats, in.b, op);
  const at::Tensor &g = backward.first, &st = backward.second;
  const c10::cuda::CUDAGuard guard(in.b.device());
  at::Tensor grad = at::empty({rows, v}, in.b.options());
  if (rows == 0) return grad;
  dispatch_logits(in.b.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    aux_backward_kernel<T><<<row_grid(rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<float>(), in.b.const_data_ptr<T>(), in.b.stride(0),
        in.teacher ? in.a.const_data_ptr<T>() : nullptr, in.teacher ? in.a.stride(0) : 0,
        in.soft ? in.x.const_data_ptr<float>() : nullptr, in.soft ? in.x.stride(0) : 0,
        in.soft ? nullptr : in.x.const_data_ptr<int64_t>(), st.const_data_ptr<float>(),
        grad.mutable_data_ptr<T>(), rows, v, static_cast<float>(1.0 / temperature), top_p,
        static_cast<float>(delta));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
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
