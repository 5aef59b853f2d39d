// batchnorm_kernels.h built for AVX2 + FMA; batchnorm.cpp calls it only where the CPU has both.
// Everything that is not at::vec is included before the target switch, so no inline function shared
// with other files is compiled with AVX2 here; at::vec lives in namespace at::vec::<CPU_CAPABILITY>,
// set to AVX2 for this file only, so its instantiations are this file's own.
#include "batchnorm_avx2.h"

#if RF_BN_HAVE_AVX2
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// What -mavx2 -mfma -mf16c would define: sleef.h declares its 256-bit functions only under these.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#define RF_BN_ARCH avx2_impl
#include "batchnorm_kernels.h"

namespace resnet_fast {
namespace cpu {
namespace avx2 {
void stats(const at::Tensor& x, at::Tensor& mean, at::Tensor& var) { avx2_impl::stats(x, mean, var); }
void apply(at::Tensor& y, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
           const std::optional<at::Tensor>& residual, bool relu) {
  avx2_impl::apply(y, x, scale, shift, residual, relu);
}
void backward_reduce(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                     const std::optional<at::Tensor>& output, const at::Tensor& mean, bool relu,
                     at::Tensor& sum_dy, at::Tensor& sum_dy_xmu) {
  avx2_impl::backward_reduce(dy, x, scale, shift, output, mean, relu, sum_dy, sum_dy_xmu);
}
void backward_elemt(at::Tensor& dx, std::optional<at::Tensor>& dres, const at::Tensor& dy, const at::Tensor& x,
                    const at::Tensor& scale, const at::Tensor& shift, const std::optional<at::Tensor>& output,
                    const at::Tensor& mean, const at::Tensor& ka, const at::Tensor& kb, const at::Tensor& kc,
                    bool relu) {
  avx2_impl::backward_elemt(dx, dres, dy, x, scale, shift, output, mean, ka, kb, kc, relu);
}
}  // namespace avx2
}  // namespace cpu
}  // namespace resnet_fast

#ifdef __clang__
#pragma clang attribute pop
#endif
#pragma GCC pop_options
#endif
