// The one header behind csrc/api.cpp: device-specific kernels, called only after api.cpp has
// checked shapes, dtypes and devices and made the inputs dense in one memory format.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace resnet_fast {
namespace cpu {
at::Tensor add_relu(const at::Tensor& a, const at::Tensor& b);
// Max pool (no dilation, floor mode) on a channels_last tensor, written into out when given; NaN
// propagates as in torch.
at::Tensor max_pool_cl(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                       const std::optional<at::Tensor>& out);

// out [N, Cp, H + 2 ph, W + 2 pw] (channels_last, Cp >= C) = x zero-padded in space and in channels, one pass.
void pad_cl(const at::Tensor& x, at::IntArrayRef padding, const at::Tensor& out);
// An uninitialized contiguous CPU tensor, on 2 MiB pages (madvise(MADV_HUGEPAGE)) where it spans at least
// one and the OS allows it (RESNET_FAST_HUGE_PAGES=0: never), else from torch's allocator.
at::Tensor empty_huge(at::IntArrayRef sizes, at::ScalarType dtype);
// No Inf or NaN in t (one vectorized, parallel read pass over its memory).
bool all_finite(const at::Tensor& t);
// t's memory flushed from every cache level (x86-64; elsewhere nothing): a layer's weights as a forward
// meets them, for layer_choice's timing.
void evict_from_cache(const at::Tensor& t);

// out = act(x * scale[c] + shift[c] (+ residual)); out may alias x. x, residual and out are dense in
// one memory format (contiguous or channels_last); scale/shift are undefined (1 / 0) or dense 1-D in
// x's math type (float for 16-bit and float32 x, double for float64 x).
void scale_shift_act_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                         const std::optional<at::Tensor>& residual, bool relu);

// act(conv2d(x, w) + b (+ residual)): x and residual channels_last, w dense or prepacked (mkldnn).
at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                         const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
// The same written into the residual (oneDNN's in-place binary op) where that route runs it, else fresh;
// returns what was written. The caller guarantees no one else reads the residual afterwards.
at::Tensor conv_bias_act_into_residual(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                                       const at::Tensor& residual, bool relu, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// w in the layout conv_bias_act runs fastest with (a oneDNN blocked mkldnn tensor on the oneDNN route).
at::Tensor prepack_conv_weight(const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, at::IntArrayRef input_size);

// Which convolution route runs for this dtype, and why when it is the fallback.
std::string conv_route(at::ScalarType dtype);
// "auto" (oneDNN fused ops where the running torch has them) or "aten" (always the fallback).
void set_conv_route(const std::string& route);

// A convolution (groups 1, any kernel, stride, padding, dilation) on channels_last float32 as one
// implicit GEMM with the epilogue in registers, NaN kept by its ReLU (conv_gemm.cpp; checks its own
// arguments). AVX2 + FMA CPUs only.
bool conv_gemm_supported();
// The micro-kernel those run here: "avx512f" (AVX-512F CPUs unless RESNET_FAST_CPU_ISA=avx2),
// "avx2+fma", or "none".
std::string conv_gemm_isa();
// Whether conv_gemm_bias_act takes bfloat16 here (AVX512_BF16).
bool conv_gemm_bf16_supported();
// w [Cout, Cin, KH, KW] float32 (Cout a multiple of 16) -> [Cout/16, KH, KW, Cin, 16] panels; bfloat16
// (Cin even) -> [Cout/16, KH, KW, Cin/2, 16, 2] (channel pairs). With scale (float32 [Cout]), of
// w * scale[o] (a BN fold, packed without writing the folded weight). nullopt where a packed value is not
// finite: the kernels would spread it where torch skips padding.
std::optional<at::Tensor> pack_conv_gemm_weight(const at::Tensor& w, const std::optional<at::Tensor>& scale);
// out: where to write (channels_last, the output's shape; may be the residual itself), else fresh.
at::Tensor conv_gemm_bias_act(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& b,
                              const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, const std::optional<at::Tensor>& out);
// Whether conv_amx_bias_act runs here: AMX-BF16, enabled by the OS for this process.
bool conv_amx_supported();
// The bfloat16 convolution (dilation 1, Cout a multiple of 32, Cin too or an even number below 32;
// channels contiguous, pixels read through x's strides) on AMX tiles, with
// pack_conv_gemm_weight's bfloat16 weight; same out rules as conv_gemm_bias_act. A padded layer reads a
// zero-padded copy of x (the model's plan passes one it keeps, with padding 0).
at::Tensor conv_amx_bias_act(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& b,
                             const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride,
                             at::IntArrayRef padding, const std::optional<at::Tensor>& out);
// 3x3 stride-1 convolutions by Winograd F(2x2, 3x3) or F(4x4, 3x3) (same file, same CPUs, same out
// rules). w [Cout, Cin, 3, 3] float32 -> U = G w G^T as [P, Cout/16, Cin, 16] panels, P = (tile + 2)^2;
// scale and nullopt as pack_conv_gemm_weight's (a transform mixes 9 taps: one Inf or NaN reaches a whole tile).
std::optional<at::Tensor> pack_winograd_weight(const at::Tensor& w, int64_t tile, const std::optional<at::Tensor>& scale);
// The convolution returns nullopt, before writing anything, where an input it reads is not finite (or its
// transform overflows): the caller runs another path.
std::optional<at::Tensor> conv_winograd_bias_act(const at::Tensor& x, const at::Tensor& packed,
                                                 const std::optional<at::Tensor>& b,
                                                 const std::optional<at::Tensor>& residual, bool relu,
                                                 at::IntArrayRef padding, const std::optional<at::Tensor>& out,
                                                 const std::optional<at::Tensor>& workspace);
// Float32 elements of the scratch conv_winograd_bias_act needs (its transformed input and products).
int64_t winograd_workspace_size(at::IntArrayRef x_shape, int64_t cout, at::IntArrayRef padding, int64_t tile);

// Training batch norm (batchnorm.cpp). x, dy, residual, dx, dres dense in one memory format; scale,
// shift, mean and the coefficients dense 1-D in x's math type (float, double for float64 x).
// Per-channel batch mean and biased variance (two passes per tile, Chan's combine across tiles).
std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& x);
// y = act(x * scale + shift (+ residual)), the apply pass; its arithmetic is the backward's mask's.
void bn_apply_out(at::Tensor& y, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                  const std::optional<at::Tensor>& residual, bool relu);
// Which build of the kernels runs here: "avx2+fma" or "baseline".
std::string bn_kernels_isa();
// Per-channel sums of dy' and dy' * (x - mean), dy' = dy where the forward's output > 0 (as torch's
// relu backward; the residual path passes it), else where x*scale + shift > 0 (dy' = dy without relu).
std::tuple<at::Tensor, at::Tensor> bn_backward_reduce(const at::Tensor& dy, const at::Tensor& x,
                                                      const at::Tensor& scale, const at::Tensor& shift,
                                                      const std::optional<at::Tensor>& output,
                                                      const at::Tensor& mean, bool relu);
// dx = ka[c] * dy' + kb[c] * (x - mean[c]) + kc[c]; dres = dy' when given.
void bn_backward_elemt_out(at::Tensor& dx, std::optional<at::Tensor>& dres, const at::Tensor& dy, const at::Tensor& x,
                           const at::Tensor& scale, const at::Tensor& shift,
                           const std::optional<at::Tensor>& output, const at::Tensor& mean, const at::Tensor& ka,
                           const at::Tensor& kb, const at::Tensor& kc, bool relu);
}  // namespace cpu

#ifdef WITH_CUDA
namespace cuda {
at::Tensor add_relu(const at::Tensor& a, const at::Tensor& b);
void scale_shift_act_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                         const std::optional<at::Tensor>& residual, bool relu);
at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                         const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
std::string conv_route(at::ScalarType dtype);
std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor> bn_backward_reduce(const at::Tensor& dy, const at::Tensor& x,
                                                      const at::Tensor& scale, const at::Tensor& shift,
                                                      const std::optional<at::Tensor>& output,
                                                      const at::Tensor& mean, bool relu);
void bn_backward_elemt_out(at::Tensor& dx, std::optional<at::Tensor>& dres, const at::Tensor& dy, const at::Tensor& x,
                           const at::Tensor& scale, const at::Tensor& shift,
                           const std::optional<at::Tensor>& output, const at::Tensor& mean, const at::Tensor& ka,
                           const at::Tensor& kb, const at::Tensor& kc, bool relu);
}  // namespace cuda
#endif
}  // namespace resnet_fast
