// Vectorized row access for the CPU kernels: 8 float32 lanes (AVX2) from float32, bfloat16
// or float16 rows, partial vectors padded for row tails, float64 block accumulation, and
// stores back to the row's dtype with round-to-nearest-even.
#pragma once
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace dmmd::cpu {

using fVec = at::vec::Vectorized<float>;
constexpr int kW = fVec::size();

template <typename T>
inline fVec load_partial(const T* p, int n, float pad) {
  alignas(32) float tmp[kW];
  for (int i = 0; i < kW; ++i) tmp[i] = i < n ? static_cast<float>(p[i]) : pad;
  return fVec::loadu(tmp);
}

template <typename T>
inline fVec load_full(const T* p) {
  return load_partial(p, kW, 0.f);
}
template <>
inline fVec load_full<float>(const float* p) {
  return fVec::loadu(p);
}
#if defined(CPU_CAPABILITY_AVX2)
template <>
inline fVec load_full<c10::BFloat16>(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return fVec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
}
template <>
inline fVec load_full<c10::Half>(const c10::Half* p) {
  return fVec(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

// Elements [i, i + n) of a row, n <= kW; missing lanes read as `pad`.
template <typename T>
inline fVec load(const T* row, int64_t i, int n, float pad) {
  return n == kW ? load_full(row + i) : load_partial(row + i, n, pad);
}

template <typename T>
inline void store(T* row, int64_t i, int n, const fVec& v) {
  alignas(32) float tmp[kW];
  v.store(tmp);
  for (int k = 0; k < n; ++k) row[i + k] = static_cast<T>(tmp[k]);
}
template <>
inline void store<float>(float* row, int64_t i, int n, const fVec& v) {
  v.store(row + i, n);
}
#if defined(CPU_CAPABILITY_AVX2)
template <>
inline void store<c10::BFloat16>(c10::BFloat16* row, int64_t i, int n, const fVec& v) {
  if (n != kW) {
    alignas(32) float tmp[kW];
    v.store(tmp);
    for (int k = 0; k < n; ++k) row[i + k] = c10::BFloat16(tmp[k]);
    return;
  }
  const __m256 x = v;
  const __m256i bits = _mm256_castps_si256(x);
  // round to nearest even on the 16 dropped bits; NaN stays a quiet NaN
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), is_nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(row + i), packed);
}
template <>
inline void store<c10::Half>(c10::Half* row, int64_t i, int n, const fVec& v) {
  if (n != kW) {
    alignas(32) float tmp[kW];
    v.store(tmp);
    for (int k = 0; k < n; ++k) row[i + k] = c10::Half(tmp[k]);
    return;
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(row + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
#endif

// Calls f(i, n) over a row of length v in vector steps; n < kW only for the tail.
template <typename F>
inline void over_row(int64_t v, F&& f) {
  int64_t i = 0;
  for (; i + kW <= v; i += kW) f(i, kW);
  if (i < v) f(i, static_cast<int>(v - i));
}

// exp with about 20 ulp (1e-6 relative) error; exp(-inf) = 0. Accuracy measured in tests.
inline fVec vexp(const fVec& x) { return x.exp_u20(); }

inline double hsum(const fVec& v) {
  alignas(32) float tmp[kW];
  v.store(tmp);
  double s = 0;
  for (int k = 0; k < kW; ++k) s += tmp[k];
  return s;
}

inline float hmax(const fVec& v) {
  alignas(32) float tmp[kW];
  v.store(tmp);
  float m = tmp[0];
  for (int k = 1; k < kW; ++k) m = tmp[k] > m ? tmp[k] : m;
  return m;
}

// True if any lane of a comparison mask is set.
inline bool any(const fVec& mask) { return mask.zero_mask() != (1 << kW) - 1; }

// Lanes where x is NaN (all bits set), for the argument checks the kernels do in passing.
inline fVec nan_mask(const fVec& x) { return x != x; }

// Sums float lanes in blocks of 64 vectors, folding each block into a double: float32
// speed with float64-grade totals over rows of 10^5 elements. Fixed order: deterministic.
struct BlockSum {
  fVec acc = fVec(0.f);
  int k = 0;
  double total = 0;
  inline void add(const fVec& x) {
    acc = acc + x;
    if (++k == 64) flush();
  }
  inline void flush() {
    total += hsum(acc);
    acc = fVec(0.f);
    k = 0;
  }
  inline double get() {
    flush();
    return total;
  }
};

}  // namespace dmmd::cpu
