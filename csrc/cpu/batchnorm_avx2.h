// The AVX2 + FMA build of the batch-norm kernels (batchnorm_avx2.cpp), x86-64 with GCC or Clang only.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RF_BN_HAVE_AVX2 1
namespace resnet_fast {
namespace cpu {
namespace avx2 {
void stats(const at::Tensor& x, at::Tensor& mean, at::Tensor& var);
void apply(at::Tensor& y, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
           const std::optional<at::Tensor>& residual, bool relu);
void backward_reduce(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                     const std::optional<at::Tensor>& output, const at::Tensor& mean, bool relu,
                     at::Tensor& sum_dy, at::Tensor& sum_dy_xmu);
void backward_elemt(at::Tensor& dx, std::optional<at::Tensor>& dres, const at::Tensor& dy, const at::Tensor& x,
                    const at::Tensor& scale, const at::Tensor& shift, const std::optional<at::Tensor>& output,
                    const at::Tensor& mean, const at::Tensor& ka, const at::Tensor& kb, const at::Tensor& kc,
                    bool relu);
}  // namespace avx2
}  // namespace cpu
}  // namespace resnet_fast
#else
#define RF_BN_HAVE_AVX2 0
#endif
