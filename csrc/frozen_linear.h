// Frozen-weight linear: y = x @ weight^T + bias + residual.
// The weight (and bias) are frozen: autograd returns only the input and residual gradients.
#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace pifi_fast {

// Device-generic forward used by the CPU and CUDA kernels. The residual is folded into the
// GEMM as its accumulator (beta = 1), which is cuBLAS's C input on CUDA, so no extra pass.
at::Tensor frozen_linear_forward(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& residual);

void check_frozen_linear_args(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual);

}  // namespace pifi_fast
