// Training batch norm (+ residual) (+ ReLU) on the CPU: per-channel batch statistics, the apply pass
// and the two backward passes (kernels in batchnorm_kernels.h). Runs the AVX2 + FMA build of the
// kernels (batchnorm_avx2.cpp) where the CPU has them, else this file's baseline build: the extension
// is compiled for the baseline ISA, where at::vec is plain C++ loops (~10x slower than ATen's own
// dispatched kernels).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "resnet_fast.h"

#define RF_BN_ARCH baseline
#include "batchnorm_kernels.h"
#undef RF_BN_ARCH

#include "batchnorm_avx2.h"

namespace resnet_fast {
namespace cpu {
namespace {

bool use_avx2() {
#if RF_BN_HAVE_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

}  // namespace

std::string bn_kernels_isa() { return use_avx2() ? "avx2+fma" : "baseline"; }

std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& x) {
  const auto opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
  auto mean = at::empty({x.size(1)}, opts), var = at::empty({x.size(1)}, opts);
#if RF_BN_HAVE_AVX2
  if (use_avx2()) {
    avx2::stats(x, mean, var);
    return {mean, var};
  }
#endif
  baseline::stats(x, mean, var);
  return {mean, var};
}

void bn_apply_out(at::Tensor& y, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                  const std::optional<at::Tensor>& residual, bool relu) {
#if RF_BN_HAVE_AVX2
  if (use_avx2()) return avx2::apply(y, x, scale, shift, residual, relu);
#endif
  baseline::apply(y, x, scale, shift, residual, relu);
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce(const at::Tensor& dy, const at::Tensor& x,
                                                      const at::Tensor& scale, const at::Tensor& shift,
                                                      const std::optional<at::Tensor>& output,
                                                      const at::Tensor& mean, bool relu) {
  auto sum_dy = at::empty({x.size(1)}, mean.options()), sum_dy_xmu = at::empty({x.size(1)}, mean.options());
#if RF_BN_HAVE_AVX2
  if (use_avx2()) {
    avx2::backward_reduce(dy, x, scale, shift, output, mean, relu, sum_dy, sum_dy_xmu);
    return {sum_dy, sum_dy_xmu};
  }
#endif
  baseline::backward_reduce(dy, x, scale, shift, output, mean, relu, sum_dy, sum_dy_xmu);
  return {sum_dy, sum_dy_xmu};
}

void bn_backward_elemt_out(at::Tensor& dx, std::optional<at::Tensor>& dres, const at::Tensor& dy, const at::Tensor& x,
                           const at::Tensor& scale, const at::Tensor& shift,
                           const std::optional<at::Tensor>& output, const at::Tensor& mean, const at::Tensor& ka,
                           const at::Tensor& kb, const at::Tensor& kc, bool relu) {
#if RF_BN_HAVE_AVX2
  if (use_avx2()) return avx2::backward_elemt(dx, dres, dy, x, scale, shift, output, mean, ka, kb, kc, relu);
#endif
  baseline::backward_elemt(dx, dres, dy, x, scale, shift, output, mean, ka, kb, kc, relu);
}

}  // namespace cpu
}  // namespace resnet_fast
