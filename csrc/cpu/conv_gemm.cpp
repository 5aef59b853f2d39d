// A convolution (groups 1) on channels_last float32 as one implicit GEMM with the epilogue in
// registers: out[m, :] = act(sum over taps (kh, kw) of x[pixel(m, tap), :] @ W[:, :, kh, kw]^T + b
// (+ residual[m, :])), where pixel(m, tap) is output pixel m's input pixel under that tap (a zero row
// where the tap falls in the padding). A 1x1 convolution is the plain GEMM (one tap).
//
// Why our own: in ResNet-50 36 of 53 convolutions are 1x1, and oneDNN (as torch calls it) runs them
// below what onnxruntime's MLAS reaches on the same CPU; its ReLU post-op also maps NaN to 0, so the
// oneDNN route has to scan inputs for NaN first; and it cannot write into a buffer we pass, so every
// call faults in fresh pages. Here the ReLU is max(0, v) with NaN kept (vmaxps returns its second
// operand when either is NaN), no scan is needed, and the output goes where the caller says: a
// buffer kept from the last forward, or the residual itself.
//
// Layout: the weight [Cout, Cin, KH, KW] is packed once into panels of 16 output channels,
// [Cout/16][KH][KW][Cin][16]. The micro-kernel keeps a 6 x 16 tile of the output in 12 AVX
// registers (AVX2 + FMA), or where the CPU has AVX-512F a 6 x 64 tile (four panels) in 24 of its 32,
// and walks K = taps x Cin in blocks of KC input channels (all taps of a block at once): the first
// block starts from the bias and adds the residual, later ones continue from the stored partial sums,
// the last applies the ReLU. The ISA is chosen at run time (RESNET_FAST_CPU_ISA=avx2 keeps AVX2);
// callers check conv_gemm_supported() and otherwise take the oneDNN route.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <optional>
#include <string>
#include <vector>

#include "resnet_fast.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define RF_HAVE_CONV_GEMM 1
#else
#define RF_HAVE_CONV_GEMM 0
#endif
#if RF_HAVE_CONV_GEMM && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace resnet_fast {
namespace cpu {
namespace {

constexpr int64_t MR = 6;    // output rows (pixels) per micro-tile
constexpr int64_t NR = 16;   // output channels per micro-tile (two 8-float registers)
constexpr int64_t KC = 256;  // K block (input channels): a 16 KB B panel block per tap
constexpr int64_t MT = 96;   // rows per task: 16 micro-tiles reuse each B panel block from L1

constexpr int64_t NP512 = 4;  // panels per AVX-512 tile

// What this CPU runs, asked once.
struct CpuFeatures {
  bool avx2_fma = false, avx512f = false, avx512_bf16 = false, amx_bf16 = false;
};

// AMX-TILE and AMX-BF16, their state enabled by the OS (XCR0 bits 17 and 18) and, on Linux, this
// process allowed to use the tile data (the kernel asks each process to request it: arch_prctl).
bool amx_bf16_usable() {
#if RF_HAVE_CONV_GEMM && defined(__linux__)
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx >> 27 & 1)) return false;  // OSXSAVE: xgetbv usable
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx >> 22 & 1) || !(edx >> 24 & 1)) return false;
  unsigned lo, hi;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo >> 17 & 3) != 3) return false;
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
  return false;
#endif
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures f;
#if RF_HAVE_CONV_GEMM
    f.avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    f.avx512f = __builtin_cpu_supports("avx512f");
    f.avx512_bf16 = f.avx512f && __builtin_cpu_supports("avx512bf16");
    f.amx_bf16 = f.avx512_bf16 && amx_bf16_usable();
#endif
    return f;
  }();
  return f;
}

// The AVX-512 kernel where the CPU has AVX-512F, unless RESNET_FAST_CPU_ISA=avx2 asks for the AVX2 one
// (read on every call, so that tests cover both on one machine; the packed weights are the same).
bool use_avx512() {
  if (!cpu_features().avx512f) return false;
  const char* isa = std::getenv("RESNET_FAST_CPU_ISA");
  return isa == nullptr || std::string(isa) != "avx2";
}

#if RF_HAVE_CONV_GEMM
// The AVX2 micro-kernel: an R x NR tile (R <= MR) over input channels [k0, k0 + kc) of every tap:
// a[t * MR + i] points at row i's input pixel under tap t (channel 0), bp at the panel
// ([taps][cin][16]), c[i] at row i's output for this panel. R is the tile's row count, so a task's
// last rows cost only their own FMAs (ResNet-50's 7x7 layers at batch 1: 49 rows, 9 tiles, the last
// of 1 row). The first K block starts from the bias and adds the residual after its sums (prefetched
// here, so the loads find it in cache after the K loop instead of stalling before it: on the Zen 4,
// 1% of a batch-1 ResNet-50 forward here, 2.7% in micro_tile_avx512), before the tile's first write to
// c: c may be the residual itself (in place); later blocks continue from c's partial sums. Without a
// residual the first block prefetches c's lines instead: an output buffer was last written a forward
// before (in-process A/B on the Xeon, 11 layer shapes with the output evicted first: 1.11x faster here
// at batch 1, 1.05-1.09x in micro_tile_avx512, 1.05x at batch 8, 1.03x in micro_tile_bf16).
template <int R>
__attribute__((target("avx2,fma"))) void micro_tile_avx2(const float* const* a, int64_t taps, int64_t cin, int64_t k0,
                                                        int64_t kc, const float* bp, float* const* c, bool first,
                                                        bool last, const float* bias, const float* const* res,
                                                        bool relu) {
  __m256 acc[R][2];
  const __m256 zero = _mm256_setzero_ps();
  const __m256 bias0 = bias ? _mm256_loadu_ps(bias) : zero;
  const __m256 bias1 = bias ? _mm256_loadu_ps(bias + 8) : zero;
  if (first && res) {
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(res[i]), _MM_HINT_T0);
  } else if (first) {
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(c[i]), _MM_HINT_T0);
  }
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
    if (first) {
      acc[i][0] = bias0;
      acc[i][1] = bias1;
    } else {
      acc[i][0] = _mm256_loadu_ps(c[i]);
      acc[i][1] = _mm256_loadu_ps(c[i] + 8);
    }
  }
  for (int64_t t = 0; t < taps; ++t) {
    const float* ar[R];
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) ar[i] = a[t * MR + i] + k0;
    const float* bt = bp + (t * cin + k0) * NR;
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; ++k) {
      const __m256 b0 = _mm256_load_ps(bt + k * NR);
      const __m256 b1 = _mm256_load_ps(bt + k * NR + 8);
#pragma GCC unroll 6
      for (int i = 0; i < R; ++i) {
        const __m256 v = _mm256_broadcast_ss(ar[i] + k);
        acc[i][0] = _mm256_fmadd_ps(v, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(v, b1, acc[i][1]);
      }
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
    if (first && res) {
      acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_loadu_ps(res[i]));
      acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_loadu_ps(res[i] + 8));
    }
    if (last && relu) {  // max(0, v): NaN in the second operand is returned, as torch.relu keeps it
      acc[i][0] = _mm256_max_ps(zero, acc[i][0]);
      acc[i][1] = _mm256_max_ps(zero, acc[i][1]);
    }
    _mm256_storeu_ps(c[i], acc[i][0]);
    _mm256_storeu_ps(c[i] + 8, acc[i][1]);
  }
}

// One tile of `rows` <= MR rows (see micro_tile_avx2 for the arguments).
void micro_tile(const float* const* a, int64_t taps, int64_t cin, int64_t k0, int64_t kc, const float* bp,
                float* const* c, int64_t rows, bool first, bool last, const float* bias, const float* const* res,
                bool relu) {
  switch (rows) {
    case 1: return micro_tile_avx2<1>(a, taps, cin, k0, kc, bp, c, first, last, bias, res, relu);
    case 2: return micro_tile_avx2<2>(a, taps, cin, k0, kc, bp, c, first, last, bias, res, relu);
    case 3: return micro_tile_avx2<3>(a, taps, cin, k0, kc, bp, c, first, last, bias, res, relu);
    case 4: return micro_tile_avx2<4>(a, taps, cin, k0, kc, bp, c, first, last, bias, res, relu);
    case 5: return micro_tile_avx2<5>(a, taps, cin, k0, kc, bp, c, first, last, bias, res, relu);
    default: return micro_tile_avx2<6>(a, taps, cin, k0, kc, bp, c, first, last, bias, res, relu);
  }
}

// The AVX-512 micro-kernel (where the CPU has it): an R x (NP x 16) tile, NP adjacent panels at once
// (bp + j * pstride is panel j), each row's A value broadcast once for all NP panels. With R = 6 and
// NP = 4 the 24 accumulators and 4 B registers fit AVX-512's 32 registers, and each 512-bit FMA does
// the work of two 256-bit ones for half the instructions: on the Zen 4 (whose FMA units are 256 bits
// wide) ResNet-50's batch-1 1x1 layers ran 1.10-1.29x faster than on micro_tile_avx2, the whole batch-1
// forward 1.24x. Same arguments as micro_tile_avx2 otherwise.
template <int R, int NP>
__attribute__((target("avx512f"))) void micro_tile_avx512(const float* const* a, int64_t taps, int64_t cin,
                                                          int64_t k0, int64_t kc, const float* bp, int64_t pstride,
                                                          float* const* c, bool first, bool last, const float* bias,
                                                          const float* const* res, bool relu) {
  __m512 acc[R][NP];
  if (first && res) {
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NP; ++j) _mm_prefetch(reinterpret_cast<const char*>(res[i] + j * NR), _MM_HINT_T0);
  } else if (first) {
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NP; ++j) _mm_prefetch(reinterpret_cast<const char*>(c[i] + j * NR), _MM_HINT_T0);
  }
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) {
      if (first) {
        acc[i][j] = bias ? _mm512_loadu_ps(bias + j * NR) : _mm512_setzero_ps();
      } else {
        acc[i][j] = _mm512_loadu_ps(c[i] + j * NR);
      }
    }
  }
  for (int64_t t = 0; t < taps; ++t) {
    const float* ar[R];
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) ar[i] = a[t * MR + i] + k0;
    const float* bt = bp + (t * cin + k0) * NR;
#pragma GCC unroll 2
    for (int64_t k = 0; k < kc; ++k) {
      __m512 b[NP];
#pragma GCC unroll 4
      for (int j = 0; j < NP; ++j) b[j] = _mm512_loadu_ps(bt + j * pstride + k * NR);
#pragma GCC unroll 6
      for (int i = 0; i < R; ++i) {
        const __m512 v = _mm512_set1_ps(ar[i][k]);
#pragma GCC unroll 4
        for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_fmadd_ps(v, b[j], acc[i][j]);
      }
    }
  }
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) {
      if (first && res) acc[i][j] = _mm512_add_ps(acc[i][j], _mm512_loadu_ps(res[i] + j * NR));
      if (last && relu) acc[i][j] = _mm512_max_ps(zero, acc[i][j]);  // NaN kept, as in micro_tile_avx2
      _mm512_storeu_ps(c[i] + j * NR, acc[i][j]);
    }
  }
}

template <int R>
void micro_tile_avx512_rows(int64_t np, const float* const* a, int64_t taps, int64_t cin, int64_t k0, int64_t kc,
                            const float* bp, int64_t pstride, float* const* c, bool first, bool last,
                            const float* bias, const float* const* res, bool relu) {
  switch (np) {
    case 1: return micro_tile_avx512<R, 1>(a, taps, cin, k0, kc, bp, pstride, c, first, last, bias, res, relu);
    case 2: return micro_tile_avx512<R, 2>(a, taps, cin, k0, kc, bp, pstride, c, first, last, bias, res, relu);
    case 3: return micro_tile_avx512<R, 3>(a, taps, cin, k0, kc, bp, pstride, c, first, last, bias, res, relu);
    default: return micro_tile_avx512<R, 4>(a, taps, cin, k0, kc, bp, pstride, c, first, last, bias, res, relu);
  }
}

// One tile of `rows` <= MR rows and np panels (pstride floats apart; np <= NP512 when wide, the
// AVX-512 kernel, else micro_tile per panel).
void panel_tile(bool wide, const float* const* a, int64_t taps, int64_t cin, int64_t k0, int64_t kc, const float* bp,
                int64_t pstride, int64_t np, float* const* c, int64_t rows, bool first, bool last, const float* bias,
                const float* const* res, bool relu) {
  if (wide) {
    switch (rows) {
      case 1: return micro_tile_avx512_rows<1>(np, a, taps, cin, k0, kc, bp, pstride, c, first, last, bias, res, relu);
      case 2: return micro_tile_avx512_rows<2>(np, a, taps, cin, k0, kc, bp, pstride, c, first, last, bias, res, relu);
      case 3: return micro_tile_avx512_rows<3>(np, a, taps, cin, k0, kc, bp, pstride, c, first, last, bias, res, relu);
      case 4: return micro_tile_avx512_rows<4>(np, a, taps, cin, k0, kc, bp, pstride, c, first, last, bias, res, relu);
      case 5: return micro_tile_avx512_rows<5>(np, a, taps, cin, k0, kc, bp, pstride, c, first, last, bias, res, relu);
      default: return micro_tile_avx512_rows<6>(np, a, taps, cin, k0, kc, bp, pstride, c, first, last, bias, res, relu);
    }
  }
  for (int64_t j = 0; j < np; ++j) {
    float* cj[MR];
    const float* rj[MR];
    for (int64_t i = 0; i < MR; ++i) {
      cj[i] = c[i] + j * NR;
      rj[i] = res ? res[i] + j * NR : nullptr;
    }
    micro_tile(a, taps, cin, k0, kc, bp + j * pstride, cj, rows, first, last, bias ? bias + j * NR : nullptr,
               res ? rj : nullptr, relu);
  }
}

// The bfloat16 micro-kernel (AVX512_BF16): the same R x (NP x 16) tile as micro_tile_avx512, each
// step a pair of input channels: one 32-bit broadcast of the row's two bfloat16 values, and per panel
// vdpbf16ps adds both products to the float32 sums (the packed weight holds channel pairs,
// [taps][cin/2][16][2]). All of K in one call (the output is bfloat16: no partial sums through it);
// bias, residual and ReLU on the float32 sums, rounded to bfloat16 once, at the store. TOut = float
// stores the sums as they are (Winograd's products, transformed before they are rounded).
__attribute__((target("avx512f"))) inline __m512 bf16x16_to_ps(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

template <int R, int NP, typename TOut>
__attribute__((target("avx512f,avx512bf16"))) void micro_tile_bf16(const uint16_t* const* a, int64_t taps, int64_t cin,
                                                                   const uint16_t* bp, int64_t pstride, TOut* const* c,
                                                                   const float* bias, const uint16_t* const* res,
                                                                   bool relu) {
  constexpr int kLine = 64 / (NR * int(sizeof(TOut)));  // panels a cache line of output holds
  __m512 acc[R][NP];
  if (res) {  // read after the K loop: prefetched now (NP x 32 bytes a row)
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NP; j += 2) _mm_prefetch(reinterpret_cast<const char*>(res[i] + j * NR), _MM_HINT_T0);
  } else {
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NP; j += kLine) _mm_prefetch(reinterpret_cast<const char*>(c[i] + j * NR), _MM_HINT_T0);
  }
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) acc[i][j] = bias ? _mm512_loadu_ps(bias + j * NR) : _mm512_setzero_ps();
  const int64_t pairs = cin / 2;
  for (int64_t t = 0; t < taps; ++t) {
    const uint16_t* ar[R];
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) ar[i] = a[t * MR + i];
    const uint16_t* bt = bp + t * cin * NR;
#pragma GCC unroll 2
    for (int64_t k = 0; k < pairs; ++k) {
      __m512bh b[NP];
#pragma GCC unroll 4
      for (int j = 0; j < NP; ++j) b[j] = (__m512bh)_mm512_loadu_si512(bt + j * pstride + k * 2 * NR);
#pragma GCC unroll 6
      for (int i = 0; i < R; ++i) {
        int32_t pair;
        std::memcpy(&pair, ar[i] + 2 * k, sizeof(pair));
        const __m512bh v = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
        for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], v, b[j]);
      }
    }
  }
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) {
      if (res) acc[i][j] = _mm512_add_ps(acc[i][j], bf16x16_to_ps(res[i] + j * NR));
      if (relu) acc[i][j] = _mm512_max_ps(zero, acc[i][j]);  // NaN kept, as in micro_tile_avx2
      if constexpr (std::is_same_v<TOut, float>) {
        _mm512_storeu_ps(c[i] + j * NR, acc[i][j]);
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(c[i] + j * NR), (__m256i)_mm512_cvtneps_pbh(acc[i][j]));
      }
    }
  }
}

template <int R, typename TOut>
void micro_tile_bf16_rows(int64_t np, const uint16_t* const* a, int64_t taps, int64_t cin, const uint16_t* bp,
                          int64_t pstride, TOut* const* c, const float* bias, const uint16_t* const* res, bool relu) {
  switch (np) {
    case 1: return micro_tile_bf16<R, 1>(a, taps, cin, bp, pstride, c, bias, res, relu);
    case 2: return micro_tile_bf16<R, 2>(a, taps, cin, bp, pstride, c, bias, res, relu);
    case 3: return micro_tile_bf16<R, 3>(a, taps, cin, bp, pstride, c, bias, res, relu);
    default: return micro_tile_bf16<R, 4>(a, taps, cin, bp, pstride, c, bias, res, relu);
  }
}

// One bfloat16 tile of `rows` <= MR rows and np <= NP512 panels.
template <typename TOut>
void panel_tile_bf16(const uint16_t* const* a, int64_t taps, int64_t cin, const uint16_t* bp, int64_t pstride,
                     int64_t np, TOut* const* c, int64_t rows, const float* bias, const uint16_t* const* res,
                     bool relu) {
  switch (rows) {
    case 1: return micro_tile_bf16_rows<1>(np, a, taps, cin, bp, pstride, c, bias, res, relu);
    case 2: return micro_tile_bf16_rows<2>(np, a, taps, cin, bp, pstride, c, bias, res, relu);
    case 3: return micro_tile_bf16_rows<3>(np, a, taps, cin, bp, pstride, c, bias, res, relu);
    case 4: return micro_tile_bf16_rows<4>(np, a, taps, cin, bp, pstride, c, bias, res, relu);
    case 5: return micro_tile_bf16_rows<5>(np, a, taps, cin, bp, pstride, c, bias, res, relu);
    default: return micro_tile_bf16_rows<6>(np, a, taps, cin, bp, pstride, c, bias, res, relu);
  }
}
#endif

// Rows per task: at most MT, evened out over the tasks (a multiple of MR).
int64_t even_rows(int64_t m_total) {
  const int64_t tiles = (m_total + MT - 1) / MT;
  return ((m_total + tiles - 1) / tiles + MR - 1) / MR * MR;
}

// One thread's share of the tasks, [next, end) packed into one word so that its owner (from the
// front) and a thief (from the back) never take the same task.
class TaskRange {
 public:
  void reset(int64_t begin, int64_t end) { word_.store(pack(begin, end), std::memory_order_relaxed); }
  int64_t pop_front() { return pop(true); }
  int64_t pop_back() { return pop(false); }

 private:
  static uint64_t pack(int64_t next, int64_t end) { return (uint64_t(next) << 32) | uint64_t(end); }
  int64_t pop(bool front) {
    uint64_t v = word_.load(std::memory_order_relaxed);
    while (true) {
      const int64_t next = int64_t(v >> 32), end = int64_t(v & 0xffffffffu);
      if (next >= end) return -1;
      const uint64_t want = front ? pack(next + 1, end) : pack(next, end - 1);
      if (word_.compare_exchange_weak(v, want, std::memory_order_relaxed)) return front ? next : end - 1;
    }
  }
  alignas(64) std::atomic<uint64_t> word_{0};
};

// Runs per_thread(take) on every thread, where take() returns a task of [0, n) not yet taken (n when
// none is left). Thread t owns the t-th contiguous share and takes it in order: at batch 1 the rows a
// layer reads are the ones the same thread wrote in the layer before, still in its own L2 cache (as
// after onnxruntime's static split). When its share is done it takes the other threads' remaining
// tasks from their ends: when the host slows one core (a VM sharing its cores), the others finish
// its work instead of waiting for it.
template <typename F>
void share_tasks(int64_t n, const F& per_thread) {
  TORCH_CHECK(n < (int64_t{1} << 31), "share_tasks: too many tasks");
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  std::vector<TaskRange> shares(threads);
  for (int64_t t = 0; t < threads; ++t) shares[t].reset(t * n / threads, (t + 1) * n / threads);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t me = t0; me < t1; ++me) {
      auto take = [&shares, threads, me, n]() -> int64_t {
        int64_t task = shares[me].pop_front();
        for (int64_t k = 1; task < 0 && k < threads; ++k) task = shares[(me + k) % threads].pop_back();
        return task < 0 ? n : task;
      };
      per_thread(take);
    }
  });
}

struct Geometry {
  int64_t n, cin, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, cout;
};

// The checks both kernels share; kh, kw, cout as the packed weight says.
Geometry check_args(const char* op, const at::Tensor& x, int64_t kh, int64_t kw, int64_t cout,
                    const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& residual,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(conv_gemm_supported(), op, ": this CPU has no AVX2 + FMA (or this build no x86-64 kernel)");
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && (dtype == at::kFloat || dtype == at::kBFloat16) && x.dim() == 4,
              op, ": expected a 4-D float32 or bfloat16 CPU input, got ", x.scalar_type(), " on ", x.device(),
              " with ", x.dim(), " dims");
  // Channels adjacent in memory; the pixels may lie anywhere (conv_gemm_bias_act reads them through x's
  // strides; Winograd checks for channels_last itself).
  TORCH_CHECK(x.size(1) == 1 || x.stride(1) == 1, op, ": x's channels must be contiguous (channels_last), got strides ", x.strides());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && stride[0] >= 1 && stride[1] >= 1 &&
                  padding[0] >= 0 && padding[1] >= 0 && dilation[0] >= 1 && dilation[1] >= 1,
              op, ": stride and dilation must be 2 values >= 1, padding 2 values >= 0");
  Geometry g{x.size(0),  x.size(1),  x.size(2),   x.size(3),   kh,             kw,             stride[0], stride[1],
             padding[0], padding[1], dilation[0], dilation[1], 0,              0,              cout};
  g.oh = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.ow = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.oh >= 1 && g.ow >= 1, op, ": input ", x.sizes(), " is smaller than the kernel");
  if (b.has_value()) {
    TORCH_CHECK(b->scalar_type() == at::kFloat && b->numel() == g.cout && b->is_contiguous() && b->device().is_cpu(),
                op, ": b must be a contiguous float32 CPU tensor of ", g.cout, " values");
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == dtype && residual->device().is_cpu() &&
                    residual->sizes() == at::IntArrayRef({g.n, g.cout, g.oh, g.ow}) &&
                    residual->is_contiguous(at::MemoryFormat::ChannelsLast),
                op, ": residual must be a channels_last CPU tensor of the output's shape in x's dtype ", dtype);
  }
  return g;
}

// Where a kernel writes: out when given (checked), else a fresh channels_last tensor.
at::Tensor output_for(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual, const Geometry& g,
                      const std::optional<at::Tensor>& out_) {
  const auto options = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  at::Tensor out;
  if (out_.has_value()) {
    out = *out_;
    TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.device().is_cpu() &&
                    out.sizes() == at::IntArrayRef({g.n, g.cout, g.oh, g.ow}) &&
                    out.is_contiguous(at::MemoryFormat::ChannelsLast),
                op, ": out must be a channels_last CPU tensor of the output's shape ",
                at::IntArrayRef({g.n, g.cout, g.oh, g.ow}), " in x's dtype ", x.scalar_type(), ", got ", out.sizes(),
                " ", out.scalar_type());
    // Each tile reads its residual rows before writing them, so out may be the residual itself; it
    // may not share memory with x (read by every tile) or partly overlap the residual.
    at::assert_no_overlap(out, x);
    if (residual.has_value() && !out.is_same(*residual)) at::assert_no_overlap(out, *residual);
  } else {
    out = at::empty({g.n, g.cout, g.oh, g.ow}, options);
  }
  return out;
}

#if RF_HAVE_CONV_GEMM
// The implicit GEMM's tasks, for T = float (the AVX2 or AVX-512 micro-kernel, K in blocks of KC) or
// T = uint16_t holding bfloat16 (the AVX512_BF16 one, K in one block: partial sums stay in registers).
template <typename T>
void gemm_tasks(const Geometry& g, const at::Tensor& x, const T* wp, int64_t panels, const float* bp, const T* rp,
                T* op, bool relu) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  const int64_t taps = g.kh * g.kw, cin = g.cin, cout = g.cout;
  const int64_t m_total = g.n * g.oh * g.ow;
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  const bool padded = g.ph > 0 || g.pw > 0;
  const std::vector<T> zeros(padded ? cin : 0, T(0));  // the input row a tap in the padding reads
  // Row m's input pixel under each tap (channels_last: a pixel's channels are contiguous), into
  // dst[t * stride] for t in [0, taps): the divisions once per row, not per tap.
  // Through x's strides: a strided view whose pixels overlap serves too (ops/conv.py's stem path
  // reads a kernel row's taps as one pixel of KW x Cin channels).
  const int64_t s_img = x.stride(0), s_y = x.stride(2), s_x = x.stride(3);
  auto x_rows = [&](int64_t m, const T** dst, int64_t stride) {
    const int64_t img = m / (g.oh * g.ow), rem = m % (g.oh * g.ow);
    const int64_t y0 = (rem / g.ow) * g.sh - g.ph, x0 = (rem % g.ow) * g.sw - g.pw;
    const T* image = xp + img * s_img;
    for (int64_t ky = 0, t = 0; ky < g.kh; ++ky) {
      const int64_t iy = y0 + ky * g.dh;
      for (int64_t kx = 0; kx < g.kw; ++kx, ++t) {
        const int64_t ix = x0 + kx * g.dw;
        const bool inside = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
        dst[t * stride] = inside ? image + iy * s_y + ix * s_x : zeros.data();
      }
    }
  };
  // Tasks: row tiles, and when those are few (small images, many output channels) also groups of
  // panels: about 32 tasks per thread, so that the threads finish together (ResNet-50's 1x1 layers
  // to 1024/2048 channels at batch 8, Zen 3: 1.01-1.16x oneDNN's time with 8 per thread in one run,
  // 0.76-1.15x with 32 in two; the per-layer choice keeps oneDNN where it still wins).
  // Row tiles of at most MT rows, evened out (196 rows: 66 + 66 + 64, not 96 + 96 + 4): tasks of equal
  // size balance the threads (under a static split of the tasks, ResNet-50's 1x1 layers to 1024
  // channels at batch 1 ran at 0.65x onnxruntime's speed with the short tile).
  const bool wide = bf16 || use_avx512();
  const int64_t np_tile = wide ? NP512 : 1;  // panels per micro-tile
  const int64_t k_block = bf16 ? cin : KC;  // bfloat16: no partial sums in the (bfloat16) output
  const int64_t mt = even_rows(m_total), tiles = (m_total + mt - 1) / mt;
  const int64_t want = 32 * at::get_num_threads(), quads = (panels + np_tile - 1) / np_tile;
  const int64_t groups = std::min(quads, std::max<int64_t>(1, (want + tiles - 1) / tiles));
  const int64_t per_group = (quads + groups - 1) / groups * np_tile;
  const int64_t tasks = tiles * groups;
  share_tasks(tasks, [&](const auto& take) {
    // Per micro-tile row block, the rows' input pixels per tap ([tap][row]), resolved once per task.
    std::vector<const T*> rows_x(mt * taps);
    for (int64_t task = take(); task < tasks; task = take()) {
      const int64_t m0 = (task / groups) * mt, m1 = std::min(m_total, m0 + mt);
      const int64_t p0 = (task % groups) * per_group, p1 = std::min(panels, p0 + per_group);
      for (int64_t r = m0; r < m1; r += MR) {
        const T** a = rows_x.data() + (r - m0) * taps;
        for (int64_t i = 0; i < MR; ++i) x_rows(std::min(r + i, m1 - 1), a + i, MR);  // a[t * MR + i]
      }
      for (int64_t k0 = 0; k0 < cin; k0 += k_block) {
        const int64_t kc = std::min(k_block, cin - k0);
        // Rows outer (each micro-tile of A stays in L1 while its output rows are written left to
        // right, residual read alike: streams the prefetcher follows) when this K block of the
        // task's panels fits L2; else panels outer, each panel block reused from L1 down the rows.
        const bool rows_outer = taps * kc * (p1 - p0) * NR * int64_t{sizeof(T)} <= 256 * 1024;
        auto tile = [&](int64_t p, int64_t r) {
          const int64_t rows = std::min(MR, m1 - r);
          T* c[MR];
          const T* res[MR];
          for (int64_t i = 0; i < MR; ++i) {
            const int64_t m = r + std::min(i, rows - 1);
            c[i] = op + m * cout + p * NR;
            res[i] = rp ? rp + m * cout + p * NR : nullptr;
          }
          const int64_t np = std::min(np_tile, p1 - p);
          if constexpr (bf16) {
            panel_tile_bf16(rows_x.data() + (r - m0) * taps, taps, cin, wp + p * taps * cin * NR, taps * cin * NR,
                            np, c, rows, bp ? bp + p * NR : nullptr, rp ? res : nullptr, relu);
          } else {
            panel_tile(wide, rows_x.data() + (r - m0) * taps, taps, cin, k0, kc, wp + p * taps * cin * NR,
                       taps * cin * NR, np, c, rows, k0 == 0, k0 + kc >= cin, bp ? bp + p * NR : nullptr,
                       rp ? res : nullptr, relu);
          }
        };
        if (rows_outer) {
          for (int64_t r = m0; r < m1; r += MR)
            for (int64_t p = p0; p < p1; p += np_tile) tile(p, r);
        } else {
          for (int64_t p = p0; p < p1; p += np_tile)
            for (int64_t r = m0; r < m1; r += MR) tile(p, r);
        }
      }
    }
  });
}
#endif

// ---- AMX (bfloat16) ----
//
// Intel AMX: eight tile registers of up to 16 rows x 64 bytes; TDPBF16PS adds the product of a 16 x 32
// bfloat16 tile (A) and a 32 x 16 one stored as 16 rows of channel pairs (B) to a 16 x 16 float32 tile,
// 8x the multiply-adds of one AVX512_BF16 instruction. B's layout is the bfloat16 GEMM's packed panel
// ([taps][cin/2][16][2], 16 pairs of input channels a tile), so both read the same packed weight. An
// A tile's 16 rows are up to 16 output pixels of one output row (in a 1x1 stride-1 layer any 16
// consecutive pixels: a "segment"), read from x at a fixed stride; rows past the segment's pixels are
// computed from whatever follows in x and dropped. A block is two segments (A tiles) by two panels (B
// tiles) into four float32 accumulators, stored to a 32 x 32 block where bias, residual and ReLU (NaN
// kept) are applied and the sums rounded to bfloat16 once.
#if RF_HAVE_CONV_GEMM
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3 the accumulators (16 x 16 float32), 4-5 A (16 pixels x kc channels), 6-7 B (kc / 2 channel
// pairs x 16 output channels): kc = 32, or a layer's fewer input channels per tap (the stem's 28).
__attribute__((target("amx-tile"))) void amx_configure(int64_t kc) {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = i == 4 || i == 5 ? kc * 2 : 64;
    cfg.rows[i] = i >= 6 ? kc / 2 : 16;
  }
  asm volatile("" : : "r"(&cfg) : "memory");  // else GCC 12 drops the stores above (ldtilecfg reads them)
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

// c[32][32] = rows 0-15 from segment a0, 16-31 from a1 (a0[t]: tap t's first pixel, lda0 bytes between
// pixels), columns 0-15 from panel b0, 16-31 from b1. A step's four loads, then its four products: on
// the Xeon 1.05x and 1.10x faster over seven ResNet layer shapes (two in-process A/B runs) than each
// load placed right before the first product that reads it.
__attribute__((target("amx-tile,amx-bf16"))) void amx_block(const uint16_t* const* a0, int64_t lda0,
                                                            const uint16_t* const* a1, int64_t lda1, int64_t taps,
                                                            int64_t cin, const uint16_t* b0, const uint16_t* b1,
                                                            float* c) {
  const int64_t panel = taps * cin * NR;  // elements of one packed panel (b1 follows b0, then the next pair)
  const int64_t kc = std::min<int64_t>(cin, 32);  // input channels a step
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t t = 0; t < taps; ++t) {
    const uint16_t *x0 = a0[t], *x1 = a1[t], *w0 = b0 + t * cin * NR, *w1 = b1 + t * cin * NR;
    for (int64_t k = 0; k < cin; k += 32) {
      _tile_loadd(4, x0 + k, lda0);
      _tile_loadd(5, x1 + k, lda1);
      _tile_loadd(6, w0 + k * NR, 64);
      _tile_loadd(7, w1 + k * NR, 64);
      // The weights two steps ahead (the next panel pair's first past the last), into L1: a block's
      // A rows are read again for every panel pair and stay in L1, B streams from L2. Xeon, 12 ResNet
      // layer shapes: 1.13x faster at batch 8, 1.12x at batch 1 (in-process A/B vs no prefetch; 1 and 3
      // steps ahead 1.09-1.13x).
      const int64_t next = (t * cin + k + 2 * kc) * NR;
      const char* n0 = reinterpret_cast<const char*>(next < panel ? b0 + next : b1 + next);
      const char* n1 = reinterpret_cast<const char*>(next < panel ? b1 + next : b1 + panel + next);
      for (int l = 0; l < 16; ++l) {
        _mm_prefetch(n0 + 64 * l, _MM_HINT_T0);
        _mm_prefetch(n1 + 64 * l, _MM_HINT_T0);
      }
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  _tile_stored(2, c + 16 * 32, 128);
  _tile_stored(3, c + 16 * 32 + 16, 128);
}

// Block row i (of 32) goes to output pixel out_row[i] (none where -1): 32 channels of out (and res)
// at that pixel (ld elements a pixel) = act(c + bias (+ res)), rounded to bfloat16.
__attribute__((target("avx512f,avx512bf16"))) void amx_epilogue(const float* c, const int64_t* out_row,
                                                                const float* bias, const uint16_t* res,
                                                                uint16_t* out, int64_t ld, bool relu) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512 bias0 = bias ? _mm512_loadu_ps(bias) : zero, bias1 = bias ? _mm512_loadu_ps(bias + NR) : zero;
  for (int64_t i = 0; i < 32; ++i) {
    if (out_row[i] < 0) continue;
    const int64_t at = out_row[i] * ld;
    __m512 v0 = _mm512_add_ps(_mm512_loadu_ps(c + i * 32), bias0);
    __m512 v1 = _mm512_add_ps(_mm512_loadu_ps(c + i * 32 + NR), bias1);
    if (res) {
      v0 = _mm512_add_ps(v0, bf16x16_to_ps(res + at));
      v1 = _mm512_add_ps(v1, bf16x16_to_ps(res + at + NR));
    }
    if (relu) {
      v0 = _mm512_max_ps(zero, v0);  // NaN kept, as in micro_tile_avx2
      v1 = _mm512_max_ps(zero, v1);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + at), (__m256i)_mm512_cvtneps_pbh(v0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + at + NR), (__m256i)_mm512_cvtneps_pbh(v1));
  }
}

struct Segment {
  int64_t first, img, oy, in0;  // first pixel (of the grid below or of output row oy) of image img; x + in0: tap 0's
};

// x unpadded (padding 0), dilation 1, its channels contiguous, its pixels where its strides say (a
// view whose pixels overlap, as the GEMM over kernel rows reads); wp: [Cout/16][KH][KW][Cin/2][16][2].
// A stride-1 layer whose rows lie one after the other runs on a grid as wide as x (per image, pixel
// q = oy * W + ox reads x at q + the tap's offset: one fixed stride through the whole image), and drops
// the grid's columns past the output's width (ResNet's padded 3x3 layers: 2 of 58, 30, 16 or 9); other
// layers run row by row, 16 pixels a segment.
void amx_tasks(const Geometry& g, const at::Tensor& x, const uint16_t* wp, const float* bp, const uint16_t* rp,
               uint16_t* op, bool relu) {
  const int64_t taps = g.kh * g.kw, cin = g.cin, cout = g.cout;
  const uint16_t* xp = static_cast<const uint16_t*>(x.const_data_ptr());
  const int64_t s_img = x.stride(0), row = x.stride(2), pixel = x.stride(3);
  const int64_t x_end = (g.n - 1) * s_img + (g.h - 1) * row + (g.w - 1) * pixel + cin;  // past x's last element
  const bool grid = g.sh == 1 && g.sw == 1 && row == g.w * pixel;
  const int64_t step = g.sw * pixel;  // elements between a segment's pixels
  // Lines of pixels, cut into segments: per image, the grid's oh rows of W (the last one's columns past
  // ow left out; a 1x1 layer's grid is the whole batch, images one after the other); else per output
  // row, its ow pixels.
  const bool batch = grid && taps == 1 && s_img == g.h * row;
  const int64_t per_line = batch ? g.n * g.oh * g.ow : grid ? (g.oh - 1) * g.w + g.ow : g.ow;
  const int64_t lines = batch ? 1 : grid ? g.n : g.n * g.oh;
  std::vector<Segment> segments;
  for (int64_t line = 0; line < lines; ++line)
    for (int64_t q = 0; q < per_line; q += 16) {
      const int64_t img = grid ? line : line / g.oh, oy = grid ? 0 : line % g.oh;
      segments.push_back({q, img, oy, img * s_img + oy * g.sh * row + q * step});
    }
  // Output pixel of a segment's i-th row, or -1 where the row is a grid column past ow or past the end.
  auto output_row = [&](const Segment& s, int64_t i) -> int64_t {
    const int64_t q = s.first + i;
    if (q >= per_line) return -1;
    if (!grid) return (s.img * g.oh + s.oy) * g.ow + q;
    const int64_t oy = q / g.w, ox = q % g.w;
    return ox < g.ow ? (s.img * g.oh + oy) * g.ow + ox : -1;
  };
  std::vector<int64_t> tap_offset(taps);
  for (int64_t ky = 0, t = 0; ky < g.kh; ++ky)
    for (int64_t kx = 0; kx < g.kw; ++kx, ++t) tap_offset[t] = ky * row + kx * pixel;
  // Tasks as in gemm_tasks: blocks (segment pairs), and groups of panel pairs where blocks are few.
  const int64_t blocks = (int64_t(segments.size()) + 1) / 2, pairs = cout / 32;
  const int64_t want = 32 * at::get_num_threads();
  const int64_t per_task = (blocks + want - 1) / want, block_tasks = (blocks + per_task - 1) / per_task;
  const int64_t groups = std::min(pairs, std::max<int64_t>(1, (want + block_tasks - 1) / block_tasks));
  const int64_t per_group = (pairs + groups - 1) / groups;
  const int64_t tasks = block_tasks * groups;
  share_tasks(tasks, [&](const auto& take) {
    amx_configure(std::min<int64_t>(cin, 32));
    alignas(64) float c[32 * 32];
    std::vector<uint16_t> gathered;  // a segment whose unused rows would read past x's end: its rows copied
    std::vector<const uint16_t*> a(2 * taps);
    for (int64_t task = take(); task < tasks; task = take()) {
      const int64_t blk0 = (task / groups) * per_task, blk1 = std::min(blocks, blk0 + per_task);
      const int64_t q0 = (task % groups) * per_group, q1 = std::min(pairs, q0 + per_group);
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const Segment* seg[2] = {&segments[2 * blk],
                                 2 * blk + 1 < int64_t(segments.size()) ? &segments[2 * blk + 1] : nullptr};
        int64_t lda[2], out_row[32];
        for (int j = 0; j < 2; ++j) {
          const Segment& s = seg[j] ? *seg[j] : *seg[0];  // a lone last segment: its pair computed and dropped
          for (int64_t i = 0; i < 16; ++i) out_row[j * 16 + i] = seg[j] ? output_row(s, i) : -1;
          const uint16_t** aj = a.data() + j * taps;
          lda[j] = step * 2;
          if (s.in0 + tap_offset[taps - 1] + 15 * step + cin <= x_end) {
            for (int64_t t = 0; t < taps; ++t) aj[t] = xp + s.in0 + tap_offset[t];
            continue;
          }
          gathered.resize(2 * taps * 16 * cin);
          uint16_t* dst = gathered.data() + j * taps * 16 * cin;
          for (int64_t t = 0; t < taps; ++t) {
            for (int64_t i = 0; i < 16 && s.in0 + tap_offset[t] + i * step + cin <= x_end; ++i)
              std::memcpy(dst + (t * 16 + i) * cin, xp + s.in0 + tap_offset[t] + i * step, cin * sizeof(uint16_t));
            aj[t] = dst + t * 16 * cin;
          }
          lda[j] = cin * 2;
        }
        for (int64_t q = q0; q < q1; ++q) {
          // The epilogue's lines (residual, output) fetched while the block computes: a residual was
          // written three layers before, an output buffer a forward before, both out of the caches.
          // In-process A/B on the Xeon, 10 layer shapes with the output evicted first: 1.06x faster at
          // batch 8 (1.25-1.4x on residual layers), 1.05x at batch 1.
          for (int i = 0; i < 32; ++i) {
            if (out_row[i] < 0) continue;
            const int64_t at = out_row[i] * cout + q * 32;
            if (rp) _mm_prefetch(reinterpret_cast<const char*>(rp + at), _MM_HINT_T0);
            if (rp != op) _mm_prefetch(reinterpret_cast<const char*>(op + at), _MM_HINT_T0);
          }
          const uint16_t* w0 = wp + 2 * q * taps * cin * NR;
          amx_block(a.data(), lda[0], a.data() + taps, lda[1], taps, cin, w0, w0 + taps * cin * NR, c);
          amx_epilogue(c, out_row, bp ? bp + q * 32 : nullptr, rp ? rp + q * 32 : nullptr, op + q * 32, cout, relu);
        }
      }
    }
    amx_release();
  });
}
#endif

}  // namespace

bool conv_gemm_supported() { return cpu_features().avx2_fma; }

std::string conv_gemm_isa() {
  if (!conv_gemm_supported()) return "none";
  return use_avx512() ? "avx512f" : "avx2+fma";
}

bool conv_gemm_bf16_supported() { return conv_gemm_supported() && cpu_features().avx512_bf16; }

bool conv_amx_supported() { return cpu_features().amx_bf16; }

namespace {

// Finite iff its exponent bits are not all set.
inline bool finite_value(float v) { return (c10::bit_cast<uint32_t>(v) & 0x7F800000u) != 0x7F800000u; }

// A per-output-channel float32 scale of n elements (checked), or null.
const float* check_scale(const char* name, const std::optional<at::Tensor>& scale, int64_t n) {
  if (!scale.has_value()) return nullptr;
  TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->dim() == 1 && scale->numel() == n && scale->is_contiguous() &&
                  scale->device().is_cpu(),
              name, ": scale must be a contiguous float32 CPU tensor of ", n, " elements");
  return scale->const_data_ptr<float>();
}

// float32 w [Cout, Cin, KH, KW] (times scale[o]) into [Cout/16, KH, KW, Cin, 16] panels, written in order and
// checked as written; whether every value is finite. A panel's source (16 x Cin x KH x KW) stays in L2 while
// its KH x KW passes read it. at::mul_out through a permuted view, then a read-back pass for finiteness,
// took 56 ms for ResNet-50's 41 GEMM layers (1.2 GB/s, Xeon).
bool pack_gemm_f32(const float* src, const float* scale, float* dst, int64_t cout, int64_t cin, int64_t taps) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, cout / NR, 1, [&](int64_t b, int64_t e) {
    bool ok = true;
    float s[NR];
    for (int64_t p = b; p < e; ++p) {
      for (int64_t l = 0; l < NR; ++l) s[l] = scale ? scale[p * NR + l] : 1.0f;
      const float* w = src + p * NR * cin * taps;
      float* out = dst + p * taps * cin * NR;
      for (int64_t r = 0; r < taps; ++r) {
        for (int64_t c = 0; c < cin; ++c, out += NR) {
          for (int64_t l = 0; l < NR; ++l) {
            const float v = w[(l * cin + c) * taps + r] * s[l];
            out[l] = v;
            ok &= finite_value(v);
          }
        }
      }
    }
    if (!ok) finite.store(false);
  });
  return finite.load();
}

}  // namespace

std::optional<at::Tensor> pack_conv_gemm_weight(const at::Tensor& w, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(w.dim() == 4 && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) && w.device().is_cpu(),
              "pack_conv_gemm_weight: expected a float32 or bfloat16 [Cout, Cin, KH, KW] CPU weight, got ", w.sizes(),
              " ", w.scalar_type(), " on ", w.device());
  const int64_t cout = w.size(0), cin = w.size(1), kh = w.size(2), kw = w.size(3);
  TORCH_CHECK(cout % NR == 0, "pack_conv_gemm_weight: Cout must be a multiple of ", NR, ", got ", cout);
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK(!bf16 || cin % 2 == 0, "pack_conv_gemm_weight: a bfloat16 weight needs an even Cin, got ", cin);
  check_scale("pack_conv_gemm_weight", scale, cout);
  const c10::NoGradGuard no_grad;  // w may be a module's parameter: its packed form is data, not a graph node
  if (!bf16) {  // [Cout/16, KH, KW, Cin, 16]
    const at::Tensor wc = w.contiguous();
    at::Tensor packed = empty_huge({cout / NR, kh, kw, cin, NR}, at::kFloat);
    const float* sp = scale.has_value() ? scale->const_data_ptr<float>() : nullptr;
    if (!pack_gemm_f32(wc.const_data_ptr<float>(), sp, packed.mutable_data_ptr<float>(), cout, cin, kh * kw))
      return std::nullopt;
    return packed;
  }
  // bfloat16: channel pairs, the operand of AVX512_BF16's dot product, [Cout/16, KH, KW, Cin/2, 16, 2].
  // Written through a view in w's order, in one pass: w * scale[o] is computed in float32 and rounded once
  // to bfloat16, as the fold computes it.
  at::Tensor packed = empty_huge({cout / NR, kh, kw, cin / 2, NR, 2}, w.scalar_type());
  at::Tensor view = packed.permute({0, 4, 3, 5, 1, 2});  // [Cout/16, 16, Cin/2, 2, KH, KW]
  const at::Tensor source = w.reshape({cout / NR, NR, cin / 2, 2, kh, kw});
  if (scale.has_value()) {
    std::vector<int64_t> per_row(view.dim(), 1);
    per_row[0] = cout / NR, per_row[1] = NR;
    at::mul_out(view, source, scale->reshape(per_row));
  } else {
    view.copy_(source);
  }
  if (!all_finite(packed)) return std::nullopt;
  return packed;
}

at::Tensor conv_gemm_bias_act(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& b,
                              const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, const std::optional<at::Tensor>& out_) {
  const char* name = "conv_gemm_bias_act";
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name,
              ": expected a float32 or bfloat16 input, got ", x.scalar_type());
  const bool bf16 = packed.scalar_type() == at::kBFloat16;
  // float32: [Cout/16, KH, KW, Cin, 16]; bfloat16: [Cout/16, KH, KW, Cin/2, 16, 2]
  TORCH_CHECK(packed.dim() == (bf16 ? 6 : 5) && packed.size(4) == NR && packed.size(3) * (bf16 ? 2 : 1) == x.size(1) &&
                  packed.scalar_type() == x.scalar_type() && packed.is_contiguous(),
              name, ": weight not packed by pack_conv_gemm_weight for ", x.size(1), " ", x.scalar_type(),
              " input channels");
  TORCH_CHECK(!bf16 || conv_gemm_bf16_supported(), name, ": bfloat16 needs a CPU with AVX512_BF16");
  const Geometry g =
      check_args(name, x, packed.size(1), packed.size(2), packed.size(0) * NR, b, residual, stride, padding, dilation);
  at::Tensor out = output_for(name, x, residual, g, out_);
#if RF_HAVE_CONV_GEMM
  const float* bp = b.has_value() ? b->const_data_ptr<float>() : nullptr;
  if (bf16) {
    auto raw = [](const at::Tensor& t) { return static_cast<const uint16_t*>(t.const_data_ptr()); };
    gemm_tasks<uint16_t>(g, x, raw(packed), packed.size(0), bp, residual.has_value() ? raw(*residual) : nullptr,
                         static_cast<uint16_t*>(out.mutable_data_ptr()), relu);
  } else {
    gemm_tasks<float>(g, x, packed.const_data_ptr<float>(), packed.size(0), bp,
                      residual.has_value() ? residual->const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>(),
                      relu);
  }
#endif
  return out;
}

at::Tensor conv_amx_bias_act(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& b,
                             const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride,
                             at::IntArrayRef padding, const std::optional<at::Tensor>& out_) {
  const char* name = "conv_amx_bias_act";
  TORCH_CHECK(conv_amx_supported(), name, ": this CPU has no AMX-BF16, or the OS does not let this process use it");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, name, ": expected a bfloat16 input, got ", x.scalar_type());
  TORCH_CHECK(packed.dim() == 6 && packed.size(4) == NR && packed.size(3) * 2 == x.size(1) &&
                  packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
              name, ": weight not packed by pack_conv_gemm_weight for ", x.size(1), " bfloat16 input channels");
  TORCH_CHECK((x.size(1) % 32 == 0 || x.size(1) < 32) && packed.size(0) % 2 == 0, name,
              ": input channels must be a multiple of 32 (or fewer, an even number), output channels a multiple of "
              "32, got ", x.size(1), " and ", packed.size(0) * NR);
  Geometry g = check_args(name, x, packed.size(1), packed.size(2), packed.size(0) * NR, b, residual, stride, padding,
                          {1, 1});
  at::Tensor out = output_for(name, x, residual, g, out_);
#if RF_HAVE_CONV_GEMM
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor xs = x;  // read through its strides
  if (g.ph > 0 || g.pw > 0) {  // the kernel reads rows at a fixed stride: a zero-padded copy (one pass)
    xs = at::empty({g.n, g.cin, g.h + 2 * g.ph, g.w + 2 * g.pw}, x.options().memory_format(cl));
    pad_cl(x, padding, xs);
    g.h += 2 * g.ph;
    g.w += 2 * g.pw;
    g.ph = g.pw = 0;
  }
  auto raw = [](const at::Tensor& t) { return static_cast<const uint16_t*>(t.const_data_ptr()); };
  amx_tasks(g, xs, raw(packed), b.has_value() ? b->const_data_ptr<float>() : nullptr,
            residual.has_value() ? raw(*residual) : nullptr, static_cast<uint16_t*>(out.mutable_data_ptr()), relu);
#endif
  return out;
}

// ---- Winograd F(2x2, 3x3) and F(4x4, 3x3): 3x3 stride-1 convolutions with 2.25x or 4x fewer multiplications ----
//
// out tile (m x m) = A^T [ (G g G^T) . (B^T d B) ] A per (m+2) x (m+2) input patch d (Lavin & Gray,
// 2015; F(4x4, 3x3) on the points 0, 1, -1, 2, -2 and infinity). Three passes: the input transform
// writes V[P][tiles][Cin] (P = (m+2)^2 positions), P GEMMs (the micro-kernel above, one tap) give
// M[P][tiles][Cout] = V[pos] @ U[pos], and the output transform adds bias and residual and applies the
// ReLU. The weights' transform U = G g G^T is done once, when packing. F(4x4) does 44% fewer
// multiplications than F(2x2) but its weights are 2.25x larger, and its transforms' coefficients (up to
// 8) cost some precision: layer_choice times both where both run. Bfloat16 (F(2x2) only): the transforms
// in float32, V and U rounded to bfloat16 for AVX512_BF16's dot products, M in float32, the output
// rounded once. Emulated over ResNet-50 first (3 inputs): logits 0.0048-0.0053 from float32's (max
// relative), where the direct bfloat16 convolution gives 0.0042-0.0044 and torch's bfloat16 model
// 0.0052-0.0060; this kernel where the layer choice took it (Zen 4, batch 8): 0.0075-0.0083 against
// torch's 0.0053-0.0064.

namespace {

// The one-dimensional transforms of F(m, 3), n = m + 2: B^T d (n inputs -> n), A^T s (n -> m), on 8
// channels at once, and the weights' G (3 -> n) as small integers kG and a divisor per row.
template <int M>
struct Winograd;

template <>
struct Winograd<2> {
  static constexpr int N = 4;
#if RF_HAVE_CONV_GEMM
  __attribute__((target("avx2,fma"))) static inline void input(const __m256* d, __m256* r) {
    r[0] = _mm256_sub_ps(d[0], d[2]);
    r[1] = _mm256_add_ps(d[1], d[2]);
    r[2] = _mm256_sub_ps(d[2], d[1]);
    r[3] = _mm256_sub_ps(d[1], d[3]);
  }
  __attribute__((target("avx2,fma"))) static inline void output(const __m256* s, __m256* o) {
    o[0] = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), s[2]);
    o[1] = _mm256_sub_ps(_mm256_sub_ps(s[1], s[2]), s[3]);
  }
#endif
  // G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1] = diag(1 / kDiv) kG.
  static constexpr double kG[N][3] = {{1, 0, 0}, {1, 1, 1}, {1, -1, 1}, {0, 0, 1}};
  static constexpr double kDiv[N] = {1, 2, 2, 1};
};

template <>
struct Winograd<4> {
  static constexpr int N = 6;
#if RF_HAVE_CONV_GEMM
  // B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
  __attribute__((target("avx2,fma"))) static inline void input(const __m256* d, __m256* r) {
    const __m256 four = _mm256_set1_ps(4.f), five = _mm256_set1_ps(5.f), two = _mm256_set1_ps(2.f);
    const __m256 a = _mm256_fnmadd_ps(four, d[2], d[4]), b = _mm256_fnmadd_ps(four, d[1], d[3]);
    const __m256 c = _mm256_sub_ps(d[4], d[2]), e = _mm256_mul_ps(two, _mm256_sub_ps(d[3], d[1]));
    r[0] = _mm256_fmadd_ps(four, d[0], _mm256_fnmadd_ps(five, d[2], d[4]));
    r[1] = _mm256_add_ps(a, b);
    r[2] = _mm256_sub_ps(a, b);
    r[3] = _mm256_add_ps(c, e);
    r[4] = _mm256_sub_ps(c, e);
    r[5] = _mm256_fmadd_ps(four, d[1], _mm256_fnmadd_ps(five, d[3], d[5]));
  }
  // A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
  __attribute__((target("avx2,fma"))) static inline void output(const __m256* s, __m256* o) {
    const __m256 a = _mm256_add_ps(s[1], s[2]), b = _mm256_sub_ps(s[1], s[2]);
    const __m256 c = _mm256_add_ps(s[3], s[4]), e = _mm256_sub_ps(s[3], s[4]);
    o[0] = _mm256_add_ps(_mm256_add_ps(s[0], a), c);
    o[1] = _mm256_fmadd_ps(_mm256_set1_ps(2.f), e, b);
    o[2] = _mm256_fmadd_ps(_mm256_set1_ps(4.f), c, a);
    o[3] = _mm256_add_ps(_mm256_fmadd_ps(_mm256_set1_ps(8.f), e, b), s[5]);
  }
#endif
  // G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1] = diag(1 / kDiv) kG.
  static constexpr double kG[N][3] = {{1, 0, 0}, {-1, -1, -1}, {-1, 1, -1}, {1, 2, 4}, {1, -2, 4}, {0, 0, 1}};
  static constexpr double kDiv[N] = {4, 6, 6, 24, 24, 1};
};

#if RF_HAVE_CONV_GEMM
// 8 channels of float32 or bfloat16 (uint16_t) as float32, and back: a bfloat16 store rounds to nearest
// even (NaN stays NaN, as c10::BFloat16 rounds) and returns the value stored, widened.
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
__attribute__((target("avx2,fma"))) inline __m256 store8(float* p, __m256 v) {
  _mm256_storeu_ps(p, v);
  return v;
}
__attribute__((target("avx2,fma"))) inline __m256 store8(uint16_t* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(r, 16));
}

// V[pos][tile][c] for tiles [t0, t1): B^T d B per channel of each N x N patch (zeros outside the
// image), 8 channels per step (cin is a multiple of 8). Whether every value of V is finite: one Inf or
// NaN in a patch (or a transform past float32's range) would reach all of the tile's outputs, where torch
// keeps most of them finite. Each input the layer reads has a nonzero weight in some value of V (B is
// invertible), so a finite V means finite inputs; v - v is +0 for a finite v and NaN otherwise.
template <int M, typename T>
__attribute__((target("avx2,fma"))) bool winograd_input(const T* x, T* v, const Geometry& g, int64_t tiles_h,
                                                        int64_t tiles_w, int64_t t0, int64_t t1, int64_t tiles) {
  constexpr int N = Winograd<M>::N;
  const int64_t cin = g.cin, pos_stride = tiles * cin;
  const std::vector<T> zeros(cin, T(0));
  __m256 seen = _mm256_setzero_ps();  // the OR of every v - v: NaN lanes iff a value was not finite
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t img = t / (tiles_h * tiles_w), ty = (t / tiles_w) % tiles_h, tx = t % tiles_w;
    const T* d[N][N];  // the patch's pixels (a zero row outside the image)
    for (int64_t r = 0; r < N; ++r) {
      for (int64_t q = 0; q < N; ++q) {
        const int64_t iy = M * ty - g.ph + r, ix = M * tx - g.pw + q;
        const bool inside = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
        d[r][q] = inside ? x + ((img * g.h + iy) * g.w + ix) * cin : zeros.data();
      }
    }
    T* o = v + t * cin;
    for (int64_t c = 0; c < cin; c += 8) {
      __m256 s[N][N];  // B^T d, by rows
      for (int64_t q = 0; q < N; ++q) {
        __m256 col[N], out[N];
        for (int64_t r = 0; r < N; ++r) col[r] = load8(d[r][q] + c);
        Winograd<M>::input(col, out);
        for (int64_t r = 0; r < N; ++r) s[r][q] = out[r];
      }
      for (int64_t r = 0; r < N; ++r) {  // (B^T d) B
        __m256 out[N];
        Winograd<M>::input(s[r], out);
        for (int64_t q = 0; q < N; ++q) {
          const __m256 stored = store8(o + (r * N + q) * pos_stride + c, out[q]);
          seen = _mm256_or_ps(seen, _mm256_sub_ps(stored, stored));
        }
      }
    }
  }
  return _mm256_movemask_ps(_mm256_cmp_ps(seen, seen, _CMP_UNORD_Q)) == 0;
}

// act(A^T m A + b (+ residual)) for tiles [t0, t1), written where the M x M tile lies inside the
// output, 8 channels per step (cout is a multiple of 16).
template <int M, typename T>
__attribute__((target("avx2,fma"))) void winograd_output(const float* m, T* out, const float* bias, const T* res,
                                                         bool relu, const Geometry& g,
                                                         int64_t tiles_h, int64_t tiles_w, int64_t t0, int64_t t1,
                                                         int64_t tiles) {
  constexpr int N = Winograd<M>::N;
  const int64_t cout = g.cout, pos_stride = tiles * cout;
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t img = t / (tiles_h * tiles_w), ty = (t / tiles_w) % tiles_h, tx = t % tiles_w;
    const float* mt = m + t * cout;
    int64_t off[M][M];
    bool inside[M][M];
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < M; ++j) {
        const int64_t oy = M * ty + i, ox = M * tx + j;
        inside[i][j] = oy < g.oh && ox < g.ow;
        off[i][j] = ((img * g.oh + std::min(oy, g.oh - 1)) * g.ow + std::min(ox, g.ow - 1)) * cout;
      }
    }
    for (int64_t c = 0; c < cout; c += 8) {
      __m256 s[M][N];  // A^T m, by rows
      for (int64_t q = 0; q < N; ++q) {
        __m256 col[N], o[M];
        for (int64_t p = 0; p < N; ++p) col[p] = _mm256_loadu_ps(mt + (p * N + q) * pos_stride + c);
        Winograd<M>::output(col, o);
        for (int64_t i = 0; i < M; ++i) s[i][q] = o[i];
      }
      const __m256 b = bias ? _mm256_loadu_ps(bias + c) : zero;
      for (int64_t i = 0; i < M; ++i) {  // (A^T m) A
        __m256 y[M];
        Winograd<M>::output(s[i], y);
        for (int64_t j = 0; j < M; ++j) {
          if (!inside[i][j]) continue;
          __m256 v = _mm256_add_ps(y[j], b);
          if (res) v = _mm256_add_ps(v, load8(res + off[i][j] + c));
          if (relu) v = _mm256_max_ps(zero, v);  // NaN kept, as in micro_tile
          store8(out + off[i][j] + c, v);
        }
      }
    }
  }
}

// Whether it ran: false (and nothing written to op) where the transformed input is not finite. T is the
// data's type: float, or uint16_t holding bfloat16 (V and U bfloat16, M float32). ws: the workspace,
// V [P][tiles][Cin] then M [P][tiles][Cout] (float32 elements: V in bfloat16 uses half its room).
template <int M, typename T>
bool winograd_run(const T* xp, const T* up, const float* bp, const T* rp, T* op, float* ws, bool relu,
                  const Geometry& g) {
  constexpr int64_t P = Winograd<M>::N * Winograd<M>::N;
  const int64_t tiles_h = (g.oh + M - 1) / M, tiles_w = (g.ow + M - 1) / M, tiles = g.n * tiles_h * tiles_w;
  const int64_t cin = g.cin, cout = g.cout, panels = cout / NR;
  T* vp = reinterpret_cast<T*>(ws);
  float* mp = ws + P * tiles * cin;
  // The transforms split their tiles over the threads however few (grain 1): at batch 1 a 7x7 or 14x14
  // layer has 4-49 tiles, and with a grain of 16 one thread transformed 16 of them alone (in-process
  // A/B on the Xeon, batch-1 7x7 and 14x14 layers: 1.08-1.15x faster).
  std::atomic<bool> finite{true};
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    if (!winograd_input<M, T>(xp, vp, g, tiles_h, tiles_w, t0, t1, tiles)) {
      finite.store(false, std::memory_order_relaxed);
    }
  });
  if (!finite.load()) return false;
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  const bool wide = bf16 || use_avx512();
  const int64_t np_tile = wide ? NP512 : 1;
  const int64_t k_block = bf16 ? cin : KC;  // bfloat16: all of K in one call
  const int64_t mt = even_rows(tiles), row_tiles = (tiles + mt - 1) / mt;
  share_tasks(P * row_tiles, [&](const auto& take) {
    for (int64_t task = take(); task < P * row_tiles; task = take()) {
      const int64_t pos = task / row_tiles, m0 = (task % row_tiles) * mt, m1 = std::min(tiles, m0 + mt);
      const T* a_base = vp + pos * tiles * cin;
      float* c_base = mp + pos * tiles * cout;
      for (int64_t k0 = 0; k0 < cin; k0 += k_block) {
        const int64_t kc = std::min(k_block, cin - k0);
        for (int64_t r = m0; r < m1; r += MR) {
          const int64_t rows = std::min(MR, m1 - r);
          const T* a[MR];
          float* c[MR];
          for (int64_t i = 0; i < MR; ++i) {
            const int64_t row = r + std::min(i, rows - 1);
            a[i] = a_base + row * cin;
            c[i] = c_base + row * cout;
          }
          for (int64_t p = 0; p < panels; p += np_tile) {
            float* cp[MR];
            for (int64_t i = 0; i < MR; ++i) cp[i] = c[i] + p * NR;
            const int64_t np = std::min(np_tile, panels - p);
            if constexpr (bf16) {
              panel_tile_bf16(a, 1, cin, up + (pos * panels + p) * cin * NR, cin * NR, np, cp, rows, nullptr,
                              nullptr, false);
            } else {
              panel_tile(wide, a, 1, cin, k0, kc, up + (pos * panels + p) * cin * NR, cin * NR, np, cp, rows,
                         k0 == 0, k0 + kc >= cin, nullptr, nullptr, false);
            }
          }
        }
      }
    }
  });
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    winograd_output<M, T>(mp, op, bp, rp, relu, g, tiles_h, tiles_w, t0, t1, tiles);
  });
  return true;
}
#endif

// U = G g G^T for one panel (16 output channels, the vector lanes) at one input channel: g[k][lane] the 3x3
// taps, out[pos * pos_stride + lane]. kG g kG^T (integers up to 4) is exact in float64 unless a kernel's
// taps differ by more than 2^29 in magnitude; then one float64 division, and the rounding to float.
// Bfloat16 (T = uint16_t): rounded once more, to bfloat16 (through float32), lanes `lane` elements apart.
template <int M, typename T>
__attribute__((always_inline)) inline bool winograd_weight_panel(const double (*g)[NR], T* out, int64_t pos_stride,
                                                                 int64_t lane) {
  using W = Winograd<M>;
  constexpr int N = W::N;
  double t[N][3][NR];  // kG g
  bool finite = true;  // checked as written: reading the 36 positions back, 1 MB apart, took most of the time
  for (int i = 0; i < N; ++i) {
    for (int j = 0; j < 3; ++j) {
      for (int l = 0; l < NR; ++l) {
        t[i][j][l] = W::kG[i][0] * g[j][l] + W::kG[i][1] * g[3 + j][l] + W::kG[i][2] * g[6 + j][l];
      }
    }
  }
  for (int i = 0; i < N; ++i) {
    for (int j = 0; j < N; ++j) {
      const double div = W::kDiv[i] * W::kDiv[j];
      T* o = out + (i * N + j) * pos_stride;
      for (int l = 0; l < NR; ++l) {
        const double u = W::kG[j][0] * t[i][0][l] + W::kG[j][1] * t[i][1][l] + W::kG[j][2] * t[i][2][l];
        float v = static_cast<float>(u / div);
        if constexpr (std::is_same_v<T, uint16_t>) {
          const c10::BFloat16 h(v);
          o[l * lane] = h.x;
          v = static_cast<float>(h);
        } else {
          o[l * lane] = v;
        }
        finite &= finite_value(v);
      }
    }
  }
  return finite;
}

// Panels [b, e) of (panel, input channel) pairs, one full 64-byte line per position and pair, from
// w[o] * scale[o] (scale may be null; the float32 product, as the fold computes it, rounded to bfloat16
// for a bfloat16 weight). Whether every value written is finite. T: float, or uint16_t holding bfloat16,
// whose panels hold channel pairs ([Cin/2][16][2], the bfloat16 GEMM's).
template <int M, typename T>
__attribute__((always_inline)) inline bool pack_winograd_range(const T* src, const float* scale, T* dst, int64_t cout,
                                                               int64_t cin, int64_t b, int64_t e) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  double g[9][NR];
  bool finite = true;
  for (int64_t i = b; i < e; ++i) {
    const int64_t panel = i / cin, c = i % cin;
    for (int64_t l = 0; l < NR; ++l) {
      const T* taps = src + ((panel * NR + l) * cin + c) * 9;
      const float s = scale ? scale[panel * NR + l] : 1.0f;
      for (int k = 0; k < 9; ++k) {
        float v;
        if constexpr (bf16) {
          v = static_cast<float>(c10::BFloat16(taps[k], c10::BFloat16::from_bits()));
          if (scale) v = static_cast<float>(c10::BFloat16(v * s));
        } else {
          v = scale ? taps[k] * s : taps[k];
        }
        g[k][l] = v;
      }
    }
    T* out = bf16 ? dst + (panel * cin + c / 2 * 2) * NR + c % 2 : dst + (panel * cin + c) * NR;
    finite &= winograd_weight_panel<M, T>(g, out, cout * cin, bf16 ? 2 : 1);
  }
  return finite;
}

#if RF_HAVE_CONV_GEMM
template <int M, typename T>
__attribute__((target("avx2,fma"))) bool pack_winograd_range_avx2(const T* src, const float* scale, T* dst,
                                                                   int64_t cout, int64_t cin, int64_t b, int64_t e) {
  return pack_winograd_range<M, T>(src, scale, dst, cout, cin, b, e);
}
#endif

template <int M, typename T>
bool pack_winograd(const T* src, const float* scale, T* dst, int64_t cout, int64_t cin) {
  // Vectorized across a panel's output channels (the float64 scalar version took 36 ms for a 512-channel
  // F(4x4) weight, most of a first call's packing).
  std::atomic<bool> finite{true};
  at::parallel_for(0, cout / NR * cin, 64, [&](int64_t b, int64_t e) {
#if RF_HAVE_CONV_GEMM
    if (cpu_features().avx2_fma) {
      if (!pack_winograd_range_avx2<M, T>(src, scale, dst, cout, cin, b, e)) finite.store(false);
      return;
    }
#endif
    if (!pack_winograd_range<M, T>(src, scale, dst, cout, cin, b, e)) finite.store(false);
  });
  return finite.load();
}

int64_t winograd_positions(int64_t tile) { return (tile + 2) * (tile + 2); }

}  // namespace

int64_t winograd_workspace_size(at::IntArrayRef x_shape, int64_t cout, at::IntArrayRef padding, int64_t tile) {
  TORCH_CHECK(x_shape.size() == 4 && padding.size() == 2, "winograd_workspace_size: expected a 4-D input shape");
  TORCH_CHECK(tile == 2 || tile == 4, "winograd_workspace_size: tile must be 2 or 4, got ", tile);
  const int64_t oh = x_shape[2] + 2 * padding[0] - 2, ow = x_shape[3] + 2 * padding[1] - 2;
  const int64_t tiles = x_shape[0] * ((oh + tile - 1) / tile) * ((ow + tile - 1) / tile);
  return winograd_positions(tile) * tiles * (x_shape[1] + cout);  // V [P][tiles][Cin], then M [P][tiles][Cout]
}

std::optional<at::Tensor> pack_winograd_weight(const at::Tensor& w, int64_t tile, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 &&
                  (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) && w.device().is_cpu(),
              "pack_winograd_weight: expected a float32 or bfloat16 [Cout, Cin, 3, 3] CPU weight, got ", w.sizes(), " ",
              w.scalar_type(), " on ", w.device());
  TORCH_CHECK(w.size(0) % NR == 0, "pack_winograd_weight: Cout must be a multiple of ", NR, ", got ", w.size(0));
  TORCH_CHECK(tile == 2 || tile == 4, "pack_winograd_weight: tile must be 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3)), got ",
              tile);
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK(!bf16 || (tile == 2 && w.size(1) % 2 == 0),
              "pack_winograd_weight: a bfloat16 weight takes tile 2 (F(2x2, 3x3)) and an even Cin, got tile ", tile,
              " and ", w.size(1), " input channels");
  const int64_t cout = w.size(0), cin = w.size(1);
  const float* sp = check_scale("pack_winograd_weight", scale, cout);
  const at::Tensor wc = w.contiguous();
  const int64_t positions = winograd_positions(tile);
  bool finite;
  at::Tensor packed;
  if (bf16) {  // [P positions][Cout/16][Cin/2][16][2]: per position, the bfloat16 GEMM's panels of a 1x1 weight
    packed = empty_huge({positions, cout / NR, cin / 2, NR, 2}, at::kBFloat16);
    const auto* src = reinterpret_cast<const uint16_t*>(wc.const_data_ptr<at::BFloat16>());
    auto* dst = reinterpret_cast<uint16_t*>(packed.mutable_data_ptr<at::BFloat16>());
    finite = pack_winograd<2>(src, sp, dst, cout, cin);
  } else {  // [P positions][Cout/16][Cin][16]: per position, the conv_gemm panels of a 1x1 weight
    packed = empty_huge({positions, cout / NR, cin, NR}, at::kFloat);
    const float* src = wc.const_data_ptr<float>();
    float* dst = packed.mutable_data_ptr<float>();
    finite = tile == 2 ? pack_winograd<2>(src, sp, dst, cout, cin) : pack_winograd<4>(src, sp, dst, cout, cin);
  }
  if (!finite) return std::nullopt;
  return packed;
}

std::optional<at::Tensor> conv_winograd_bias_act(const at::Tensor& x, const at::Tensor& packed,
                                                 const std::optional<at::Tensor>& b,
                                                 const std::optional<at::Tensor>& residual, bool relu,
                                                 at::IntArrayRef padding, const std::optional<at::Tensor>& out_,
                                                 const std::optional<at::Tensor>& workspace) {
  const char* name = "conv_winograd_bias_act";
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.scalar_type() == at::kFloat || bf16, name, ": expected a float32 or bfloat16 input, got ",
              x.scalar_type());
  TORCH_CHECK(!bf16 || conv_gemm_bf16_supported(), name, ": bfloat16 needs a CPU with AVX512_BF16");
  // The tile size is the packed weight's: 16 positions for F(2x2, 3x3), 36 for F(4x4, 3x3).
  const int64_t tile = packed.dim() == 4 && packed.size(0) == 36 ? 4 : 2;
  const bool layout = bf16 ? packed.dim() == 5 && packed.size(0) == 16 && packed.size(2) * 2 == x.size(1) &&
                                 packed.size(3) == NR && packed.size(4) == 2
                           : packed.dim() == 4 && (packed.size(0) == 16 || packed.size(0) == 36) &&
                                 packed.size(2) == x.size(1) && packed.size(3) == NR;
  TORCH_CHECK(layout && packed.scalar_type() == x.scalar_type() && packed.is_contiguous(), name,
              ": weight not packed by pack_winograd_weight for ", x.size(1), " ", x.scalar_type(), " input channels");
  TORCH_CHECK(x.size(1) % 8 == 0, name, ": input channels must be a multiple of 8, got ", x.size(1));
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), name, ": x must be channels_last");
  const Geometry g = check_args(name, x, 3, 3, packed.size(1) * NR, b, residual, {1, 1}, padding, {1, 1});
  at::Tensor out = output_for(name, x, residual, g, out_);
#if RF_HAVE_CONV_GEMM
  // V and M: in the caller's workspace when given (kept warm between calls), else fresh.
  const int64_t need = winograd_workspace_size(x.sizes(), g.cout, padding, tile);
  at::Tensor space;
  if (workspace.has_value()) {
    space = *workspace;
    TORCH_CHECK(space.scalar_type() == at::kFloat && space.device().is_cpu() && space.is_contiguous() &&
                    space.numel() >= need,
                name, ": workspace must be a contiguous float32 CPU tensor of at least ", need, " elements");
    at::assert_no_overlap(space, x);
    at::assert_no_overlap(space, out);
  } else {
    space = at::empty({need}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  }
  const float* bp = b.has_value() ? b->const_data_ptr<float>() : nullptr;
  float* ws = space.mutable_data_ptr<float>();
  bool ran;
  if (bf16) {
    auto bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr()); };
    ran = winograd_run<2, uint16_t>(bits(x), bits(packed), bp, residual.has_value() ? bits(*residual) : nullptr,
                                    reinterpret_cast<uint16_t*>(out.mutable_data_ptr()), ws, relu, g);
  } else {
    const float* rp = residual.has_value() ? residual->const_data_ptr<float>() : nullptr;
    auto run = tile == 4 ? winograd_run<4, float> : winograd_run<2, float>;
    ran = run(x.const_data_ptr<float>(), packed.const_data_ptr<float>(), bp, rp, out.mutable_data_ptr<float>(), ws,
              relu, g);
  }
  if (!ran) return std::nullopt;
#endif
  return out;
}

}  // namespace cpu
}  // namespace resnet_fast
