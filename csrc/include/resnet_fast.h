// The one header behind csrc/api.cpp: device-specific kernels, called only after api.cpp has
// checked shapes, dtypes and devices and made the inputs dense in one memory format.
#pragma once

#include <ATen/ATen.h>

namespace resnet_fast {
namespace cpu {
at::Tensor add_relu(const at::Tensor& a, const at::Tensor& b);
}  // namespace cpu

#ifdef WITH_CUDA
namespace cuda {
at::Tensor add_relu(const at::Tensor& a, const at::Tensor& b);
}  // namespace cuda
#endif
}  // namespace resnet_fast
