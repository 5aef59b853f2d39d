// CUDA elementwise kernels: 128-bit loads when aligned, fp32 math, int64 indexing.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "pack.cuh"
#include "resnet_fast.h"

namespace resnet_fast {
namespace cuda {
namespace {

template <typename scalar_t, int kVec>
__global__ void add_relu_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                scalar_t* __restrict__ out, int64_t n) {
  using P = Pack<scalar_t, kVec>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n_packs = n / kVec;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < n_packs; p += stride) {
    const P pa = reinterpret_cast<const P*>(a)[p];
    const P pb = reinterpret_cast<const P*>(b)[p];
    P po;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float v = static_cast<float>(pa.v[k]) + static_cast<float>(pb.v[k]);
      po.v[k] = static_cast<scalar_t>(v < 0.f ? 0.f : v);
    }
    reinterpret_cast<P*>(out)[p] = po;
  }
  // The tail that does not fill a pack.
  for (int64_t i = n_packs * kVec + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float v = static_cast<float>(a[i]) + static_cast<float>(b[i]);
    out[i] = static_cast<scalar_t>(v < 0.f ? 0.f : v);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

at::Tensor add_relu(const at::Tensor& a, const at::Tensor& b) {
  auto out = at::empty_like(a);
  const int64_t n = a.numel();
  if (n == 0) return out;
  constexpr int kThreads = 256;
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "add_relu_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t) > 0 ? 16 / sizeof(scalar_t) : 1;
    const auto* pa = a.const_data_ptr<scalar_t>();
    const auto* pb = b.const_data_ptr<scalar_t>();
    auto* po = out.mutable_data_ptr<scalar_t>();
    const bool vec = aligned16(pa) && aligned16(pb) && aligned16(po);
    const int v = vec ? kVec : 1;
    const int blocks = static_cast<int>(std::min<int64_t>(max_blocks, (n / v + kThreads - 1) / kThreads + 1));
    if (vec) {
      add_relu_kernel<scalar_t, kVec><<<blocks, kThreads, 0, stream>>>(pa, pb, po, n);
    } else {
      add_relu_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(pa, pb, po, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace cuda
}  // namespace resnet_fast
