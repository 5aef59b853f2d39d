// Vectorized, parallel CPU elementwise kernels on dense tensors.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <atomic>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif
#include <limits>

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

#if defined(__x86_64__) || defined(_M_X64)
// Lines [begin, end) of p flushed with clflushopt (weakly ordered: the caller fences).
__attribute__((target("clflushopt"))) void flush_lines_opt(char* p, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) _mm_clflushopt(p + i * 64);
}
#endif

}  // namespace

void evict_from_cache(const at::Tensor& t) {
#if defined(__x86_64__) || defined(_M_X64)
  // Its storage's every cache line written back and dropped from all levels, as a weight is when its
  // layer runs in a forward whose weights do not fit in cache. clflushopt where the CPU has it (Zen,
  // Skylake and later): clflush serialises line by line, and flushing every candidate's weights before
  // each sample took 1.14 of a 3.6 s first call with an empty choice cache (509 MB, Xeon with AMX).
  if (!t.defined() || t.is_mkldnn() || !t.has_storage() || t.storage().data() == nullptr) return;
  char* p = static_cast<char*>(const_cast<void*>(t.storage().data()));
  const int64_t lines = static_cast<int64_t>((t.storage().nbytes() + 63) / 64);
  static const bool opt = __builtin_cpu_supports("clflushopt");
  at::parallel_for(0, lines, 4096, [&](int64_t begin, int64_t end) {
    if (opt) {
      flush_lines_opt(p, begin, end);
    } else {
      for (int64_t i = begin; i < end; ++i) _mm_clflush(p + i * 64);
    }
    _mm_mfence();
  });
  _mm_mfence();
#endif
}

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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The float32 and bfloat16 max pool with AVX2 (this extension's portable at::vec builds without it), 8 channels
// per step. A NaN wins, as in torch.
// 8 channels of a pixel as float32: float as is, bfloat16 (T = uint16_t) widened exactly.
__attribute__((target("avx2"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2"))) inline __m256 load8(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
__attribute__((target("avx2"))) inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
// A maximum of bfloat16 values is one of them (NaN included): the upper halves are exact.
__attribute__((target("avx2"))) inline void store8(uint16_t* p, __m256 v) {
  const __m256i high = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

template <typename T>
__attribute__((target("avx2"))) void max_pool_pixels(const T* xp, T* op, int64_t c, int64_t h, int64_t w,
                                                     int64_t oh, int64_t ow, const int64_t* k, const int64_t* s,
                                                     const int64_t* p, int64_t begin, int64_t end) {
  for (int64_t pix = begin; pix < end; ++pix) {
    const int64_t img = pix / (oh * ow), oy = (pix / ow) % oh, ox = pix % ow;
    const int64_t y0 = std::max<int64_t>(0, oy * s[0] - p[0]), y1 = std::min(h, oy * s[0] - p[0] + k[0]);
    const int64_t x0 = std::max<int64_t>(0, ox * s[1] - p[1]), x1 = std::min(w, ox * s[1] - p[1] + k[1]);
    for (int64_t ch = 0; ch < c; ch += 8) {
      // The maximum of the non-NaN values (vmaxps), NaN where any value was NaN (vmaxps alone would let
      // a later number replace a NaN already in acc): 3 instructions a value instead of 5 (compare,
      // NaN test, or, blend).
      __m256 acc = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), nan_seen = _mm256_setzero_ps();
      for (int64_t iy = y0; iy < y1; ++iy) {
        for (int64_t ix = x0; ix < x1; ++ix) {
          const __m256 v = load8(xp + ((img * h + iy) * w + ix) * c + ch);
          nan_seen = _mm256_or_ps(nan_seen, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
          acc = _mm256_max_ps(acc, v);
        }
      }
      store8(op + pix * c + ch, _mm256_blendv_ps(acc, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), nan_seen));
    }
  }
}

// float32, or bfloat16 (the generic path below is scalar in this build: 39 ms of a batch-8 ResNet-50
// forward's 254 on the Zen 4).
template <typename T>
void max_pool_avx2(const T* xp, T* op, int64_t n, int64_t c, int64_t h, int64_t w, int64_t oh, int64_t ow,
                   at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding) {
  at::parallel_for(0, n * oh * ow, std::max<int64_t>(1, 4096 / c), [&](int64_t begin, int64_t end) {
    max_pool_pixels(xp, op, c, h, w, oh, ow, kernel.data(), stride.data(), padding.data(), begin, end);
  });
}
#endif

namespace {
// w pixels of c elements -> w pixels of cp, the extra ones zero (T: an unsigned type of the element's size).
template <typename T>
inline __attribute__((always_inline)) void pad_pixels(const T* src, T* dst, int64_t w, int64_t c, int64_t cp) {
  for (int64_t i = 0; i < w; ++i) {
    for (int64_t ch = 0; ch < c; ++ch) dst[i * cp + ch] = src[i * c + ch];
    for (int64_t ch = c; ch < cp; ++ch) dst[i * cp + ch] = 0;
  }
}
}  // namespace

void pad_cl(const at::Tensor& x, at::IntArrayRef padding, const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 4 && out.dim() == 4 && padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
              "pad_cl: expected 4-D x and out and 2 paddings");
  TORCH_CHECK(x.element_size() == 2 || x.element_size() == 4 || x.element_size() == 8,
              "pad_cl: expected elements of 2, 4 or 8 bytes, got ", x.scalar_type());
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), ph = padding[0], pw = padding[1];
  const int64_t cp = out.size(1), hp = h + 2 * ph, wp = w + 2 * pw;
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.device().is_cpu() && x.device().is_cpu() &&
                  out.size(0) == n && cp >= c && out.size(2) == hp && out.size(3) == wp &&
                  out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "pad_cl: out must be a channels_last CPU tensor [N, >= C, H + 2 ph, W + 2 pw] of x's dtype, got ",
              out.sizes(), " for x ", x.sizes());
  at::assert_no_overlap(out, x);
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t size = x.element_size();
  const char* xp = static_cast<const char*>(xc.const_data_ptr());
  char* op = static_cast<char*>(out.mutable_data_ptr());
  // One pass over out, row by row: zeros for the padding rows and columns and the channels past C, x's
  // pixels in between (a channels_last row of x is one block when cp == c).
  at::parallel_for(0, n * hp, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t img = r / hp, y = r % hp - ph;
      char* row = op + r * wp * cp * size;
      if (y < 0 || y >= h) {
        std::memset(row, 0, wp * cp * size);
        continue;
      }
      std::memset(row, 0, pw * cp * size);
      std::memset(row + (pw + w) * cp * size, 0, pw * cp * size);
      const char* src = xp + (img * h + y) * w * c * size;
      char* dst = row + pw * cp * size;
      if (cp == c) {
        std::memcpy(dst, src, w * c * size);
      } else if (size == 2 && c == 3 && cp == 4) {  // the bfloat16 stem: fixed sizes, so the loop unrolls
        pad_pixels(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<uint16_t*>(dst), w, int64_t{3}, int64_t{4});
      } else if (size == 2) {
        pad_pixels(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<uint16_t*>(dst), w, c, cp);
      } else if (size == 4) {
        pad_pixels(reinterpret_cast<const uint32_t*>(src), reinterpret_cast<uint32_t*>(dst), w, c, cp);
      } else {
        pad_pixels(reinterpret_cast<const uint64_t*>(src), reinterpret_cast<uint64_t*>(dst), w, c, cp);
      }
    }
  });
}

at::Tensor max_pool_cl(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                       const std::optional<at::Tensor>& out_) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && at::isFloatingType(x.scalar_type()),
              "max_pool_cl: expected a channels_last floating-point [N, C, H, W] tensor, got ", x.scalar_type(), " ",
              x.sizes());
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && kernel[0] >= 1 && kernel[1] >= 1 &&
                  stride[0] >= 1 && stride[1] >= 1 && padding[0] >= 0 && padding[1] >= 0 &&
                  2 * padding[0] <= kernel[0] && 2 * padding[1] <= kernel[1],
              "max_pool_cl: kernel and stride must be 2 values >= 1, padding 2 values at most half the kernel");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t oh = (h + 2 * padding[0] - kernel[0]) / stride[0] + 1;
  const int64_t ow = (w + 2 * padding[1] - kernel[1]) / stride[1] + 1;
  TORCH_CHECK(oh >= 1 && ow >= 1, "max_pool_cl: input ", x.sizes(), " is smaller than the kernel");
  at::Tensor out;
  if (out_.has_value()) {
    out = *out_;
    TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.device() == x.device() &&
                    out.sizes() == at::IntArrayRef({n, c, oh, ow}) && out.is_contiguous(at::MemoryFormat::ChannelsLast),
                "max_pool_cl: out must be a channels_last tensor of the output's shape and the input's dtype");
    at::assert_no_overlap(out, x);
  } else {
    out = at::empty({n, c, oh, ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (c % 8 == 0 && __builtin_cpu_supports("avx2")) {
    if (x.scalar_type() == at::kFloat) {
      max_pool_avx2(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), n, c, h, w, oh, ow, kernel, stride,
                    padding);
      return out;
    }
    if (x.scalar_type() == at::kBFloat16) {
      max_pool_avx2(static_cast<const uint16_t*>(x.const_data_ptr()), static_cast<uint16_t*>(out.mutable_data_ptr()),
                    n, c, h, w, oh, ow, kernel, stride, padding);
      return out;
    }
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "max_pool_cl", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n * oh * ow, std::max<int64_t>(1, 4096 / c), [&](int64_t begin, int64_t end) {
      for (int64_t pix = begin; pix < end; ++pix) {
        const int64_t img = pix / (oh * ow), oy = (pix / ow) % oh, ox = pix % ow;
        const int64_t y0 = std::max<int64_t>(0, oy * stride[0] - padding[0]);
        const int64_t y1 = std::min(h, oy * stride[0] - padding[0] + kernel[0]);
        const int64_t x0 = std::max<int64_t>(0, ox * stride[1] - padding[1]);
        const int64_t x1 = std::min(w, ox * stride[1] - padding[1] + kernel[1]);
        for (int64_t ch = 0; ch < c; ch += Vec::size()) {
          const int64_t count = std::min<int64_t>(Vec::size(), c - ch);
          // at::vec::maximum propagates NaN, as torch's max pool does; padding never wins.
          Vec acc(-std::numeric_limits<scalar_t>::infinity());
          for (int64_t iy = y0; iy < y1; ++iy)
            for (int64_t ix = x0; ix < x1; ++ix)
              acc = at::vec::maximum(acc, Vec::loadu(xp + ((img * h + iy) * w + ix) * c + ch, count));
          acc.store(op + pix * c + ch, count);
        }
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace resnet_fast
