// Vectorized, parallel CPU elementwise kernels on dense tensors.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "resnet_fast.h"

namespace resnet_fast {
namespace cpu {
namespace {

constexpr int64_t kGrain = 32768;

template <typename scalar_t>
void add_relu_kernel(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    const Vec zero(scalar_t(0));
    int64_t i = begin;
    for (; i + Vec::size() <= end; i += Vec::size()) {
      // clamp_min propagates NaN like torch.relu.
      at::vec::clamp_min(Vec::loadu(a + i) + Vec::loadu(b + i), zero).store(out + i);
    }
    for (; i < end; ++i) {
      const scalar_t v = a[i] + b[i];
      out[i] = v < scalar_t(0) ? scalar_t(0) : v;
    }
  });
}

}  // namespace

at::Tensor add_relu(const at::Tensor& a, const at::Tensor& b) {
  auto out = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "add_relu_cpu", [&] {
    add_relu_kernel<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                              out.mutable_data_ptr<scalar_t>(), a.numel());
  });
  return out;
}

}  // namespace cpu
}  // namespace resnet_fast
