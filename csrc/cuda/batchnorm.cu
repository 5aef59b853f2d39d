// Training batch norm on CUDA (the cpp backend's GPU path, used when Triton is missing): per-channel
// batch statistics and the two backward passes. The forward apply is scale_shift_act_out (epilogue.cu).
//
// Reductions: blocks of 32 channels x 8 row groups over a tile of rows (threads along x read
// consecutive NHWC channels, coalesced); each thread runs Welford over its rows of x - pivot (pivot =
// the channel's first value, so float means stay exact enough when |mean| >> std), the 8 row groups
// merge with Chan's formula in shared memory, tiles write partials [tiles, C], and a second kernel
// merges the tiles per channel in double. Never E[x^2] - E[x]^2. int64 offsets throughout.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "resnet_fast.h"

namespace resnet_fast {
namespace cuda {
namespace {

constexpr int kCh = 32;    // channels per block (threadIdx.x)
constexpr int kRows = 8;   // row groups per block (threadIdx.y)

// Element (row, c) of x viewed as [rows = N * inner, C]: NHWC is rows of C; [N, C, *] is strided.
struct Index {
  int64_t channels, inner;
  bool nhwc;
  __device__ __forceinline__ int64_t operator()(int64_t row, int64_t c) const {
    if (nhwc) return row * channels + c;
    const int64_t n = row / inner;
    return (n * channels + c) * inner + (row - n * inner);
  }
  __device__ __forceinline__ int64_t channel(int64_t i) const { return nhwc ? i % channels : (i / inner) % channels; }
};

Index make_index(const at::Tensor& x) {
  const bool nhwc = x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  return {x.size(1), x.numel() / (x.size(0) * x.size(1)), nhwc};
}

struct Tiling {
  int64_t tiles, tile_rows;
};

Tiling make_tiling(int64_t rows, int64_t channels) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t cblocks = (channels + kCh - 1) / kCh;
  const int64_t want = std::max<int64_t>(1, 4 * sms / cblocks);  // about 4 blocks per SM
  int64_t tile_rows = std::max<int64_t>(kRows, (rows + want - 1) / want);
  tile_rows = (tile_rows + kRows - 1) / kRows * kRows;
  return {(rows + tile_rows - 1) / tile_rows, tile_rows};
}

template <typename acc_t>
__device__ __forceinline__ void merge(acc_t& n, acc_t& mean, acc_t& m2, acc_t n2, acc_t mean2, acc_t m22) {
  if (n2 == acc_t(0)) return;
  const acc_t total = n + n2;
  const acc_t delta = mean2 - mean;
  mean += delta * n2 / total;
  m2 += m22 + delta * delta * n * n2 / total;
  n = total;
}

template <typename scalar_t, typename acc_t>
__global__ void stats_tiles(const scalar_t* __restrict__ x, Index idx, int64_t rows, int64_t tile_rows,
                            acc_t* __restrict__ tmean, acc_t* __restrict__ tm2, acc_t* __restrict__ tcount) {
  __shared__ acc_t sn[kRows][kCh], sm[kRows][kCh], sq[kRows][kCh];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCh + threadIdx.x;
  const int64_t tile = blockIdx.y;
  const int64_t r0 = tile * tile_rows, r1 = min(rows, r0 + tile_rows);
  acc_t n = 0, mean = 0, m2 = 0;
  if (c < idx.channels) {
    const acc_t pivot = static_cast<acc_t>(x[idx(0, c)]);
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRows) {  // Welford
      const acc_t v = static_cast<acc_t>(x[idx(r, c)]) - pivot;
      n += acc_t(1);
      const acc_t d = v - mean;
      mean += d / n;
      m2 += d * (v - mean);
    }
  }
  sn[threadIdx.y][threadIdx.x] = n;
  sm[threadIdx.y][threadIdx.x] = mean;
  sq[threadIdx.y][threadIdx.x] = m2;
  __syncthreads();
  if (threadIdx.y == 0 && c < idx.channels) {
    for (int k = 1; k < kRows; ++k) merge(n, mean, m2, sn[k][threadIdx.x], sm[k][threadIdx.x], sq[k][threadIdx.x]);
    tmean[tile * idx.channels + c] = mean;
    tm2[tile * idx.channels + c] = m2;
    tcount[tile * idx.channels + c] = n;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void stats_combine(const scalar_t* __restrict__ x, Index idx, const acc_t* __restrict__ tmean,
                              const acc_t* __restrict__ tm2, const acc_t* __restrict__ tcount, int64_t tiles,
                              acc_t* __restrict__ mean_out, acc_t* __restrict__ var_out) {
  const int64_t channels = idx.channels;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double n = 0, mean = 0, m2 = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    merge<double>(n, mean, m2, tcount[t * channels + c], tmean[t * channels + c], tm2[t * channels + c]);
  }
  mean_out[c] = static_cast<acc_t>(static_cast<double>(static_cast<acc_t>(x[idx(0, c)])) + mean);
  var_out[c] = static_cast<acc_t>(m2 / n);
}

// dy masked by the ReLU as torch's relu backward masks it (0 where the pre-activation <= 0, dy
// elsewhere, NaN included): the forward output y when it is given (the residual path passes it), else
// the recomputed x*s + t, written as scale_shift_act's (epilogue.cu) so nvcc contracts it the same
// way and the mask is the forward's.
template <typename acc_t>
__device__ __forceinline__ acc_t recomputed_pre(acc_t x, acc_t s, acc_t t) {
  acc_t pre = x;
  pre *= s;
  pre += t;
  return pre;
}

template <typename scalar_t, typename acc_t>
struct Bwd {
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* y;  // the forward output, or nullptr
  const acc_t* s;
  const acc_t* t;
  const acc_t* mean;
  bool relu;
  __device__ __forceinline__ acc_t grad(int64_t o, int64_t c, acc_t xv) const {
    const acc_t g = static_cast<acc_t>(dy[o]);
    if (!relu) return g;
    const acc_t pre = y ? static_cast<acc_t>(y[o]) : recomputed_pre(xv, s[c], t[c]);
    return pre <= acc_t(0) ? acc_t(0) : g;  // as torch's relu backward: a NaN output passes dy on
  }
};

template <typename scalar_t, typename acc_t>
__global__ void reduce_tiles(Bwd<scalar_t, acc_t> a, Index idx, int64_t rows, int64_t tile_rows,
                             acc_t* __restrict__ ta, acc_t* __restrict__ tb) {
  __shared__ acc_t sa[kRows][kCh], sb[kRows][kCh];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCh + threadIdx.x;
  const int64_t tile = blockIdx.y;
  const int64_t r0 = tile * tile_rows, r1 = min(rows, r0 + tile_rows);
  acc_t acc_a = 0, acc_b = 0;
  if (c < idx.channels) {
    const acc_t m = a.mean[c];
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRows) {
      const int64_t o = idx(r, c);
      const acc_t xv = static_cast<acc_t>(a.x[o]);
      const acc_t g = a.grad(o, c, xv);
      acc_a += g;
      acc_b += g * (xv - m);
    }
  }
  sa[threadIdx.y][threadIdx.x] = acc_a;
  sb[threadIdx.y][threadIdx.x] = acc_b;
  __syncthreads();
  if (threadIdx.y == 0 && c < idx.channels) {
    for (int k = 1; k < kRows; ++k) {
      acc_a += sa[k][threadIdx.x];
      acc_b += sb[k][threadIdx.x];
    }
    ta[tile * idx.channels + c] = acc_a;
    tb[tile * idx.channels + c] = acc_b;
  }
}

template <typename acc_t>
__global__ void reduce_combine(const acc_t* __restrict__ ta, const acc_t* __restrict__ tb, int64_t tiles,
                               int64_t channels, acc_t* __restrict__ out_a, acc_t* __restrict__ out_b) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double a = 0, b = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    a += ta[t * channels + c];
    b += tb[t * channels + c];
  }
  out_a[c] = static_cast<acc_t>(a);
  out_b[c] = static_cast<acc_t>(b);
}

template <typename scalar_t, typename acc_t>
__global__ void elemt_kernel(Bwd<scalar_t, acc_t> a, Index idx, int64_t numel, const acc_t* __restrict__ ka,
                             const acc_t* __restrict__ kb, const acc_t* __restrict__ kc, scalar_t* __restrict__ dx,
                             scalar_t* __restrict__ dres) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const int64_t c = idx.channel(i);
    const acc_t xv = static_cast<acc_t>(a.x[i]);
    const acc_t g = a.grad(i, c, xv);
    dx[i] = static_cast<scalar_t>(ka[c] * g + kb[c] * (xv - a.mean[c]) + kc[c]);
    if (dres) dres[i] = static_cast<scalar_t>(g);
  }
}

template <typename scalar_t, typename acc_t>
Bwd<scalar_t, acc_t> bwd_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale,
                              const at::Tensor& shift, const std::optional<at::Tensor>& output,
                              const at::Tensor& mean, bool relu) {
  return {dy.const_data_ptr<scalar_t>(),
          x.const_data_ptr<scalar_t>(),
          output.has_value() ? output->const_data_ptr<scalar_t>() : nullptr,
          scale.const_data_ptr<acc_t>(),
          shift.const_data_ptr<acc_t>(),
          mean.const_data_ptr<acc_t>(),
          relu};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& x) {
  const auto idx = make_index(x);
  const int64_t rows = x.numel() / idx.channels;
  const auto tiling = make_tiling(rows, idx.channels);
  const auto opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
  auto mean = at::empty({idx.channels}, opts), var = at::empty({idx.channels}, opts);
  auto partial = at::empty({3, tiling.tiles, idx.channels}, opts);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* p = partial.mutable_data_ptr<acc_t>();
    const int64_t plane = tiling.tiles * idx.channels;
    const dim3 grid((idx.channels + kCh - 1) / kCh, tiling.tiles);
    stats_tiles<scalar_t, acc_t><<<grid, dim3(kCh, kRows), 0, stream>>>(x.const_data_ptr<scalar_t>(), idx, rows,
                                                                         tiling.tile_rows, p, p + plane, p + 2 * plane);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    stats_combine<scalar_t, acc_t><<<(idx.channels + 127) / 128, 128, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), idx, p, p + plane, p + 2 * plane, tiling.tiles, mean.mutable_data_ptr<acc_t>(),
        var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce(const at::Tensor& dy, const at::Tensor& x,
                                                      const at::Tensor& scale, const at::Tensor& shift,
                                                      const std::optional<at::Tensor>& output,
                                                      const at::Tensor& mean, bool relu) {
  const auto idx = make_index(x);
  const int64_t rows = x.numel() / idx.channels;
  const auto tiling = make_tiling(rows, idx.channels);
  auto sum_dy = at::empty({idx.channels}, mean.options()), sum_dy_xmu = at::empty({idx.channels}, mean.options());
  auto partial = at::empty({2, tiling.tiles, idx.channels}, mean.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* p = partial.mutable_data_ptr<acc_t>();
    const int64_t plane = tiling.tiles * idx.channels;
    const dim3 grid((idx.channels + kCh - 1) / kCh, tiling.tiles);
    reduce_tiles<scalar_t, acc_t><<<grid, dim3(kCh, kRows), 0, stream>>>(
        bwd_args<scalar_t, acc_t>(dy, x, scale, shift, output, mean, relu), idx, rows, tiling.tile_rows, p,
        p + plane);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reduce_combine<acc_t><<<(idx.channels + 127) / 128, 128, 0, stream>>>(
        p, p + plane, tiling.tiles, idx.channels, sum_dy.mutable_data_ptr<acc_t>(),
        sum_dy_xmu.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_dy, sum_dy_xmu};
}

void bn_backward_elemt_out(at::Tensor& dx, std::optional<at::Tensor>& dres, const at::Tensor& dy, const at::Tensor& x,
                           const at::Tensor& scale, const at::Tensor& shift,
                           const std::optional<at::Tensor>& output, const at::Tensor& mean, const at::Tensor& ka,
                           const at::Tensor& kb, const at::Tensor& kc, bool relu) {
  const auto idx = make_index(x);
  const int64_t numel = x.numel();
  constexpr int kThreads = 256;
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int blocks = static_cast<int>(std::min<int64_t>(max_blocks, (numel + kThreads - 1) / kThreads));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_backward_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    elemt_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        bwd_args<scalar_t, acc_t>(dy, x, scale, shift, output, mean, relu), idx, numel, ka.const_data_ptr<acc_t>(),
        kb.const_data_ptr<acc_t>(), kc.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(),
        dres.has_value() ? dres->mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace resnet_fast
