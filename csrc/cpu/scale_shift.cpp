// Per-channel scale-shift (+ residual) (+ ReLU) on dense NHWC or NCHW tensors: the eval BN
// epilogue, and the bias/residual/ReLU epilogue of the fallback convolution route.
// Vectorized with at::vec, math in float for 16-bit types (one rounding at the store).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "resnet_fast.h"

namespace resnet_fast {
namespace cpu {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task: below this, threading costs more than it saves

using at::vec::Vectorized;

// y = act(x * s + t (+ r)) on one run of `n` elements with per-element s/t (NHWC: a pixel's channels).
template <typename scalar_t, typename opmath_t>
void run_channels(const scalar_t* x, const opmath_t* s, const opmath_t* t, const scalar_t* r, scalar_t* y,
                  int64_t n, bool relu) {
  using OVec = Vectorized<opmath_t>;
  const OVec zero(opmath_t(0));
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    for (; c + OVec::size() <= n; c += OVec::size()) {
      OVec v = OVec::loadu(x + c);
      if (s) v = v * OVec::loadu(s + c);
      if (t) v = v + OVec::loadu(t + c);
      if (r) v = v + OVec::loadu(r + c);
      if (relu) v = at::vec::clamp_min(v, zero);  // propagates NaN like torch.relu
      v.store(y + c);
    }
  } else {
    // 16-bit: one Vectorized<scalar_t> holds two float vectors.
    using Vec = Vectorized<scalar_t>;
    for (; c + Vec::size() <= n; c += Vec::size()) {
      auto [v0, v1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(x + c));
      if (s) {
        v0 = v0 * OVec::loadu(s + c);
        v1 = v1 * OVec::loadu(s + c + OVec::size());
      }
      if (t) {
        v0 = v0 + OVec::loadu(t + c);
        v1 = v1 + OVec::loadu(t + c + OVec::size());
      }
      if (r) {
        auto [r0, r1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(r + c));
        v0 = v0 + r0;
        v1 = v1 + r1;
      }
      if (relu) {
        v0 = at::vec::clamp_min(v0, zero);
        v1 = at::vec::clamp_min(v1, zero);
      }
      at::vec::convert_from_float<scalar_t>(v0, v1).store(y + c);
    }
  }
  for (; c < n; ++c) {
    opmath_t v = static_cast<opmath_t>(x[c]);
    if (s) v *= s[c];
    if (t) v += t[c];
    if (r) v += static_cast<opmath_t>(r[c]);
    if (relu) v = v < opmath_t(0) ? opmath_t(0) : v;  // NaN stays NaN
    y[c] = static_cast<scalar_t>(v);
  }
}

// y = act(x * s + t (+ r)) on one run of `n` elements with scalar s/t (NCHW: one channel plane).
template <typename scalar_t, typename opmath_t>
void run_plane(const scalar_t* x, opmath_t s, opmath_t t, const scalar_t* r, scalar_t* y, int64_t n, bool relu) {
  using OVec = Vectorized<opmath_t>;
  const OVec zero(opmath_t(0)), vs(s), vt(t);
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    for (; i + OVec::size() <= n; i += OVec::size()) {
      OVec v = at::vec::fmadd(OVec::loadu(x + i), vs, vt);
      if (r) v = v + OVec::loadu(r + i);
      if (relu) v = at::vec::clamp_min(v, zero);
      v.store(y + i);
    }
  } else {
    using Vec = Vectorized<scalar_t>;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      auto [v0, v1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(x + i));
      v0 = at::vec::fmadd(v0, vs, vt);
      v1 = at::vec::fmadd(v1, vs, vt);
      if (r) {
        auto [r0, r1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(r + i));
        v0 = v0 + r0;
        v1 = v1 + r1;
      }
      if (relu) {
        v0 = at::vec::clamp_min(v0, zero);
        v1 = at::vec::clamp_min(v1, zero);
      }
      at::vec::convert_from_float<scalar_t>(v0, v1).store(y + i);
    }
  }
  for (; i < n; ++i) {
    opmath_t v = static_cast<opmath_t>(x[i]) * s + t;
    if (r) v += static_cast<opmath_t>(r[i]);
    if (relu) v = v < opmath_t(0) ? opmath_t(0) : v;
    y[i] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t>
void scale_shift_kernel(at::Tensor& out, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                        const std::optional<at::Tensor>& residual, bool relu) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t channels = x.size(1);
  const int64_t numel = x.numel();
  if (numel == 0) return;
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  const scalar_t* pr = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* py = out.mutable_data_ptr<scalar_t>();
  const opmath_t* ps = scale.defined() ? scale.const_data_ptr<opmath_t>() : nullptr;
  const opmath_t* pt = shift.defined() ? shift.const_data_ptr<opmath_t>() : nullptr;

  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()) {
    // NHWC: rows of `channels` values sharing the same scale/shift vectors.
    const int64_t rows = numel / channels;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / channels), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t o = row * channels;
        run_channels<scalar_t, opmath_t>(px + o, ps, pt, pr ? pr + o : nullptr, py + o, channels, relu);
      }
    });
  } else {
    // Contiguous [N, C, *]: planes of `inner` values sharing one scale/shift.
    const int64_t inner = numel / (x.size(0) * channels);
    const int64_t planes = numel / inner;
    at::parallel_for(0, planes, std::max<int64_t>(1, kGrain / inner), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % channels, o = p * inner;
        run_plane<scalar_t, opmath_t>(px + o, ps ? ps[c] : opmath_t(1), pt ? pt[c] : opmath_t(0),
                                      pr ? pr + o : nullptr, py + o, inner, relu);
      }
    });
  }
}

}  // namespace

void scale_shift_act_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                         const std::optional<at::Tensor>& residual, bool relu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "scale_shift_act_cpu", [&] {
    scale_shift_kernel<scalar_t>(out, x, scale, shift, residual, relu);
  });
}

}  // namespace cpu
}  // namespace resnet_fast
