// What every CUDA row kernel shares: one thread block per row (rows in a grid-stride loop,
// 64-bit row offsets), the row walked in tiles of 16-byte vectors after a scalar prologue
// up to the first aligned element (V = 50257 in bf16 leaves most rows misaligned), float32
// math from the raw logits, and reductions and scans in a fixed order (warp shuffles, then the
// warps in index order; no atomics), so that a row's answer never depends on timing.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if !defined(DMMD_CUDA_EMULATION)  // tests/csrc/cuda_emulation.h runs these kernels on the host
#include <cuda_fp16.h>
#endif

#include <cstdint>
#include <limits>

#include "dmmd/radix.h"

namespace dmmd::cuda {

#ifndef DMMD_CUDA_THREADS
#define DMMD_CUDA_THREADS 256
#endif
constexpr int kThreads = DMMD_CUDA_THREADS;  // threads per row block (a multiple of 32)
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xFFFFFFFFu;

__device__ __forceinline__ float neg_inf() { return -std::numeric_limits<float>::infinity(); }

// ----------------------------------------------------------------------------- element access

template <typename T>
struct Elem;  // raw bits <-> float32 for one logits dtype
template <>
struct Elem<float> {
  static constexpr int kBits = 32;
  __device__ static float to_float(uint32_t r) { return __uint_as_float(r); }
  __device__ static uint32_t raw(const float& x) { return __float_as_uint(x); }
  __device__ static uint32_t from_float(float x) { return __float_as_uint(x); }
};
template <>
struct Elem<c10::BFloat16> {
  static constexpr int kBits = 16;
  __device__ static float to_float(uint32_t r) { return __uint_as_float(r << 16); }
  __device__ static uint32_t raw(const c10::BFloat16& x) { return x.x; }
  // Round to nearest even, as c10 (and so the CPU kernels) do.
  __device__ static uint32_t from_float(float x) { return c10::BFloat16(x).x; }
};
template <>
struct Elem<c10::Half> {
  static constexpr int kBits = 16;
  __device__ static float to_float(uint32_t r) { return __half2float(__ushort_as_half(static_cast<unsigned short>(r))); }
  __device__ static uint32_t raw(const c10::Half& x) { return x.x; }
  __device__ static uint32_t from_float(float x) { return c10::Half(x).x; }
};

// What the host emulation watches: a 16-byte vector access must be 16-byte aligned; shared
// memory is declared with DMMD_SHARED_ARRAY / DMMD_SHARED_SCALAR (plain arrays and scalars here,
// tracked ones there: a location one thread writes and another reads or writes between the same
// two __syncthreads is an error naming the kernel, the variable and both threads); global
// output is written with DMMD_STORE (there, two threads writing one address in a launch is an
// error).
// A row staged in dynamic shared memory (below) is read through the same loads as global
// memory; there DMMD_STAGE_ACCESS records each access to it like a tracked shared array's.
#if defined(DMMD_CUDA_EMULATION)
#define DMMD_CHECK_ALIGNED16(p) emu::check_aligned16(p)
#define DMMD_SHARED_ARRAY(T, name, n) ::emu::SharedArray<T, (n)> name{#name}
#define DMMD_SHARED_SCALAR(T, name) ::emu::SharedScalar<T> name{#name}
#define DMMD_STORE(dst, value) ::emu::store((dst), (value), #dst)
#define DMMD_STAGE_ACCESS(p, bytes, write) ::emu::stage_access((p), (bytes), (write))
#define DMMD_ROW_STAGE() ::emu::row_stage()
#else
#define DMMD_CHECK_ALIGNED16(p) ((void)0)
#define DMMD_SHARED_ARRAY(T, name, n) T name[n]
#define DMMD_SHARED_SCALAR(T, name) T name
#define DMMD_STORE(dst, value) (*(dst) = (value))
#define DMMD_STAGE_ACCESS(p, bytes, write) ((void)0)
#define DMMD_ROW_STAGE() row_stage()
#endif

// Elements per 16-byte vector of the row's logits dtype.
template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

// Raw bits of elements [i, i + n) of a row into r[0..n): one or more 16-byte loads when n == N
// (the caller guarantees alignment), else scalar loads. S may be wider than the row dtype the
// vector width was chosen for (a float32 soft target beside bf16 logits: two loads).
template <typename S, int N>
__device__ __forceinline__ void load_bits(const S* row, int64_t i, int n, uint32_t (&r)[N]) {
  if (n == N) {
    constexpr int kWords = N * static_cast<int>(sizeof(S)) / 4;
    uint32_t w[kWords];
    const uint4* q = reinterpret_cast<const uint4*>(row + i);
    DMMD_CHECK_ALIGNED16(q);
    DMMD_STAGE_ACCESS(q, N * sizeof(S), false);
#pragma unroll
    for (int k = 0; k < kWords / 4; ++k) {
      const uint4 u = q[k];
      w[4 * k] = u.x;
      w[4 * k + 1] = u.y;
      w[4 * k + 2] = u.z;
      w[4 * k + 3] = u.w;
    }
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if constexpr (sizeof(S) == 4) {
        r[k] = w[k];
      } else {
        r[k] = (w[k / 2] >> (16 * (k % 2))) & 0xFFFFu;
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (k < n) DMMD_STAGE_ACCESS(row + i + k, sizeof(S), false);
      r[k] = k < n ? Elem<S>::raw(row[i + k]) : 0u;
    }
  }
}

// Elements [i, i + n) as float32; lanes k >= n read as `pad`.
template <typename S, int N>
__device__ __forceinline__ void load_f(const S* row, int64_t i, int n, float pad, float (&x)[N]) {
  uint32_t r[N];
  load_bits<S, N>(row, i, n, r);
#pragma unroll
  for (int k = 0; k < N; ++k) x[k] = k < n ? Elem<S>::to_float(r[k]) : pad;
}

// Stores x[0..n) to elements [i, i + n) in the row's dtype (16-byte stores when n == N: the
// caller guarantees alignment).
template <typename T, int N>
__device__ __forceinline__ void store_f(T* row, int64_t i, int n, const float (&x)[N]) {
  if (n == N) {
    constexpr int kWords = N * static_cast<int>(sizeof(T)) / 4;
    uint32_t w[kWords];
#pragma unroll
    for (int k = 0; k < kWords; ++k) w[k] = 0;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if constexpr (sizeof(T) == 4) {
        w[k] = Elem<T>::from_float(x[k]);
      } else {
        w[k / 2] |= Elem<T>::from_float(x[k]) << (16 * (k % 2));
      }
    }
    uint4* q = reinterpret_cast<uint4*>(row + i);
    DMMD_CHECK_ALIGNED16(q);
#pragma unroll
    for (int k = 0; k < kWords / 4; ++k) {
      DMMD_STORE(q + k, make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]));
    }
  } else {
    for (int k = 0; k < n; ++k) DMMD_STORE(row + i + k, static_cast<T>(x[k]));
  }
}

// store_f where the destination need not be aligned like the inputs (an output with another
// element size or row stride): vector stores only where it happens to be.
template <typename T, int N>
__device__ __forceinline__ void store_any(T* row, int64_t i, int n, const float (&x)[N]) {
  if (n == N && reinterpret_cast<uintptr_t>(row + i) % 16 == 0) {
    store_f<T, N>(row, i, N, x);
  } else {
    for (int k = 0; k < n; ++k) DMMD_STORE(row + i + k, static_cast<T>(x[k]));
  }
}

// ----------------------------------------------------------------------------- walking a row

// A row as [0, head) scalar | [head, body_end) 16-byte vectors of N elements | [body_end, v)
// scalar. Every stream a kernel reads must be aligned at `head`; otherwise the whole row is
// walked in scalar tiles (body empty).
struct RowPlan {
  int64_t head, body_end, v;
};

// `streams` are the row starts of every tensor walked together, with their element sizes.
template <int N>
__device__ __forceinline__ RowPlan make_plan(int64_t v, const void* const* streams, const int* elem_bytes,
                                             int count) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(streams[0]);
  const int64_t mis = static_cast<int64_t>((first % 16) / static_cast<uintptr_t>(elem_bytes[0]));
  int64_t head = (first % static_cast<uintptr_t>(elem_bytes[0])) == 0 ? (N - mis) % N : v;
  if (head > v) head = v;
  bool ok = head < v;
  for (int s = 0; s < count && ok; ++s) {
    const uintptr_t at = reinterpret_cast<uintptr_t>(streams[s]) + static_cast<uintptr_t>(head * elem_bytes[s]);
    ok = at % 16 == 0;
  }
  if (!ok) return RowPlan{v, v, v};
  return RowPlan{head, head + (v - head) / N * N, v};
}

// Calls f(i, n) for every tile of the row, on every thread of the block in the same order:
// thread t gets elements [i, i + n), n = 1 in scalar tiles and N in vector tiles, n = 0 where
// the tile ends before it. Element order across the calls and threads is index order, so
// block scans inside f see the row in order.
template <int N, typename F>
__device__ __forceinline__ void for_each_tile(const RowPlan& p, F&& f) {
  const int64_t t = threadIdx.x;
  for (int64_t base = 0; base < p.head; base += kThreads) {
    const int64_t i = base + t;
    f(i, i < p.head ? 1 : 0);
  }
  for (int64_t base = p.head; base < p.body_end; base += int64_t{kThreads} * N) {
    const int64_t i = base + t * N;
    f(i, i < p.body_end ? N : 0);
  }
  for (int64_t base = p.body_end; base < p.v; base += kThreads) {
    const int64_t i = base + t;
    f(i, i < p.v ? 1 : 0);
  }
}

// ----------------------------------------------------------------------------- a row staged in shared memory

// The kernels that read a row many times (a nucleus: the maximum, four or eight radix levels, the
// ties, then the draw or the output) first copy it into dynamic shared memory, once, and run
// every later pass from there: a row of 50257 bf16 logits is 100 KB, within the 227 KB a block of
// an H100 may have. The launch gives the block row_stage_bytes(v, element size) of it when the
// row fits (launch.cuh), none otherwise (then the passes read global memory, as without it).
#if !defined(DMMD_CUDA_EMULATION)
__device__ __forceinline__ unsigned char* row_stage() {
  extern __shared__ uint4 dmmd_row_stage[];  // 16-byte aligned
  return reinterpret_cast<unsigned char*>(dmmd_row_stage);
}
#endif

// Copies the row [0, p.v) into `stage` (launch.cuh's row_stage_bytes of it) and returns the
// staged row: the same elements at the same offset within 16 bytes as in global memory (so the
// RowPlan made for the global row holds for it). Each thread copies the elements for_each_tile
// gives it (16-byte vectors two at a time, the loads issued before the stores; four spilled in
// denoise_step's 16-bit sm_90 builds), which are the ones it reads in the first pass after; the
// passes after that are behind the first pass's block reduction. The barrier first: the block's
// previous row may still be read from the stage, at another offset.
template <typename T, int N>
__device__ const T* stage_row(const T* row, const RowPlan& p, unsigned char* stage) {
  T* srow = reinterpret_cast<T*>(stage + reinterpret_cast<uintptr_t>(row) % 16);
  const int64_t t = threadIdx.x;
  __syncthreads();
  auto copy_scalar = [&](int64_t i) {
    DMMD_STAGE_ACCESS(srow + i, sizeof(T), true);
    srow[i] = row[i];
  };
  for (int64_t i = t; i < p.head; i += kThreads) copy_scalar(i);
  const uint4* src = reinterpret_cast<const uint4*>(row + p.head);
  uint4* dst = reinterpret_cast<uint4*>(srow + p.head);
  const int64_t vectors = (p.body_end - p.head) / N;
  constexpr int kBatch = 2;
  for (int64_t base = 0; base < vectors; base += int64_t{kThreads} * kBatch) {
    uint4 u[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int64_t j = base + b * kThreads + t;
      if (j < vectors) {
        DMMD_CHECK_ALIGNED16(src + j);
        u[b] = src[j];
      }
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int64_t j = base + b * kThreads + t;
      if (j < vectors) {
        DMMD_CHECK_ALIGNED16(dst + j);
        DMMD_STAGE_ACCESS(dst + j, 16, true);
        dst[j] = u[b];
      }
    }
  }
  for (int64_t i = p.body_end + t; i < p.v; i += kThreads) copy_scalar(i);
  return srow;
}

// ----------------------------------------------------------------------------- block reductions

// Shared scratch of one block's reductions and scans.
struct Scratch {
  DMMD_SHARED_ARRAY(double, red, kWarps * kRadixBins);
  DMMD_SHARED_ARRAY(double, scan, kThreads);
  DMMD_SHARED_ARRAY(int64_t, iscan, kThreads);
  DMMD_SHARED_ARRAY(float, redf, kWarps);
  DMMD_SHARED_ARRAY(int64_t, redi, kWarps);
  DMMD_SHARED_SCALAR(int64_t, found);
};

struct SumOp {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a + b; }
};
struct MaxOp {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a > b ? a : b; }
};

template <typename V, typename Op>
__device__ __forceinline__ V warp_reduce(V x, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_down_sync(kFull, x, o));
  return x;
}

// K values reduced over the block in a fixed order; every thread gets the results. `sh` is a
// shared array of at least kWarps * K values.
template <int K, typename V, typename Op, typename Sh>
__device__ __forceinline__ void block_reduce(V (&x)[K], Sh& sh, Op op) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const V r = warp_reduce(x[k], op);
    if (lane == 0) sh[warp * K + k] = r;
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    V acc = sh[k];
    for (int w = 1; w < kWarps; ++w) acc = op(acc, static_cast<V>(sh[w * K + k]));
    x[k] = acc;
  }
  __syncthreads();
}

__device__ __forceinline__ double block_sum(double x, Scratch& s) {
  double v[1] = {x};
  block_reduce<1>(v, s.red, SumOp{});
  return v[0];
}
__device__ __forceinline__ float block_max(float x, Scratch& s) {
  float v[1] = {x};
  block_reduce<1>(v, s.redf, MaxOp{});
  return v[0];
}
__device__ __forceinline__ int64_t block_sum_i(int64_t x, Scratch& s) {
  int64_t v[1] = {x};
  block_reduce<1>(v, s.redi, SumOp{});
  return v[0];
}
__device__ __forceinline__ int64_t block_max_i(int64_t x, Scratch& s) {
  int64_t v[1] = {x};
  block_reduce<1>(v, s.redi, MaxOp{});
  return v[0];
}

// Exclusive scan over the threads in thread order; `*incl_out` gets the inclusive value and
// `*total` the sum. The exclusive value of thread t + 1 is bit-identical to the inclusive value
// of thread t, so the intervals [excl, incl) of the threads tile [0, total) without gaps or
// overlaps.
template <typename V, typename Sh>
__device__ __forceinline__ V block_exclusive_scan(V x, Sh& sh, V* total, V* incl_out = nullptr) {
  const int lane = threadIdx.x % 32;
  V incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const V y = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl = incl + y;
  }
  sh[threadIdx.x] = incl;
  __syncthreads();
  V offset = V(0);
  for (int w = 0; w < static_cast<int>(threadIdx.x / 32); ++w) offset = offset + static_cast<V>(sh[w * 32 + 31]);
  __syncthreads();
  sh[threadIdx.x] = offset + incl;
  __syncthreads();
  const V excl = threadIdx.x == 0 ? V(0) : static_cast<V>(sh[threadIdx.x - 1]);
  if (incl_out != nullptr) *incl_out = sh[threadIdx.x];
  *total = sh[kThreads - 1];
  __syncthreads();
  return excl;
}

// ----------------------------------------------------------------------------- row statistics

// x = a * inv_t - ms with each step rounded (never contracted into an FMA), so every pass of a
// kernel computes bit-identical tempered logits, as the CPU kernels do.
__device__ __forceinline__ float tempered(float a, float inv_t, float ms) {
  return __fsub_rn(__fmul_rn(a, inv_t), ms);
}

// Running max and sum of exp(x - max) of one thread's elements (online softmax).
struct Online {
  float m = -std::numeric_limits<float>::infinity();
  double z = 0;

  // Adds n elements; returns the factor earlier sums were rescaled by (for companion sums).
  template <int N>
  __device__ __forceinline__ double add(const float (&x)[N], float (&e)[N]) {
    float lm = x[0];
#pragma unroll
    for (int k = 1; k < N; ++k) lm = fmaxf(lm, x[k]);
    double scale = 1.0;
    if (lm > m) {
      scale = m == neg_inf() ? 0.0 : ::exp(static_cast<double>(m) - static_cast<double>(lm));
      z *= scale;
      m = lm;
    }
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      e[k] = m == neg_inf() ? 0.f : expf(x[k] - m);
      s += e[k];
    }
    z += s;
    return scale;
  }
};

// The block's row maximum and log of sum exp(x - max) from every thread's Online; `companion`
// (a sum kept at the same scale, like sum p_c D_c) is rescaled and summed alongside.
struct RowLse {
  float m;
  double z, log_z;  // sum exp(x - m) and its log
  double companion;
};
__device__ __forceinline__ RowLse block_lse(const Online& o, double companion, Scratch& s) {
  const float m = block_max(o.m, s);
  const double f = (o.m == neg_inf() || !(m > neg_inf()))
                       ? 0.0
                       : ::exp(static_cast<double>(o.m) - static_cast<double>(m));
  double v[2] = {o.z * f, companion * f};
  block_reduce<2>(v, s.red, SumOp{});
  return RowLse{m, v[0], ::log(v[0]), v[1]};
}

// Whether a row maximum is unusable: NaN, +inf, or -inf (no class can occur).
__device__ __forceinline__ bool bad_max(float m) { return !(m > neg_inf()) || m == -neg_inf(); }

// The maximum of a row's raw logits (class `exclude` left out; -1 for none), and whether the
// row is unusable: a NaN (outside `exclude`), a +inf, or every logit -inf.
template <typename T, int N>
__device__ float row_max(const T* row, const RowPlan& p, int64_t exclude, Scratch& s, bool* bad) {
  float m = neg_inf();
  int nan = 0;
  for_each_tile<N>(p, [&](int64_t i, int n) {
    float x[N];
    load_f<T, N>(row, i, n, neg_inf(), x);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (i + k == exclude) continue;
      nan |= x[k] != x[k];
      m = fmaxf(m, x[k]);
    }
  });
  nan = __syncthreads_or(nan);
  m = block_max(m, s);
  *bad = nan || bad_max(m);
  return m;
}

// ----------------------------------------------------------------------------- nucleus

struct NucleusRow {
  float a_star;    // threshold raw logit
  int64_t i_star;  // last kept index among the classes at a_star
  double kept;     // mass of the kept classes, relative to exp(ms)
  double total;    // mass of all classes
};

// The top-p nucleus of a row (radix.h), every class's mass exp(tempered(a)) taken relative to
// ms; class `exclude` (-1 for none) has no mass and is never a threshold.
template <typename T, int N>
__device__ NucleusRow block_nucleus(const T* row, const RowPlan& p, float inv_t, float ms, int64_t exclude,
                                    double top_p, Scratch& s) {
  constexpr int kBits = Elem<T>::kBits;
  uint32_t prefix = 0;
  double above = 0, target = 0, total = 0;
  for (int level = 0; level < radix_levels(kBits); ++level) {
    double h[kRadixBins];
#pragma unroll
    for (int b = 0; b < kRadixBins; ++b) h[b] = 0;
    for_each_tile<N>(p, [&](int64_t i, int n) {
      uint32_t r[N];
      load_bits<T, N>(row, i, n, r);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (k >= n || i + k == exclude) continue;
        const uint32_t key = order_key(r[k], kBits);
        if (!radix_in_prefix(key, kBits, level, prefix)) continue;
        const double e = expf(tempered(Elem<T>::to_float(r[k]), inv_t, ms));
        const int d = radix_digit(key, kBits, level);
#pragma unroll
        for (int b = 0; b < kRadixBins; ++b) h[b] += d == b ? e : 0.0;  // registers, not memory
      }
    });
    block_reduce<kRadixBins>(h, s.red, SumOp{});
    if (level == 0) {
      for (int b = 0; b < kRadixBins; ++b) total += h[b];
      target = top_p * total;
    }
    const int d = radix_choose(h, target, &above);
    prefix = (prefix << kRadixBits) | static_cast<uint32_t>(d);
  }
  const float a_star = Elem<T>::to_float(key_raw(prefix, kBits));
  const double e_tie = expf(tempered(a_star, inv_t, ms));
  // The classes at a_star: how many, and the last one's index.
  int64_t count = 0, last = -1;
  for_each_tile<N>(p, [&](int64_t i, int n) {
    uint32_t r[N];
    load_bits<T, N>(row, i, n, r);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (k < n && i + k != exclude && order_key(r[k], kBits) == prefix) {
        ++count;
        last = i + k;
      }
    }
  });
  const int64_t ties = block_sum_i(count, s);
  last = block_max_i(last, s);
  const int64_t keep = radix_ties_kept(above, e_tie, target, ties);
  int64_t i_star = last;
  if (keep < ties) {
    // The keep-th tied class in index order: a block scan of the tie counts, tile by tile.
    if (threadIdx.x == 0) s.found = -1;
    int64_t before = 0;
    for_each_tile<N>(p, [&](int64_t i, int n) {
      uint32_t r[N];
      load_bits<T, N>(row, i, n, r);
      int64_t c = 0;
#pragma unroll
      for (int k = 0; k < N; ++k) c += (k < n && i + k != exclude && order_key(r[k], kBits) == prefix) ? 1 : 0;
      int64_t tile = 0;
      const int64_t excl = block_exclusive_scan(c, s.iscan, &tile);
      if (c > 0 && before + excl < keep && before + excl + c >= keep) {
        int64_t seen = before + excl;
        for (int k = 0; k < N; ++k) {
          if (k < n && i + k != exclude && order_key(r[k], kBits) == prefix && ++seen == keep) {
            s.found = i + k;
            break;
          }
        }
      }
      before += tile;
    });
    __syncthreads();
    if (s.found >= 0) i_star = s.found;
    __syncthreads();
  }
  return NucleusRow{a_star, i_star, above + static_cast<double>(keep) * e_tie, total};
}

// Inverse CDF over a row's class weights: the first class whose cumulative weight (summed in
// float64 in index order) exceeds u * total; zero weights are never drawn. weights(i, n, w)
// fills w[0..N) with the weights of the thread's elements [i, i + n) (0 beyond n). Two passes:
// the total, then a block scan tile by tile that stops at the tile holding the target. If
// rounding keeps the target out of reach, the last class with weight. -1 if the row has no
// weight at all.
template <int N, typename W>
__device__ int64_t block_inverse_cdf(const RowPlan& p, double u, Scratch& s, W&& weights) {
  double mine = 0;
  int64_t last = -1;
  for_each_tile<N>(p, [&](int64_t i, int n) {
    double w[N];
    weights(i, n, w);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      mine += w[k];
      if (w[k] > 0) last = i + k;
    }
  });
  const double total = block_sum(mine, s);
  last = block_max_i(last, s);
  if (!(total > 0)) return -1;
  const double target = u * total;
  if (threadIdx.x == 0) s.found = -1;
  __syncthreads();
  double base = 0;
  bool done = false;
  for_each_tile<N>(p, [&](int64_t i, int n) {
    if (done) return;  // block-uniform: set by every thread after the same barrier
    double w[N];
    weights(i, n, w);
    double x = 0;
#pragma unroll
    for (int k = 0; k < N; ++k) x += w[k];
    double tile = 0, incl = 0;
    const double excl = block_exclusive_scan(x, s.scan, &tile, &incl);
    if (x > 0 && base + excl <= target && target < base + incl) {
      double c = base + excl;
      int64_t pick = -1;
      for (int k = 0; k < N; ++k) {
        if (w[k] > 0) {
          c += w[k];
          pick = i + k;
          if (c > target) break;
        }
      }
      s.found = pick;  // the walk's last weighted class if rounding kept c <= target
    }
    __syncthreads();
    done = s.found >= 0;
    base += tile;
  });
  const int64_t found = s.found;
  __syncthreads();
  return found >= 0 ? found : last;
}

// Keep test of the nucleus: a > a_star, or a == a_star and index <= i_star.
__device__ __forceinline__ bool nucleus_keeps(float a, int64_t i, float a_star, int64_t i_star) {
  return a > a_star || (a == a_star && i <= i_star);
}

}  // namespace dmmd::cuda

namespace dmmd::cuda {

// Row-blocks to launch: one per row (a grid-stride loop takes any beyond).
inline unsigned row_grid(int64_t rows) {
  return static_cast<unsigned>(rows < (int64_t{1} << 30) ? rows : (int64_t{1} << 30));
}

}  // namespace dmmd::cuda
