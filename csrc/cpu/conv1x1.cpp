// A 1x1 convolution (groups 1, no padding, stride s) on channels_last float32 as one GEMM with the
// epilogue in registers: out[m, :] = act(x[pixel(m), :] @ W^T + b (+ residual[m, :])).
//
// Why our own: in ResNet-50 36 of 53 convolutions are 1x1, and oneDNN (as torch calls it) runs them
// below what onnxruntime's MLAS reaches on the same CPU; its ReLU post-op also maps NaN to 0, so the
// oneDNN route has to scan inputs for NaN first. Here the ReLU is max(0, v) with NaN kept (vmaxps
// returns its second operand when either is NaN), so no scan is needed.
//
// Layout: the weight [Cout, Cin] is packed once into panels of 16 output channels, [Cout/16][Cin][16].
// The micro-kernel keeps a 6 x 16 tile of the output in 12 AVX registers and walks K in blocks of
// KC (B panel block in L1, A rows in L2); blocks before the last store raw sums, the last adds the
// bias and residual and applies the ReLU. AVX2 + FMA only, chosen at run time; callers check
// conv1x1_supported() and otherwise take the oneDNN route.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <string>

#include "resnet_fast.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define RF_HAVE_CONV1X1 1
#else
#define RF_HAVE_CONV1X1 0
#endif

namespace resnet_fast {
namespace cpu {
namespace {

constexpr int64_t MR = 6;    // output rows (pixels) per micro-tile
constexpr int64_t NR = 16;   // output channels per micro-tile (two 8-float registers)
constexpr int64_t KC = 256;  // K block: a 16 KB B panel block, A rows of one tile in L2
constexpr int64_t MT = 96;   // rows per task: 16 micro-tiles reuse each B panel block from L1

bool cpu_has_avx2_fma() {
#if RF_HAVE_CONV1X1
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

#if RF_HAVE_CONV1X1
// One MR x NR tile over k in [0, kc): a[i] points at row i's x at this K block, bp at the panel's
// K block ([kc][16]), c[i] at row i's output for this panel. Rows past `rows` repeat the last valid
// row's pointers (loads stay in bounds) and are not stored.
__attribute__((target("avx2,fma"))) void micro_tile(const float* const* a, int64_t kc, const float* bp,
                                                   float* const* c, int64_t rows, bool first, bool last,
                                                   const float* bias, const float* const* res, bool relu) {
  // The first K block starts from bias (+ residual), so the residual is read before any write to c:
  // c may be the residual itself (in place); later blocks continue from c's partial sums.
  __m256 acc[MR][2];
  const __m256 zero = _mm256_setzero_ps();
  const __m256 bias0 = bias ? _mm256_loadu_ps(bias) : zero;
  const __m256 bias1 = bias ? _mm256_loadu_ps(bias + 8) : zero;
#pragma GCC unroll 6
  for (int64_t i = 0; i < MR; ++i) {
    if (first) {
      acc[i][0] = res ? _mm256_add_ps(bias0, _mm256_loadu_ps(res[i])) : bias0;
      acc[i][1] = res ? _mm256_add_ps(bias1, _mm256_loadu_ps(res[i] + 8)) : bias1;
    } else {
      acc[i][0] = _mm256_loadu_ps(c[i]);
      acc[i][1] = _mm256_loadu_ps(c[i] + 8);
    }
  }
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(bp + k * NR);
    const __m256 b1 = _mm256_load_ps(bp + k * NR + 8);
    __m256 v = _mm256_broadcast_ss(a0 + k);
    acc[0][0] = _mm256_fmadd_ps(v, b0, acc[0][0]);
    acc[0][1] = _mm256_fmadd_ps(v, b1, acc[0][1]);
    v = _mm256_broadcast_ss(a1 + k);
    acc[1][0] = _mm256_fmadd_ps(v, b0, acc[1][0]);
    acc[1][1] = _mm256_fmadd_ps(v, b1, acc[1][1]);
    v = _mm256_broadcast_ss(a2 + k);
    acc[2][0] = _mm256_fmadd_ps(v, b0, acc[2][0]);
    acc[2][1] = _mm256_fmadd_ps(v, b1, acc[2][1]);
    v = _mm256_broadcast_ss(a3 + k);
    acc[3][0] = _mm256_fmadd_ps(v, b0, acc[3][0]);
    acc[3][1] = _mm256_fmadd_ps(v, b1, acc[3][1]);
    v = _mm256_broadcast_ss(a4 + k);
    acc[4][0] = _mm256_fmadd_ps(v, b0, acc[4][0]);
    acc[4][1] = _mm256_fmadd_ps(v, b1, acc[4][1]);
    v = _mm256_broadcast_ss(a5 + k);
    acc[5][0] = _mm256_fmadd_ps(v, b0, acc[5][0]);
    acc[5][1] = _mm256_fmadd_ps(v, b1, acc[5][1]);
  }
  if (last && relu) {  // max(0, v): NaN in the second operand is returned, as torch.relu keeps it
#pragma GCC unroll 6
    for (int64_t i = 0; i < MR; ++i) {
      acc[i][0] = _mm256_max_ps(zero, acc[i][0]);
      acc[i][1] = _mm256_max_ps(zero, acc[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int64_t i = 0; i < MR; ++i) {  // constant trip counts only: acc stays in registers
    if (i < rows) {
      _mm256_storeu_ps(c[i], acc[i][0]);
      _mm256_storeu_ps(c[i] + 8, acc[i][1]);
    }
  }
}
#endif

void check_args(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& b,
                const std::optional<at::Tensor>& residual, int64_t stride) {
  TORCH_CHECK(conv1x1_supported(), "conv1x1_bias_act: this CPU has no AVX2 + FMA (or this build no x86-64 kernel)");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
              "conv1x1_bias_act: expected a 4-D float32 CPU input, got ", x.scalar_type(), " on ", x.device(),
              " with ", x.dim(), " dims");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "conv1x1_bias_act: x must be channels_last");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == NR && packed.size(1) == x.size(1) &&
                  packed.scalar_type() == at::kFloat && packed.is_contiguous(),
              "conv1x1_bias_act: weight not packed by pack_conv1x1_weight for ", x.size(1), " input channels");
  TORCH_CHECK(stride >= 1, "conv1x1_bias_act: stride must be >= 1");
  const int64_t cout = packed.size(0) * NR;
  if (b.has_value()) {
    TORCH_CHECK(b->scalar_type() == at::kFloat && b->numel() == cout && b->is_contiguous() && b->device().is_cpu(),
                "conv1x1_bias_act: b must be a contiguous float32 CPU tensor of ", cout, " values");
  }
  if (residual.has_value()) {
    const int64_t oh = (x.size(2) - 1) / stride + 1, ow = (x.size(3) - 1) / stride + 1;
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->device().is_cpu() &&
                    residual->sizes() == at::IntArrayRef({x.size(0), cout, oh, ow}) &&
                    residual->is_contiguous(at::MemoryFormat::ChannelsLast),
                "conv1x1_bias_act: residual must be a channels_last float32 CPU tensor of the output's shape");
  }
}

}  // namespace

bool conv1x1_supported() { return RF_HAVE_CONV1X1 && cpu_has_avx2_fma(); }

at::Tensor pack_conv1x1_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1 && w.scalar_type() == at::kFloat,
              "pack_conv1x1_weight: expected a float32 [Cout, Cin, 1, 1] weight, got ", w.sizes(), " ",
              w.scalar_type());
  TORCH_CHECK(w.size(0) % NR == 0, "pack_conv1x1_weight: Cout must be a multiple of ", NR, ", got ", w.size(0));
  // [Cout, Cin] -> [Cout/16, 16, Cin] -> [Cout/16, Cin, 16]
  return w.reshape({w.size(0) / NR, NR, w.size(1)}).transpose(1, 2).contiguous();
}

at::Tensor conv1x1_bias_act(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& b,
                            const std::optional<at::Tensor>& residual, bool relu, int64_t stride, bool inplace) {
  check_args(x, packed, b, residual, stride);
  TORCH_CHECK(!inplace || residual.has_value(), "conv1x1_bias_act: inplace needs a residual to write into");
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t oh = (h - 1) / stride + 1, ow = (w - 1) / stride + 1;
  const int64_t panels = packed.size(0), cout = panels * NR, m_total = n * oh * ow;
  auto out = inplace ? *residual : at::empty({n, cout, oh, ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
#if RF_HAVE_CONV1X1
  const float* xp = x.const_data_ptr<float>();
  const float* wp = packed.const_data_ptr<float>();
  const float* bp = b.has_value() ? b->const_data_ptr<float>() : nullptr;
  const float* rp = residual.has_value() ? residual->const_data_ptr<float>() : nullptr;
  float* op = out.mutable_data_ptr<float>();
  // The input pixel of output row m (channels_last: a pixel's channels are contiguous).
  auto x_row = [&](int64_t m) {
    const int64_t img = m / (oh * ow), rem = m % (oh * ow);
    return xp + ((img * h + (rem / ow) * stride) * w + (rem % ow) * stride) * cin;
  };
  // Tasks: row tiles, and when those are few (small images, large batches of channels) also groups
  // of panels, so that every thread has work.
  const int64_t tiles = (m_total + MT - 1) / MT;
  const int64_t want = 8 * at::get_num_threads();
  const int64_t groups = std::min(panels, std::max<int64_t>(1, (want + tiles - 1) / tiles));
  const int64_t per_group = (panels + groups - 1) / groups;
  at::parallel_for(0, tiles * groups, 1, [&](int64_t t0, int64_t t1) {
    const float* rows_x[MT];  // each output row's input pixel, resolved once per task (no divisions inside)
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = (t / groups) * MT, m1 = std::min(m_total, m0 + MT);
      const int64_t p0 = (t % groups) * per_group, p1 = std::min(panels, p0 + per_group);
      for (int64_t m = m0; m < m1; ++m) rows_x[m - m0] = x_row(m);
      for (int64_t k0 = 0; k0 < cin; k0 += KC) {
        const int64_t kc = std::min(KC, cin - k0);
        // Rows outer (each 6-row micro-tile of A stays in L1 while its output rows are written
        // left to right, residual read alike: streams the prefetcher follows) when this K block of
        // the task's panels fits L2; else panels outer, each panel block reused from L1 down the rows.
        const bool rows_outer = kc * (p1 - p0) * NR * 4 <= 256 * 1024;
        auto tile = [&](int64_t p, int64_t r) {
          const int64_t rows = std::min(MR, m1 - r);
          const float* a[MR];
          float* c[MR];
          const float* res[MR];
          for (int64_t i = 0; i < MR; ++i) {
            const int64_t m = r + std::min(i, rows - 1);
            a[i] = rows_x[m - m0] + k0;
            c[i] = op + m * cout + p * NR;
            res[i] = rp ? rp + m * cout + p * NR : nullptr;
          }
          micro_tile(a, kc, wp + (p * cin + k0) * NR, c, rows, k0 == 0, k0 + kc >= cin,
                     bp ? bp + p * NR : nullptr, rp ? res : nullptr, relu);
        };
        if (rows_outer) {
          for (int64_t r = m0; r < m1; r += MR)
            for (int64_t p = p0; p < p1; ++p) tile(p, r);
        } else {
          for (int64_t p = p0; p < p1; ++p)
            for (int64_t r = m0; r < m1; r += MR) tile(p, r);
        }
      }
    }
  });
#endif
  return out;
}

}  // namespace cpu
}  // namespace resnet_fast
