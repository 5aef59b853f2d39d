// Python bindings of resnet_fast._C: input checks, device guard, then the cpu/ or cuda/ kernel.
#include <torch/extension.h>
#include <c10/core/DeviceGuard.h>

#include "resnet_fast.h"

namespace resnet_fast {
namespace {

void check_same(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": shapes differ: ", a.sizes(), " vs ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": dtypes differ: ", a.scalar_type(), " vs ",
              b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op, ": devices differ: ", a.device(), " vs ", b.device());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), op,
              ": expected a floating-point tensor (float32, float16, bfloat16, float64), got ",
              a.scalar_type());
}

}  // namespace

at::Tensor add_relu(const at::Tensor& a, const at::Tensor& b) {
  check_same(a, b, "add_relu");
  // Kernels walk flat memory: both inputs dense in the same format (a's).
  const auto format = a.suggest_memory_format();
  const auto a_ = a.contiguous(format);
  const auto b_ = b.contiguous(format);
  if (a.is_cuda()) {
#ifdef WITH_CUDA
    const c10::DeviceGuard guard(a.device());
    return cuda::add_relu(a_, b_);
#else
    TORCH_CHECK(false, "add_relu: resnet_fast._C was built without CUDA sources");
#endif
  }
  TORCH_CHECK(a.is_cpu(), "add_relu: unsupported device ", a.device());
  return cpu::add_relu(a_, b_);
}

}  // namespace resnet_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resnet_fast C++/CUDA fused ops";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // Checked at load: an extension built for another torch must be rebuilt, not used.
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                            "." + std::to_string(TORCH_VERSION_PATCH);
  m.def("add_relu", &resnet_fast::add_relu, "relu(a + b), elementwise", py::arg("a"), py::arg("b"));
}
