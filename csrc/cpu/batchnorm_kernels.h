// Training batch-norm kernels, included once per instruction set by batchnorm.cpp (baseline) and
// batchnorm_avx2.cpp (AVX2 + FMA, chosen at run time where the CPU has them): at::vec's
// Vectorized<float> is whatever CPU_CAPABILITY the including file sets, so one source serves both.
// Everything here lives in namespace RF_BN_ARCH; no std containers (their out-of-line instantiations
// would be shared with the other file's and could run AVX2 code on a CPU without it).
//
// Layouts: NHWC (4-D channels_last) runs rows of C values, vectorized across channels; contiguous
// [N, C, *] runs planes of one channel, vectorized along the plane. Both split the work into tiles of
// a fixed size (independent of the thread count, so results are deterministic), reduce each tile in
// the math type, and combine the tiles per channel in double.
// Statistics never use E[x^2] - E[x]^2: each tile is reduced in two passes (mean, then the sum and
// the sum of squares of deviations from that mean, the tile still in cache: the corrected two-pass
// algorithm) and tiles are merged with Chan's parallel formula for (count, mean, M2).
#pragma once

#ifndef RF_BN_ARCH
#error "define RF_BN_ARCH (the namespace of this instruction set's kernels) before including"
#endif

namespace resnet_fast {
namespace cpu {
namespace RF_BN_ARCH {

constexpr int64_t kTile = 16384;  // elements per tile: 64 KiB of fp32, stays in L2 between passes

inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline double dmax0(double a) { return a > 0.0 ? a : 0.0; }

// A zero-initialised heap array local to this file's namespace.
template <typename T>
struct Buffer {
  T* p;
  int64_t n;
  explicit Buffer(int64_t size) : p(new T[size]()), n(size) {}
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { delete[] p; }
  T* data() { return p; }
  const T* data() const { return p; }
  T& operator[](int64_t i) { return p[i]; }
  const T& operator[](int64_t i) const { return p[i]; }
};

inline bool is_nhwc(const at::Tensor& x) {
  return x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

using at::vec::Vectorized;

// Vectorized<opmath_t> loads and stores from scalar_t memory: one Vectorized<scalar_t> holds kN of them.
template <typename scalar_t>
struct VecIO {
  using opmath_t = at::opmath_type<scalar_t>;
  using OVec = Vectorized<opmath_t>;
  static constexpr bool kSame = std::is_same_v<scalar_t, opmath_t>;
  static constexpr int kN = kSame ? 1 : 2;
  static constexpr int64_t kStep = Vectorized<scalar_t>::size();

  static void load(const scalar_t* p, OVec (&v)[kN]) {
    if constexpr (kSame) {
      v[0] = OVec::loadu(p);
    } else {
      std::tie(v[0], v[1]) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    }
  }
  static void store(scalar_t* p, const OVec (&v)[kN]) {
    if constexpr (kSame) {
      v[0].store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    }
  }
};

// The pre-activation x*s + t (+ r): the forward apply and the backward's ReLU mask both call these,
// in the same loop structure (vector body, scalar tail), so the mask is exactly the forward's.
template <typename opmath_t>
inline opmath_t pre_act(opmath_t x, opmath_t s, opmath_t t, const opmath_t* r) {
  opmath_t pre = x * s + t;
  if (r) pre = pre + *r;
  return pre;
}

template <typename OVec>
inline OVec pre_act_vec(const OVec& x, const OVec& s, const OVec& t, const OVec* r) {
  OVec pre = at::vec::fmadd(x, s, t);
  if (r) pre = pre + *r;
  return pre;
}

template <typename opmath_t>
inline opmath_t masked(opmath_t dy, opmath_t x, opmath_t s, opmath_t t, const opmath_t* r) {
  return pre_act(x, s, t, r) > opmath_t(0) ? dy : opmath_t(0);  // NaN pre-activation: 0, as relu's backward
}

template <typename OVec>
inline OVec masked_vec(const OVec& dy, const OVec& x, const OVec& s, const OVec& t, const OVec* r) {
  return OVec::blendv(OVec(0), dy, pre_act_vec(x, s, t, r) > OVec(0));
}

// ------------------------------------------------------------------------------------------ statistics

struct Moments {
  int64_t count = 0;
  double mean = 0, m2 = 0;
  void merge(int64_t n, double m, double q) {  // Chan et al.: combine (count, mean, M2) pairs
    if (n == 0) return;
    const int64_t total = count + n;
    const double delta = m - mean;
    mean += delta * static_cast<double>(n) / static_cast<double>(total);
    m2 += q + delta * delta * static_cast<double>(count) * static_cast<double>(n) / static_cast<double>(total);
    count = total;
  }
};

// Writes mean and biased variance per channel from per-tile (mean, M2) arrays [tiles, C] with tile counts.
// Tile means are kept in double: rounded to float they would add spurious spread (their rounding error
// squared, times the tile count) when merged.
template <typename opmath_t>
void combine_tiles(const Buffer<double>& tmean, const Buffer<double>& tm2,
                   const Buffer<int64_t>& tcount, int64_t channels, opmath_t* mean, opmath_t* var) {
  const int64_t tiles = static_cast<int64_t>(tcount.n);
  at::parallel_for(0, channels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      Moments m;
      for (int64_t i = 0; i < tiles; ++i) m.merge(tcount[i], tmean[i * channels + c], tm2[i * channels + c]);
      mean[c] = static_cast<opmath_t>(m.mean);
      var[c] = static_cast<opmath_t>(m.m2 / static_cast<double>(m.count));
    }
  });
}

template <typename scalar_t>
void stats_nhwc(const scalar_t* x, int64_t rows, int64_t channels, at::opmath_type<scalar_t>* mean,
                at::opmath_type<scalar_t>* var) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  constexpr int64_t kStep = IO::kStep;
  const int64_t tile_rows = imax(1, kTile / channels);
  const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
  Buffer<double> tmean(tiles * channels), tm2(tiles * channels);
  Buffer<int64_t> tcount(tiles);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    // Per-channel accumulators: pass-1 sum / mean, sum of deviations, sum of squared deviations.
    Buffer<opmath_t> work(3 * channels);
    opmath_t* m = work.data();
    opmath_t* s1 = m + channels;
    opmath_t* q = s1 + channels;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r0 = tile * tile_rows, r1 = imin(rows, r0 + tile_rows);
      for (int64_t i = 0; i < 3 * channels; ++i) work[i] = opmath_t(0);
      const opmath_t inv_n = opmath_t(1) / static_cast<opmath_t>(r1 - r0);
      // Pass 1: per-channel sums -> tile mean.
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = x + r * channels;
        int64_t c = 0;
        for (; c + kStep <= channels; c += kStep) {
          OVec v[IO::kN];
          IO::load(row + c, v);
          for (int k = 0; k < IO::kN; ++k) (OVec::loadu(m + c + k * OVec::size()) + v[k]).store(m + c + k * OVec::size());
        }
        for (; c < channels; ++c) m[c] += static_cast<opmath_t>(row[c]);
      }
      for (int64_t c = 0; c < channels; ++c) m[c] *= inv_n;
      // Pass 2: deviations from that mean, summed and squared; the corrected two-pass formula
      // (mean += sum d / n, M2 = sum d^2 - (sum d)^2 / n) removes the rounding error of pass 1.
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = x + r * channels;
        int64_t c = 0;
        for (; c + kStep <= channels; c += kStep) {
          OVec v[IO::kN];
          IO::load(row + c, v);
          for (int k = 0; k < IO::kN; ++k) {
            const int64_t o = c + k * OVec::size();
            const OVec d = v[k] - OVec::loadu(m + o);
            (OVec::loadu(s1 + o) + d).store(s1 + o);
            (OVec::loadu(q + o) + d * d).store(q + o);
          }
        }
        for (; c < channels; ++c) {
          const opmath_t d = static_cast<opmath_t>(row[c]) - m[c];
          s1[c] += d;
          q[c] += d * d;
        }
      }
      const double n = static_cast<double>(r1 - r0);
      for (int64_t c = 0; c < channels; ++c) {
        const double d = s1[c];
        tmean[tile * channels + c] = m[c] + d / n;
        tm2[tile * channels + c] = dmax0( q[c] - d * d / n);
      }
      tcount[tile] = r1 - r0;
    }
  });
  combine_tiles(tmean, tm2, tcount, channels, mean, var);
}

// Sum of x[0..n) in the math type, vectorized.
template <typename scalar_t, typename F>
at::opmath_type<scalar_t> plane_sum(const scalar_t* x, int64_t n, F f) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  OVec acc(0);
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    OVec v[IO::kN];
    IO::load(x + i, v);
    for (int k = 0; k < IO::kN; ++k) acc = acc + f(v[k]);
  }
  opmath_t s = at::vec::vec_reduce_all<opmath_t>([](OVec& a, OVec& b) { return a + b; }, acc);
  for (; i < n; ++i) s += f(static_cast<opmath_t>(x[i]));
  return s;
}

template <typename scalar_t>
void stats_nchw(const scalar_t* x, int64_t batch, int64_t channels, int64_t inner, at::opmath_type<scalar_t>* mean,
                at::opmath_type<scalar_t>* var) {
  using opmath_t = at::opmath_type<scalar_t>;
  // Tiles: pieces of at most kTile elements of one (n, c) plane.
  const int64_t pieces = imax(1, (inner + kTile - 1) / kTile);
  const int64_t piece_len = (inner + pieces - 1) / pieces;
  const int64_t tiles = batch * pieces;  // per channel
  Buffer<double> tmean(tiles * channels), tm2(tiles * channels);
  Buffer<int64_t> tcount(tiles);
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t p = i % pieces;
    tcount[i] = imax(0, imin(inner, (p + 1) * piece_len) - p * piece_len);
  }
  at::parallel_for(0, tiles * channels, imax(1, kTile / imax(1, piece_len)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t j = begin; j < end; ++j) {
                       // j enumerates (n, c, piece) in memory order; stored at [tile = n*pieces + piece, c].
                       const int64_t p = j % pieces, c = (j / pieces) % channels, n = j / (pieces * channels);
                       const int64_t start = p * piece_len, len = tcount[n * pieces + p];
                       const scalar_t* base = x + (n * channels + c) * inner + start;
                       double m = 0, q = 0;
                       if (len > 0) {  // corrected two-pass, as stats_nhwc
                         const opmath_t m1 = plane_sum(base, len, [](auto v) { return v; }) / static_cast<opmath_t>(len);
                         const double s1 = plane_sum(base, len, [m1](auto v) { return v - decltype(v)(m1); });
                         const double s2 = plane_sum(base, len, [m1](auto v) {
                           const auto d = v - decltype(v)(m1);
                           return d * d;
                         });
                         m = m1 + s1 / static_cast<double>(len);
                         q = dmax0( s2 - s1 * s1 / static_cast<double>(len));
                       }
                       tmean[(n * pieces + p) * channels + c] = m;
                       tm2[(n * pieces + p) * channels + c] = q;
                     }
                   });
  combine_tiles(tmean, tm2, tcount, channels, mean, var);
}

// ----------------------------------------------------------------------------------------- apply

template <typename scalar_t>
void apply_nhwc(const scalar_t* x, const at::opmath_type<scalar_t>* s, const at::opmath_type<scalar_t>* t,
                const scalar_t* r, scalar_t* y, int64_t rows, int64_t channels, bool relu) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  constexpr int64_t kStep = IO::kStep;
  at::parallel_for(0, rows, imax(1, kTile / channels), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row * channels;
      int64_t c = 0;
      for (; c + kStep <= channels; c += kStep) {
        OVec v[IO::kN], rv[IO::kN];
        IO::load(x + o + c, v);
        if (r) IO::load(r + o + c, rv);
        for (int k = 0; k < IO::kN; ++k) {
          const int64_t cc = c + k * OVec::size();
          v[k] = pre_act_vec(v[k], OVec::loadu(s + cc), OVec::loadu(t + cc), r ? &rv[k] : nullptr);
          if (relu) v[k] = at::vec::clamp_min(v[k], OVec(0));  // NaN stays NaN, like torch.relu
        }
        IO::store(y + o + c, v);
      }
      for (; c < channels; ++c) {
        const opmath_t rv = r ? static_cast<opmath_t>(r[o + c]) : opmath_t(0);
        opmath_t v = pre_act(static_cast<opmath_t>(x[o + c]), s[c], t[c], r ? &rv : nullptr);
        if (relu) v = v < opmath_t(0) ? opmath_t(0) : v;
        y[o + c] = static_cast<scalar_t>(v);
      }
    }
  });
}

template <typename scalar_t>
void apply_nchw(const scalar_t* x, const at::opmath_type<scalar_t>* s, const at::opmath_type<scalar_t>* t,
                const scalar_t* r, scalar_t* y, int64_t batch, int64_t channels, int64_t inner, bool relu) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  at::parallel_for(0, batch * channels, imax(1, kTile / inner), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % channels, o = p * inner;
      const OVec vs(s[c]), vt(t[c]);
      int64_t i = 0;
      for (; i + IO::kStep <= inner; i += IO::kStep) {
        OVec v[IO::kN], rv[IO::kN];
        IO::load(x + o + i, v);
        if (r) IO::load(r + o + i, rv);
        for (int k = 0; k < IO::kN; ++k) {
          v[k] = pre_act_vec(v[k], vs, vt, r ? &rv[k] : nullptr);
          if (relu) v[k] = at::vec::clamp_min(v[k], OVec(0));
        }
        IO::store(y + o + i, v);
      }
      for (; i < inner; ++i) {
        const opmath_t rv = r ? static_cast<opmath_t>(r[o + i]) : opmath_t(0);
        opmath_t v = pre_act(static_cast<opmath_t>(x[o + i]), s[c], t[c], r ? &rv : nullptr);
        if (relu) v = v < opmath_t(0) ? opmath_t(0) : v;
        y[o + i] = static_cast<scalar_t>(v);
      }
    }
  });
}

// ------------------------------------------------------------------------------------- backward reduce

// Per-tile sums [tiles, C] of dy' and dy' * (x - mean), summed over tiles in double.
template <typename opmath_t>
void sum_tiles(const Buffer<opmath_t>& ta, const Buffer<opmath_t>& tb, int64_t tiles, int64_t channels,
               opmath_t* sum_a, opmath_t* sum_b) {
  at::parallel_for(0, channels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double a = 0, b = 0;
      for (int64_t i = 0; i < tiles; ++i) {
        a += ta[i * channels + c];
        b += tb[i * channels + c];
      }
      sum_a[c] = static_cast<opmath_t>(a);
      sum_b[c] = static_cast<opmath_t>(b);
    }
  });
}

template <typename scalar_t>
struct BwdArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* r;  // residual or nullptr
  const opmath_t* s;  // scale, shift: the forward's; used for the ReLU mask
  const opmath_t* t;
  const opmath_t* mean;
  bool relu;
};

template <typename scalar_t>
void reduce_nhwc(const BwdArgs<scalar_t>& a, int64_t rows, int64_t channels, at::opmath_type<scalar_t>* sum_dy,
                 at::opmath_type<scalar_t>* sum_dy_xmu) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  constexpr int64_t kStep = IO::kStep;
  const int64_t tile_rows = imax(1, kTile / channels);
  const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
  Buffer<opmath_t> ta(tiles * channels), tb(tiles * channels);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r0 = tile * tile_rows, r1 = imin(rows, r0 + tile_rows);
      opmath_t* sa = ta.data() + tile * channels;
      opmath_t* sb = tb.data() + tile * channels;
      for (int64_t c = 0; c < channels; ++c) sa[c] = sb[c] = opmath_t(0);
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t o = row * channels;
        int64_t c = 0;
        for (; c + kStep <= channels; c += kStep) {
          OVec g[IO::kN], x[IO::kN], r[IO::kN];
          IO::load(a.dy + o + c, g);
          IO::load(a.x + o + c, x);
          if (a.r) IO::load(a.r + o + c, r);
          for (int k = 0; k < IO::kN; ++k) {
            const int64_t cc = c + k * OVec::size();
            if (a.relu) g[k] = masked_vec(g[k], x[k], OVec::loadu(a.s + cc), OVec::loadu(a.t + cc), a.r ? &r[k] : nullptr);
            (OVec::loadu(sa + cc) + g[k]).store(sa + cc);
            (OVec::loadu(sb + cc) + g[k] * (x[k] - OVec::loadu(a.mean + cc))).store(sb + cc);
          }
        }
        for (; c < channels; ++c) {
          opmath_t g = static_cast<opmath_t>(a.dy[o + c]);
          const opmath_t x = static_cast<opmath_t>(a.x[o + c]);
          const opmath_t r = a.r ? static_cast<opmath_t>(a.r[o + c]) : opmath_t(0);
          if (a.relu) g = masked(g, x, a.s[c], a.t[c], a.r ? &r : nullptr);
          sa[c] += g;
          sb[c] += g * (x - a.mean[c]);
        }
      }
    }
  });
  sum_tiles(ta, tb, tiles, channels, sum_dy, sum_dy_xmu);
}

template <typename scalar_t>
void reduce_nchw(const BwdArgs<scalar_t>& a, int64_t batch, int64_t channels, int64_t inner,
                 at::opmath_type<scalar_t>* sum_dy, at::opmath_type<scalar_t>* sum_dy_xmu) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  Buffer<opmath_t> ta(batch * channels), tb(batch * channels);  // one tile per (n, c) plane
  at::parallel_for(0, batch * channels, imax(1, kTile / inner), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % channels, o = p * inner;
      const OVec vs(a.s[c]), vt(a.t[c]), vm(a.mean[c]);
      OVec acc_a(0), acc_b(0);
      int64_t i = 0;
      for (; i + IO::kStep <= inner; i += IO::kStep) {
        OVec g[IO::kN], x[IO::kN], r[IO::kN];
        IO::load(a.dy + o + i, g);
        IO::load(a.x + o + i, x);
        if (a.r) IO::load(a.r + o + i, r);
        for (int k = 0; k < IO::kN; ++k) {
          if (a.relu) g[k] = masked_vec(g[k], x[k], vs, vt, a.r ? &r[k] : nullptr);
          acc_a = acc_a + g[k];
          acc_b = acc_b + g[k] * (x[k] - vm);
        }
      }
      const auto add = [](OVec& u, OVec& v) { return u + v; };
      opmath_t sa = at::vec::vec_reduce_all<opmath_t>(add, acc_a);
      opmath_t sb = at::vec::vec_reduce_all<opmath_t>(add, acc_b);
      for (; i < inner; ++i) {
        opmath_t g = static_cast<opmath_t>(a.dy[o + i]);
        const opmath_t x = static_cast<opmath_t>(a.x[o + i]);
        const opmath_t r = a.r ? static_cast<opmath_t>(a.r[o + i]) : opmath_t(0);
        if (a.relu) g = masked(g, x, a.s[c], a.t[c], a.r ? &r : nullptr);
        sa += g;
        sb += g * (x - a.mean[c]);
      }
      ta[p] = sa;  // [n, c] = [tile, c]
      tb[p] = sb;
    }
  });
  sum_tiles(ta, tb, batch, channels, sum_dy, sum_dy_xmu);
}

// ------------------------------------------------------------------------------------ backward elemt

// dx = ka*dy' + kb*(x - mean) + kc per channel; dres = dy'.
template <typename scalar_t>
struct ElemtArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  BwdArgs<scalar_t> in;
  const opmath_t* ka;
  const opmath_t* kb;
  const opmath_t* kc;
  scalar_t* dx;
  scalar_t* dres;  // or nullptr
};

template <typename scalar_t>
void elemt_nhwc(const ElemtArgs<scalar_t>& e, int64_t rows, int64_t channels) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  constexpr int64_t kStep = IO::kStep;
  const auto& a = e.in;
  at::parallel_for(0, rows, imax(1, kTile / channels), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row * channels;
      int64_t c = 0;
      for (; c + kStep <= channels; c += kStep) {
        OVec g[IO::kN], x[IO::kN], r[IO::kN], dx[IO::kN];
        IO::load(a.dy + o + c, g);
        IO::load(a.x + o + c, x);
        if (a.r) IO::load(a.r + o + c, r);
        for (int k = 0; k < IO::kN; ++k) {
          const int64_t cc = c + k * OVec::size();
          if (a.relu) g[k] = masked_vec(g[k], x[k], OVec::loadu(a.s + cc), OVec::loadu(a.t + cc), a.r ? &r[k] : nullptr);
          dx[k] = OVec::loadu(e.ka + cc) * g[k] + OVec::loadu(e.kb + cc) * (x[k] - OVec::loadu(a.mean + cc)) +
                  OVec::loadu(e.kc + cc);
        }
        IO::store(e.dx + o + c, dx);
        if (e.dres) IO::store(e.dres + o + c, g);
      }
      for (; c < channels; ++c) {
        opmath_t g = static_cast<opmath_t>(a.dy[o + c]);
        const opmath_t x = static_cast<opmath_t>(a.x[o + c]);
        const opmath_t r = a.r ? static_cast<opmath_t>(a.r[o + c]) : opmath_t(0);
        if (a.relu) g = masked(g, x, a.s[c], a.t[c], a.r ? &r : nullptr);
        e.dx[o + c] = static_cast<scalar_t>(e.ka[c] * g + e.kb[c] * (x - a.mean[c]) + e.kc[c]);
        if (e.dres) e.dres[o + c] = static_cast<scalar_t>(g);
      }
    }
  });
}

template <typename scalar_t>
void elemt_nchw(const ElemtArgs<scalar_t>& e, int64_t batch, int64_t channels, int64_t inner) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  const auto& a = e.in;
  at::parallel_for(0, batch * channels, imax(1, kTile / inner), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % channels, o = p * inner;
      const OVec vs(a.s[c]), vt(a.t[c]), vm(a.mean[c]), va(e.ka[c]), vb(e.kb[c]), vc(e.kc[c]);
      int64_t i = 0;
      for (; i + IO::kStep <= inner; i += IO::kStep) {
        OVec g[IO::kN], x[IO::kN], r[IO::kN], dx[IO::kN];
        IO::load(a.dy + o + i, g);
        IO::load(a.x + o + i, x);
        if (a.r) IO::load(a.r + o + i, r);
        for (int k = 0; k < IO::kN; ++k) {
          if (a.relu) g[k] = masked_vec(g[k], x[k], vs, vt, a.r ? &r[k] : nullptr);
          dx[k] = va * g[k] + vb * (x[k] - vm) + vc;
        }
        IO::store(e.dx + o + i, dx);
        if (e.dres) IO::store(e.dres + o + i, g);
      }
      for (; i < inner; ++i) {
        opmath_t g = static_cast<opmath_t>(a.dy[o + i]);
        const opmath_t x = static_cast<opmath_t>(a.x[o + i]);
        const opmath_t r = a.r ? static_cast<opmath_t>(a.r[o + i]) : opmath_t(0);
        if (a.relu) g = masked(g, x, a.s[c], a.t[c], a.r ? &r : nullptr);
        e.dx[o + i] = static_cast<scalar_t>(e.ka[c] * g + e.kb[c] * (x - a.mean[c]) + e.kc[c]);
        if (e.dres) e.dres[o + i] = static_cast<scalar_t>(g);
      }
    }
  });
}

template <typename scalar_t>
BwdArgs<scalar_t> bwd_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale,
                           const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                           const at::Tensor& mean, bool relu) {
  using opmath_t = at::opmath_type<scalar_t>;
  return {dy.const_data_ptr<scalar_t>(),
          x.const_data_ptr<scalar_t>(),
          residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr,
          scale.const_data_ptr<opmath_t>(),
          shift.const_data_ptr<opmath_t>(),
          mean.const_data_ptr<opmath_t>(),
          relu};
}

// ------------------------------------------------------------------------------------ entry points

inline void stats(const at::Tensor& x, at::Tensor& mean, at::Tensor& var) {
  const int64_t channels = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_stats_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto* pm = mean.mutable_data_ptr<opmath_t>();
    auto* pv = var.mutable_data_ptr<opmath_t>();
    if (is_nhwc(x)) {
      stats_nhwc<scalar_t>(x.const_data_ptr<scalar_t>(), x.numel() / channels, channels, pm, pv);
    } else {
      stats_nchw<scalar_t>(x.const_data_ptr<scalar_t>(), x.size(0), channels, x.numel() / (x.size(0) * channels),
                           pm, pv);
    }
  });
}

inline void apply(at::Tensor& y, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                  const std::optional<at::Tensor>& residual, bool relu) {
  const int64_t channels = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_apply_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* r = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    const auto* s = scale.const_data_ptr<opmath_t>();
    const auto* t = shift.const_data_ptr<opmath_t>();
    if (is_nhwc(x)) {
      apply_nhwc<scalar_t>(x.const_data_ptr<scalar_t>(), s, t, r, y.mutable_data_ptr<scalar_t>(),
                           x.numel() / channels, channels, relu);
    } else {
      apply_nchw<scalar_t>(x.const_data_ptr<scalar_t>(), s, t, r, y.mutable_data_ptr<scalar_t>(), x.size(0),
                           channels, x.numel() / (x.size(0) * channels), relu);
    }
  });
}

inline void backward_reduce(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                            const at::Tensor& mean, bool relu, at::Tensor& sum_dy, at::Tensor& sum_dy_xmu) {
  const int64_t channels = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_backward_reduce_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto args = bwd_args<scalar_t>(dy, x, scale, shift, residual, mean, relu);
    auto* pa = sum_dy.mutable_data_ptr<opmath_t>();
    auto* pb = sum_dy_xmu.mutable_data_ptr<opmath_t>();
    if (is_nhwc(x)) {
      reduce_nhwc<scalar_t>(args, x.numel() / channels, channels, pa, pb);
    } else {
      reduce_nchw<scalar_t>(args, x.size(0), channels, x.numel() / (x.size(0) * channels), pa, pb);
    }
  });
}

inline void backward_elemt(at::Tensor& dx, std::optional<at::Tensor>& dres, const at::Tensor& dy,
                           const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const std::optional<at::Tensor>& residual, const at::Tensor& mean, const at::Tensor& ka,
                           const at::Tensor& kb, const at::Tensor& kc, bool relu) {
  const int64_t channels = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_backward_elemt_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const ElemtArgs<scalar_t> e{bwd_args<scalar_t>(dy, x, scale, shift, residual, mean, relu),
                                ka.const_data_ptr<opmath_t>(),
                                kb.const_data_ptr<opmath_t>(),
                                kc.const_data_ptr<opmath_t>(),
                                dx.mutable_data_ptr<scalar_t>(),
                                dres.has_value() ? dres->mutable_data_ptr<scalar_t>() : nullptr};
    if (is_nhwc(x)) {
      elemt_nhwc<scalar_t>(e, x.numel() / channels, channels);
    } else {
      elemt_nchw<scalar_t>(e, x.size(0), channels, x.numel() / (x.size(0) * channels));
    }
  });
}

}  // namespace RF_BN_ARCH
}  // namespace cpu
}  // namespace resnet_fast
