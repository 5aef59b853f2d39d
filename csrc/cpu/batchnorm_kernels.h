// Training batch-norm kernels, included once per instruction set by batchnorm.cpp (baseline) and
// batchnorm_avx2.cpp (AVX2 + FMA, chosen at run time where the CPU has them): at::vec's
// Vectorized<float> is whatever CPU_CAPABILITY the including file sets, so one source serves both.
// Everything here lives in namespace RF_BN_ARCH; no std containers (their out-of-line instantiations
// would be shared with the other file's and could run AVX2 code on a CPU without it).
//
// Every kernel is written once, over a "run" of contiguous elements: an NHWC row of C channels (the
// per-channel values are vectors, PerElement) or a [N, C, *] plane of one channel (the values are
// broadcast, Broadcast). The runs get their pointers and sizes as by-value arguments: at::vec's stores
// may alias anything, so values read through a lambda's captures would be reloaded at every vector.
// Work is split into tiles of a fixed size (independent of the thread count, so results are
// deterministic), reduced in the math type, and the tiles combined per channel in double.
// Statistics never use E[x^2] - E[x]^2: each tile is reduced in two passes (mean, then the sum and the
// sum of squares of deviations from that mean, the tile still in cache: the corrected two-pass
// algorithm) and tiles are merged with Chan's parallel formula for (count, mean, M2).
#pragma once

#ifndef RF_BN_ARCH
#error "define RF_BN_ARCH (the namespace of this instruction set's kernels) before including"
#endif

namespace resnet_fast {
namespace cpu {
namespace RF_BN_ARCH {

constexpr int64_t kTile = 65536;  // elements per tile: 256 KiB of fp32, stays in L2 between passes

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

// Per-channel values as a run sees them: NHWC, one channel per element; [N, C, *], one for the run.
template <typename T>
struct PerElement {
  const T* p;
  Vectorized<T> vec(int64_t i) const { return Vectorized<T>::loadu(p + i); }
  T at(int64_t i) const { return p[i]; }
};

template <typename T>
struct Broadcast {
  Vectorized<T> v;
  T s;
  explicit Broadcast(T value) : v(value), s(value) {}
  Vectorized<T> vec(int64_t) const { return v; }
  T at(int64_t) const { return s; }
};

// Per-channel accumulators: NHWC, an array of C sums (one per element of the row); [N, C, *], one
// vector register for the run, reduced to a scalar at its end.
template <typename T>
struct ArraySum {
  T* p;
  void add(int64_t i, const Vectorized<T>& v) { (Vectorized<T>::loadu(p + i) + v).store(p + i); }
  void add1(int64_t i, T v) { p[i] += v; }
};

template <typename T>
struct RegisterSum {
  Vectorized<T> v{T(0)};
  T s = T(0);
  void add(int64_t, const Vectorized<T>& x) { v = v + x; }
  void add1(int64_t, T x) { s += x; }
  T total() const {
    return s + at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, v);
  }
};

// The forward's pre-activation x*s + t (+ r): vector body with fmadd, scalar tail with x * s + t, in
// the same loop structure everywhere, so the backward's recomputed ReLU mask is exactly the forward's.
template <typename OVec>
inline OVec pre_act_vec(const OVec& x, const OVec& s, const OVec& t) {
  return at::vec::fmadd(x, s, t);
}

template <typename opmath_t>
inline opmath_t pre_act(opmath_t x, opmath_t s, opmath_t t) {
  return x * s + t;
}

// ------------------------------------------------------------------------------------------ statistics

// Writes mean and biased variance per channel from per-tile (mean, M2) arrays [tiles, C] with tile
// counts [tiles]: the parallel (Chan) formula in one go, mean = sum n_i m_i / N, M2 = sum (M2_i +
// n_i (m_i - mean)^2). Tile means are kept in double: rounded to float they would add spurious
// spread (their rounding error squared, times the tile count) when merged. Tiles are the outer loop,
// channels the inner one: memory order.
template <typename opmath_t>
void combine_tiles(const Buffer<double>& tmean, const Buffer<double>& tm2, const Buffer<int64_t>& tcount,
                   int64_t channels, opmath_t* mean, opmath_t* var) {
  const int64_t tiles = tcount.n;
  double total = 0;
  for (int64_t i = 0; i < tiles; ++i) total += static_cast<double>(tcount[i]);
  at::parallel_for(0, channels, 256, [&](int64_t begin, int64_t end) {
    Buffer<double> m(end - begin), q(end - begin);
    for (int64_t i = 0; i < tiles; ++i) {
      const double n = static_cast<double>(tcount[i]) / total;
      const double* tm = tmean.data() + i * channels + begin;
      for (int64_t c = 0; c < end - begin; ++c) m[c] += n * tm[c];
    }
    for (int64_t i = 0; i < tiles; ++i) {
      const double n = static_cast<double>(tcount[i]);
      const double* tm = tmean.data() + i * channels + begin;
      const double* tq = tm2.data() + i * channels + begin;
      for (int64_t c = 0; c < end - begin; ++c) q[c] += tq[c] + n * (tm[c] - m[c]) * (tm[c] - m[c]);
    }
    for (int64_t c = 0; c < end - begin; ++c) {
      mean[begin + c] = static_cast<opmath_t>(m[c]);
      var[begin + c] = static_cast<opmath_t>(q[c] / total);
    }
  });
}

// Pass 1 of a tile: sum += x over one run of n elements.
template <typename scalar_t, typename Acc>
Acc sum_run(const scalar_t* x, int64_t n, Acc sum) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    OVec v[IO::kN];
    IO::load(x + i, v);
    for (int k = 0; k < IO::kN; ++k) sum.add(i + k * OVec::size(), v[k]);
  }
  for (; i < n; ++i) sum.add1(i, static_cast<opmath_t>(x[i]));
  return sum;
}

// Pass 2 of a tile: sum += x - m, sq += (x - m)^2 over one run.
template <typename scalar_t, typename P, typename Acc>
std::pair<Acc, Acc> deviation_run(const scalar_t* x, int64_t n, P m, Acc sum, Acc sq) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    OVec v[IO::kN];
    IO::load(x + i, v);
    for (int k = 0; k < IO::kN; ++k) {
      const int64_t j = i + k * OVec::size();
      const OVec d = v[k] - m.vec(j);
      sum.add(j, d);
      sq.add(j, d * d);
    }
  }
  for (; i < n; ++i) {
    const opmath_t d = static_cast<opmath_t>(x[i]) - m.at(i);
    sum.add1(i, d);
    sq.add1(i, d * d);
  }
  return {sum, sq};
}

// (mean, M2) of one tile from its pass-1 sum and pass-2 sums: the corrected two-pass formula
// (mean += sum d / n, M2 = sum d^2 - (sum d)^2 / n; inv_n = 1 / n) removes the rounding error of pass 1.
inline void tile_moments(double m, double sum_d, double sum_dd, double inv_n, double* mean, double* m2) {
  *mean = m + sum_d * inv_n;
  *m2 = dmax0(sum_dd - sum_d * sum_d * inv_n);
}

// NHWC: a tile of whole rows [r0, r1) (sequential memory); per-channel accumulators in `work` (3 * C).
template <typename scalar_t>
void stats_tile(const scalar_t* x, int64_t channels, int64_t r0, int64_t r1, at::opmath_type<scalar_t>* work,
                double* tmean, double* tm2) {
  using opmath_t = at::opmath_type<scalar_t>;
  opmath_t* m = work;
  opmath_t* s1 = work + channels;
  opmath_t* q = work + 2 * channels;
  for (int64_t i = 0; i < 3 * channels; ++i) work[i] = opmath_t(0);
  for (int64_t r = r0; r < r1; ++r) sum_run(x + r * channels, channels, ArraySum<opmath_t>{m});
  const opmath_t inv_n = opmath_t(1) / static_cast<opmath_t>(r1 - r0);
  for (int64_t c = 0; c < channels; ++c) m[c] *= inv_n;
  for (int64_t r = r0; r < r1; ++r)
    deviation_run(x + r * channels, channels, PerElement<opmath_t>{m}, ArraySum<opmath_t>{s1}, ArraySum<opmath_t>{q});
  const double inv_rows = 1.0 / static_cast<double>(r1 - r0);
  for (int64_t c = 0; c < channels; ++c) tile_moments(m[c], s1[c], q[c], inv_rows, tmean + c, tm2 + c);
}

template <typename scalar_t>
void stats_nhwc(const scalar_t* x, int64_t rows, int64_t channels, at::opmath_type<scalar_t>* mean,
                at::opmath_type<scalar_t>* var) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t tile_rows = imax(1, kTile / channels), tiles = (rows + tile_rows - 1) / tile_rows;
  Buffer<double> tmean(tiles * channels), tm2(tiles * channels);
  Buffer<int64_t> tcount(tiles);
  for (int64_t i = 0; i < tiles; ++i) tcount[i] = imin(rows, (i + 1) * tile_rows) - i * tile_rows;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    Buffer<opmath_t> work(3 * channels);
    for (int64_t i = begin; i < end; ++i) {
      stats_tile(x, channels, i * tile_rows, i * tile_rows + tcount[i], work.data(), tmean.data() + i * channels,
                 tm2.data() + i * channels);
    }
  });
  combine_tiles(tmean, tm2, tcount, channels, mean, var);
}

// [N, C, *]: tiles are pieces of at most kTile elements of one (n, c) plane.
template <typename scalar_t>
void stats_piece(const scalar_t* x, int64_t n, double* tmean, double* tm2) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t m = sum_run(x, n, RegisterSum<opmath_t>()).total() / static_cast<opmath_t>(n);
  const auto [dev, sq] = deviation_run(x, n, Broadcast<opmath_t>(m), RegisterSum<opmath_t>(), RegisterSum<opmath_t>());
  tile_moments(m, dev.total(), sq.total(), 1.0 / static_cast<double>(n), tmean, tm2);
}

template <typename scalar_t>
void stats_nchw(const scalar_t* x, int64_t batch, int64_t channels, int64_t inner, at::opmath_type<scalar_t>* mean,
                at::opmath_type<scalar_t>* var) {
  const int64_t pieces = imax(1, (inner + kTile - 1) / kTile);
  const int64_t piece_len = (inner + pieces - 1) / pieces;
  const int64_t tiles = batch * pieces;  // per channel
  Buffer<double> tmean(tiles * channels), tm2(tiles * channels);
  Buffer<int64_t> tcount(tiles);
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t p = i % pieces;
    tcount[i] = imax(0, imin(inner, (p + 1) * piece_len) - p * piece_len);
  }
  at::parallel_for(0, tiles * channels, imax(1, kTile / imax(1, piece_len)), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      // j enumerates (n, c, piece) in memory order; stored at [tile = n*pieces + piece, c].
      const int64_t p = j % pieces, c = (j / pieces) % channels, n = j / (pieces * channels);
      const int64_t slot = (n * pieces + p) * channels + c, len = tcount[n * pieces + p];
      if (len > 0) stats_piece(x + (n * channels + c) * inner + p * piece_len, len, &tmean[slot], &tm2[slot]);
    }
  });
  combine_tiles(tmean, tm2, tcount, channels, mean, var);
}

// ----------------------------------------------------------------------------------------- apply

// y = act(x*s + t (+ r)) over one run.
template <typename scalar_t, typename P>
void apply_run(const scalar_t* x, P s, P t, const scalar_t* r, scalar_t* y, int64_t n, bool relu) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    OVec v[IO::kN], rv[IO::kN];
    IO::load(x + i, v);
    if (r) IO::load(r + i, rv);
    for (int k = 0; k < IO::kN; ++k) {
      const int64_t j = i + k * OVec::size();
      v[k] = pre_act_vec(v[k], s.vec(j), t.vec(j));
      if (r) v[k] = v[k] + rv[k];
      if (relu) v[k] = at::vec::clamp_min(v[k], OVec(0));  // NaN stays NaN, like torch.relu
    }
    IO::store(y + i, v);
  }
  for (; i < n; ++i) {
    opmath_t v = pre_act(static_cast<opmath_t>(x[i]), s.at(i), t.at(i));
    if (r) v += static_cast<opmath_t>(r[i]);
    if (relu) v = v < opmath_t(0) ? opmath_t(0) : v;
    y[i] = static_cast<scalar_t>(v);
  }
}

// ------------------------------------------------------------------------------------------ backward
//
// dy' = dy masked by the ReLU: 0 where the forward output y <= 0 when y is given (what torch's relu
// backward does; the residual path saves y), else where the recomputed x*s + t <= 0; NaN passes dy.

template <typename OVec>
inline OVec masked_vec(const OVec& dy, const OVec& pre) {
  // torch's relu backward is where(y <= 0, 0, dy): a NaN y passes dy on.
  return OVec::blendv(dy, OVec(0), pre <= OVec(0));
}

template <typename scalar_t>
struct BwdRun {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* y;  // the forward output (mask source) or nullptr
  bool relu;
};

// Loads dy' and x of elements [i, i + kStep) of a run as opmath vectors.
template <typename scalar_t, typename P>
inline void load_masked(BwdRun<scalar_t> a, P s, P t, int64_t i,
                        typename VecIO<scalar_t>::OVec (&g)[VecIO<scalar_t>::kN],
                        typename VecIO<scalar_t>::OVec (&x)[VecIO<scalar_t>::kN]) {
  using IO = VecIO<scalar_t>;
  using OVec = typename IO::OVec;
  IO::load(a.dy + i, g);
  IO::load(a.x + i, x);
  if (!a.relu) return;
  OVec y[IO::kN];
  if (a.y) IO::load(a.y + i, y);
  for (int k = 0; k < IO::kN; ++k) {
    const int64_t j = i + k * OVec::size();
    g[k] = masked_vec(g[k], a.y ? y[k] : pre_act_vec(x[k], s.vec(j), t.vec(j)));
  }
}

template <typename scalar_t, typename P>
inline at::opmath_type<scalar_t> masked1(BwdRun<scalar_t> a, P s, P t, int64_t i) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t g = static_cast<opmath_t>(a.dy[i]);
  if (!a.relu) return g;
  const opmath_t pre = a.y ? static_cast<opmath_t>(a.y[i]) : pre_act(static_cast<opmath_t>(a.x[i]), s.at(i), t.at(i));
  return pre <= opmath_t(0) ? opmath_t(0) : g;
}

// sum_dy += dy', sum_dy_xmu += dy' * (x - mean) over one run.
template <typename scalar_t, typename P, typename Acc>
std::pair<Acc, Acc> reduce_run(BwdRun<scalar_t> a, P s, P t, P mean, int64_t n, Acc sum_dy, Acc sum_dy_xmu) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    OVec g[IO::kN], x[IO::kN];
    load_masked(a, s, t, i, g, x);
    for (int k = 0; k < IO::kN; ++k) {
      const int64_t j = i + k * OVec::size();
      sum_dy.add(j, g[k]);
      sum_dy_xmu.add(j, g[k] * (x[k] - mean.vec(j)));
    }
  }
  for (; i < n; ++i) {
    const opmath_t g = masked1(a, s, t, i);
    sum_dy.add1(i, g);
    sum_dy_xmu.add1(i, g * (static_cast<opmath_t>(a.x[i]) - mean.at(i)));
  }
  return {sum_dy, sum_dy_xmu};
}

// dx = ka*dy' + kb*(x - mean) + kc, dres = dy' (when wanted) over one run.
template <typename scalar_t, typename P>
void elemt_run(BwdRun<scalar_t> a, P s, P t, P mean, P ka, P kb, P kc, scalar_t* dx, scalar_t* dres, int64_t n) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    OVec g[IO::kN], x[IO::kN], d[IO::kN];
    load_masked(a, s, t, i, g, x);
    for (int k = 0; k < IO::kN; ++k) {
      const int64_t j = i + k * OVec::size();
      d[k] = at::vec::fmadd(ka.vec(j), g[k], at::vec::fmadd(kb.vec(j), x[k] - mean.vec(j), kc.vec(j)));
    }
    IO::store(dx + i, d);
    if (dres) IO::store(dres + i, g);
  }
  for (; i < n; ++i) {
    const opmath_t g = masked1(a, s, t, i);
    dx[i] = static_cast<scalar_t>(ka.at(i) * g + (kb.at(i) * (static_cast<opmath_t>(a.x[i]) - mean.at(i)) + kc.at(i)));
    if (dres) dres[i] = static_cast<scalar_t>(g);
  }
}

// Per-tile sums [tiles, C] summed over tiles in double (tiles outer, channels inner: memory order).
template <typename opmath_t>
void sum_tiles(const Buffer<opmath_t>& ta, const Buffer<opmath_t>& tb, int64_t tiles, int64_t channels,
               opmath_t* sum_a, opmath_t* sum_b) {
  at::parallel_for(0, channels, 256, [&](int64_t begin, int64_t end) {
    Buffer<double> a(end - begin), b(end - begin);
    for (int64_t i = 0; i < tiles; ++i) {
      const opmath_t* pa = ta.data() + i * channels + begin;
      const opmath_t* pb = tb.data() + i * channels + begin;
      for (int64_t c = 0; c < end - begin; ++c) {
        a[c] += pa[c];
        b[c] += pb[c];
      }
    }
    for (int64_t c = 0; c < end - begin; ++c) {
      sum_a[begin + c] = static_cast<opmath_t>(a[c]);
      sum_b[begin + c] = static_cast<opmath_t>(b[c]);
    }
  });
}

// ------------------------------------------------------------------------------------ layout drivers

// The per-channel inputs of the apply and backward passes.
template <typename scalar_t>
struct Channels {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t* s;  // scale, shift: the forward's; the mask's recomputation uses them
  const opmath_t* t;
  const opmath_t* mean;
  const opmath_t* ka;  // dx coefficients (elemt only)
  const opmath_t* kb;
  const opmath_t* kc;
};

// Calls f(run offset, run length, per-channel values as P...) for NHWC rows or [N, C, *] planes.
template <typename scalar_t, typename F>
void for_each_run(const at::Tensor& x, const Channels<scalar_t>& ch, F f) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t channels = x.size(1);
  if (is_nhwc(x)) {
    const int64_t rows = x.numel() / channels;
    using P = PerElement<opmath_t>;
    at::parallel_for(0, rows, imax(1, kTile / channels), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        f(row * channels, channels, P{ch.s}, P{ch.t}, P{ch.mean}, P{ch.ka}, P{ch.kb}, P{ch.kc});
    });
    return;
  }
  const int64_t inner = x.numel() / (x.size(0) * channels);
  using P = Broadcast<opmath_t>;
  const auto at_c = [](const opmath_t* p, int64_t c) { return p ? p[c] : opmath_t(0); };
  at::parallel_for(0, x.numel() / inner, imax(1, kTile / inner), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % channels;
      f(p * inner, inner, P(at_c(ch.s, c)), P(at_c(ch.t, c)), P(at_c(ch.mean, c)), P(at_c(ch.ka, c)),
        P(at_c(ch.kb, c)), P(at_c(ch.kc, c)));
    }
  });
}

template <typename scalar_t>
void reduce(const at::Tensor& x, BwdRun<scalar_t> a, const Channels<scalar_t>& ch, at::opmath_type<scalar_t>* sum_dy,
            at::opmath_type<scalar_t>* sum_dy_xmu) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t channels = x.size(1);
  const auto shifted = [](BwdRun<scalar_t> r, int64_t o) {
    return BwdRun<scalar_t>{r.dy + o, r.x + o, r.y ? r.y + o : nullptr, r.relu};
  };
  if (is_nhwc(x)) {
    const int64_t rows = x.numel() / channels, tile_rows = imax(1, kTile / channels);
    const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
    Buffer<opmath_t> ta(tiles * channels), tb(tiles * channels);
    using P = PerElement<opmath_t>;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; ++tile) {
        const ArraySum<opmath_t> sa{ta.data() + tile * channels}, sb{tb.data() + tile * channels};
        for (int64_t row = tile * tile_rows; row < imin(rows, (tile + 1) * tile_rows); ++row)
          reduce_run(shifted(a, row * channels), P{ch.s}, P{ch.t}, P{ch.mean}, channels, sa, sb);
      }
    });
    sum_tiles(ta, tb, tiles, channels, sum_dy, sum_dy_xmu);
    return;
  }
  const int64_t planes = x.size(0) * channels, inner = x.numel() / planes;
  Buffer<opmath_t> ta(planes), tb(planes);  // one tile per (n, c) plane: [n, c] = [tile, c]
  using P = Broadcast<opmath_t>;
  at::parallel_for(0, planes, imax(1, kTile / inner), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % channels;
      const auto [sa, sb] = reduce_run(shifted(a, p * inner), P(ch.s[c]), P(ch.t[c]), P(ch.mean[c]), inner,
                                       RegisterSum<opmath_t>(), RegisterSum<opmath_t>());
      ta[p] = sa.total();
      tb[p] = sb.total();
    }
  });
  sum_tiles(ta, tb, planes / channels, channels, sum_dy, sum_dy_xmu);
}

// ------------------------------------------------------------------------------------ entry points

template <typename scalar_t>
Channels<scalar_t> channels_of(const at::Tensor& scale, const at::Tensor& shift, const at::Tensor* mean = nullptr,
                               const at::Tensor* ka = nullptr, const at::Tensor* kb = nullptr,
                               const at::Tensor* kc = nullptr) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto ptr = [](const at::Tensor* v) { return v ? v->const_data_ptr<opmath_t>() : nullptr; };
  return {scale.const_data_ptr<opmath_t>(), shift.const_data_ptr<opmath_t>(), ptr(mean), ptr(ka), ptr(kb), ptr(kc)};
}

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_apply_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pr = data_or_null<scalar_t>(residual);
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    for_each_run(x, channels_of<scalar_t>(scale, shift), [=](int64_t o, int64_t n, auto s, auto t, auto...) {
      apply_run(px + o, s, t, pr ? pr + o : nullptr, py + o, n, relu);
    });
  });
}

inline void backward_reduce(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& shift, const std::optional<at::Tensor>& output,
                            const at::Tensor& mean, bool relu, at::Tensor& sum_dy, at::Tensor& sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_backward_reduce_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const BwdRun<scalar_t> a{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                             data_or_null<scalar_t>(output), relu};
    reduce(x, a, channels_of<scalar_t>(scale, shift, &mean), sum_dy.mutable_data_ptr<opmath_t>(),
           sum_dy_xmu.mutable_data_ptr<opmath_t>());
  });
}

inline void backward_elemt(at::Tensor& dx, std::optional<at::Tensor>& dres, const at::Tensor& dy,
                           const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const std::optional<at::Tensor>& output, const at::Tensor& mean, const at::Tensor& ka,
                           const at::Tensor& kb, const at::Tensor& kc, bool relu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_backward_elemt_cpu", [&] {
    const BwdRun<scalar_t> a{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                             data_or_null<scalar_t>(output), relu};
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    scalar_t* pdres = dres.has_value() ? dres->mutable_data_ptr<scalar_t>() : nullptr;
    for_each_run(x, channels_of<scalar_t>(scale, shift, &mean, &ka, &kb, &kc),
                 [=](int64_t o, int64_t n, auto s, auto t, auto m, auto ka, auto kb, auto kc) {
                   const BwdRun<scalar_t> run{a.dy + o, a.x + o, a.y ? a.y + o : nullptr, a.relu};
                   elemt_run(run, s, t, m, ka, kb, kc, pdx + o, pdres ? pdres + o : nullptr, n);
                 });
  });
}

}  // namespace RF_BN_ARCH
}  // namespace cpu
}  // namespace resnet_fast
