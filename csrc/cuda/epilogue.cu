// CUDA per-channel scale-shift (+ residual) (+ ReLU) on dense NHWC or NCHW tensors: the eval BN
// epilogue and the epilogue of the unfused convolution route. 128-bit loads when aligned,
// opmath (float, double for float64) arithmetic, int64 indexing.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "pack.cuh"
#include "resnet_fast.h"

namespace resnet_fast {
namespace cuda {
namespace {

// Channel of flat element i: NHWC i % C; NCHW (i / inner) % C.
struct ChannelOf {
  int64_t channels, inner;
  bool channels_last;
  __device__ int64_t operator()(int64_t i) const {
    return channels_last ? i % channels : (i / inner) % channels;
  }
};

template <typename scalar_t, typename opmath_t, int kVec>
__global__ void scale_shift_kernel(const scalar_t* x, const opmath_t* __restrict__ scale,
                                   const opmath_t* __restrict__ shift, const scalar_t* __restrict__ res,
                                   scalar_t* out, int64_t n, ChannelOf channel_of, bool relu) {
  using P = Pack<scalar_t, kVec>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n_packs = n / kVec;
  auto apply = [&](scalar_t xv, scalar_t rv, int64_t i) -> scalar_t {
    const int64_t c = channel_of(i);
    opmath_t v = static_cast<opmath_t>(xv);
    if (scale != nullptr) v *= scale[c];
    if (shift != nullptr) v += shift[c];
    if (res != nullptr) v += static_cast<opmath_t>(rv);
    if (relu) v = v < opmath_t(0) ? opmath_t(0) : v;  // NaN stays NaN, like torch.relu
    return static_cast<scalar_t>(v);
  };
  // out may alias x (in-place epilogue): each element is read before it is written, by one thread.
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < n_packs; p += stride) {
    const P px = reinterpret_cast<const P*>(x)[p];
    P pr;
    if (res != nullptr) pr = reinterpret_cast<const P*>(res)[p];
    P po;
#pragma unroll
    for (int k = 0; k < kVec; ++k) po.v[k] = apply(px.v[k], res != nullptr ? pr.v[k] : scalar_t(0), p * kVec + k);
    reinterpret_cast<P*>(out)[p] = po;
  }
  for (int64_t i = n_packs * kVec + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = apply(x[i], res != nullptr ? res[i] : scalar_t(0), i);
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void scale_shift_act_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                         const std::optional<at::Tensor>& residual, bool relu) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const int64_t channels = x.size(1);
  const bool channels_last = x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  const ChannelOf channel_of{channels, n / (x.size(0) * channels), channels_last};
  constexpr int kThreads = 256;
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "scale_shift_act_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto* px = x.const_data_ptr<scalar_t>();
    const auto* pr = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    const auto* ps = scale.defined() ? scale.const_data_ptr<opmath_t>() : nullptr;
    const auto* pt = shift.defined() ? shift.const_data_ptr<opmath_t>() : nullptr;
    auto* po = out.mutable_data_ptr<scalar_t>();
    const bool vec = aligned16(px) && aligned16(pr) && aligned16(po);
    const int v = vec ? kVec : 1;
    const int blocks = static_cast<int>(std::min<int64_t>(max_blocks, (n / v + kThreads - 1) / kThreads + 1));
    if (vec) {
      scale_shift_kernel<scalar_t, opmath_t, kVec>
          <<<blocks, kThreads, 0, stream>>>(px, ps, pt, pr, po, n, channel_of, relu);
    } else {
      scale_shift_kernel<scalar_t, opmath_t, 1><<<blocks, kThreads, 0, stream>>>(px, ps, pt, pr, po, n, channel_of, relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace resnet_fast
