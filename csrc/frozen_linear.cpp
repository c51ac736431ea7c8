// Schema, CPU and Meta kernels and the autograd rule of pifi_fast::frozen_linear.
// The CUDA kernel lives in frozen_linear_cuda.cu and is compiled only in CUDA builds.
#include "frozen_linear.h"

#include <Python.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace pifi_fast {

void check_frozen_linear_args(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(weight.dim() == 2, "frozen_linear: weight must be 2-D (out, in), got ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "frozen_linear: x's last dim (",
              x.dim() ? x.size(-1) : 0, ") must equal weight's in-features (", weight.size(1), ")");
  TORCH_CHECK(x.device() == weight.device(), "frozen_linear: x is on ", x.device(),
              " but weight is on ", weight.device());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "frozen_linear: x is ", x.scalar_type(),
              " but weight is ", weight.scalar_type());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "frozen_linear: bias must have shape (", weight.size(0), ",)");
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type(),
                "frozen_linear: bias must match x's device and dtype");
  }
  if (residual.has_value() && residual->defined()) {
    auto expected = x.sizes().vec();
    expected.back() = weight.size(0);
    TORCH_CHECK(residual->sizes().vec() == expected, "frozen_linear: residual has shape ",
                residual->sizes(), ", expected ", at::IntArrayRef(expected));
    TORCH_CHECK(residual->device() == x.device() && residual->scalar_type() == x.scalar_type(),
                "frozen_linear: residual must match x's device and dtype");
  }
}

at::Tensor frozen_linear_forward(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& residual) {
  check_frozen_linear_args(x, weight, bias, residual);
  auto out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  const auto x2d = x.reshape({-1, weight.size(1)});
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_res = residual.has_value() && residual->defined();
  at::Tensor out;
  if (has_res) {
    // out = residual (+ bias) + x @ W^T, accumulated in the GEMM itself.
    auto acc = residual->reshape({-1, weight.size(0)});
    acc = has_bias ? acc.add(*bias) : acc.clone();
    out = at::addmm(acc, x2d, weight.t());
  } else if (has_bias) {
    out = at::addmm(*bias, x2d, weight.t());  // bias epilogue in cuBLASLt on CUDA
  } else {
    out = at::mm(x2d, weight.t());
  }
  return out.view(out_shape);
}

namespace {

at::Tensor frozen_linear_meta(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1),
              "frozen_linear: shape mismatch between x ", x.sizes(), " and weight ", weight.sizes());
  auto out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  return at::empty(out_shape, x.options());
}

// Autograd: weight and bias are frozen, so only dx = dy @ W and dresidual = dy are returned.
// The weight is a frozen parameter, not an activation; nothing of x is saved.
class FrozenLinearFunction : public torch::autograd::Function<FrozenLinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual) {
    TORCH_CHECK(!weight.requires_grad(),
                "frozen_linear: weight requires grad, but this op never computes a weight "
                "gradient; freeze it (requires_grad_(False)) or use torch.nn.functional.linear");
    TORCH_CHECK(!(bias.has_value() && bias->defined() && bias->requires_grad()),
                "frozen_linear: bias requires grad, but this op never computes a bias gradient");
    ctx->save_for_backward({weight});
    ctx->saved_data["has_residual"] = residual.has_value() && residual->defined();
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("pifi_fast::frozen_linear", "")
                         .typed<decltype(frozen_linear_forward)>();
    return op.call(x, weight, bias, residual);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto weight = ctx->get_saved_variables()[0];
    const auto& dy = grads[0];
    const auto dx = at::matmul(dy, weight);
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    return {dx, at::Tensor(), at::Tensor(), has_residual ? dy : at::Tensor()};
  }
};

at::Tensor frozen_linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& residual) {
  return FrozenLinearFunction::apply(x, weight, bias, residual);
}

}  // namespace
}  // namespace pifi_fast

TORCH_LIBRARY(pifi_fast, m) {
  m.def("frozen_linear(Tensor x, Tensor weight, Tensor? bias=None, Tensor? residual=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(pifi_fast, CPU, m) { m.impl("frozen_linear", &pifi_fast::frozen_linear_forward); }

TORCH_LIBRARY_IMPL(pifi_fast, Meta, m) { m.impl("frozen_linear", &pifi_fast::frozen_linear_meta); }

TORCH_LIBRARY_IMPL(pifi_fast, Autograd, m) {
  m.impl("frozen_linear", &pifi_fast::frozen_linear_autograd);
}

// A plain Python module: importing pifi_fast._C runs the registrations above.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) {
#ifdef PIFI_FAST_WITH_CUDA
    PyModule_AddIntConstant(module, "with_cuda", 1);
#else
    PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  }
  return module;
}
}
