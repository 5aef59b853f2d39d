// Vectorized, parallel CPU elementwise kernels on dense tensors.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <atomic>

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

// Count of elements whose exponent bits are all set (Inf or NaN), on the raw bits: integer
// compares reorder freely, so the compiler vectorizes the loop.
template <typename bits_t>
int64_t count_nonfinite(const bits_t* p, int64_t n, bits_t exponent) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += (p[i] & exponent) == exponent;
  return count;
}

template <typename bits_t>
bool all_finite_bits(const void* data, int64_t n, bits_t exponent) {
  const auto* p = static_cast<const bits_t*>(data);
  std::atomic<bool> finite{true};
  at::parallel_for(0, n, 4 * kGrain, [&](int64_t begin, int64_t end) {
    if (count_nonfinite<bits_t>(p + begin, end - begin, exponent) != 0) finite.store(false);
  });
  return finite.load();
}

}  // namespace

bool all_finite(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return true;
  if (!t.is_non_overlapping_and_dense()) return all_finite(t.contiguous());
  // Dense: the elements fill [data_ptr, data_ptr + numel) in some order, which a scan does not care about.
  switch (t.scalar_type()) {
    case at::kFloat:
      return all_finite_bits<uint32_t>(t.const_data_ptr(), t.numel(), 0x7F800000u);
    case at::kDouble:
      return all_finite_bits<uint64_t>(t.const_data_ptr(), t.numel(), 0x7FF0000000000000ull);
    case at::kBFloat16:
      return all_finite_bits<uint16_t>(t.const_data_ptr(), t.numel(), 0x7F80);
    case at::kHalf:
      return all_finite_bits<uint16_t>(t.const_data_ptr(), t.numel(), 0x7C00);
    default:
      return at::isfinite(t).all().item<bool>();
  }
}

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
