// The per-row passes every CPU kernel shares: the row maximum (with the NaN / infinity
// checks), the exponentials of the tempered teacher logits into a per-thread scratch row,
// and the top-p nucleus found without sorting the row.
//
// Nucleus: classes are ranked by the raw logit a (higher first, ties by lower index) and a
// class is kept while the mass strictly before it is < top_p (docs/design.md §4). We bin every
// class by d = max(s) - s (s = a / temperature, so d >= 0 orders like -a) in bins of width
// 1/64 over [0, 64) (beyond, each class has mass < e^-64), accumulate each bin's mass in
// float64, find the bin where the cumulative mass crosses top_p, split that bin into 1024
// finer bins, and sort only the few classes of the crossing sub-bin. The result is a
// threshold (a_star, i_star) on the raw logits: keep iff a > a_star, or a == a_star and
// index <= i_star.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec.h"

namespace dmmd::cpu {

constexpr int kBins = 4096;          // floor(64 d), the last bin open-ended
constexpr float kBinsPerUnit = 64.f;
constexpr int kSubBins = 1024;       // floor(1024 frac(64 d)) inside one bin
constexpr int kHistCopies = 2;       // interleaved copies break the add-latency chain on one bin
constexpr int kBlock = 64;      // elements per float32 partial sum of the inverse-CDF walk
constexpr float kInf = std::numeric_limits<float>::infinity();

// Rows per task of at::parallel_for: at least ~16k elements of work each.
inline int64_t grain(int64_t v) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(v, 1)); }

// Per-thread scratch, sized for one row and reused across the rows of a parallel chunk.
struct Workspace {
  std::vector<float> e;          // exp(s - max s) of the row
  std::vector<uint16_t> key;     // coarse bin of each class
  std::vector<double> hist;      // kHistCopies x kBins
  std::vector<double> sub;       // kSubBins
  std::vector<int32_t> cand, cand2;
  std::vector<double> blocks;    // per-kBlock sums for the inverse CDF
  explicit Workspace(int64_t v)
      : e(v + kW), key(v + 16), hist(kHistCopies * kBins), sub(kSubBins), blocks(v / kBlock + 2) {}
};

// Loads lanes [i, i + n) of a row with lane `exclude - i` (if in range) replaced by -inf.
template <typename T>
inline fVec load_excluding(const T* row, int64_t i, int n, int64_t exclude) {
  fVec x = load(row, i, n, -kInf);
  if (static_cast<uint64_t>(exclude - i) < static_cast<uint64_t>(n)) {
    const fVec lane = fVec::arange(0.f, 1.f) == fVec(static_cast<float>(exclude - i));
    x = fVec::blendv(x, fVec(-kInf), lane);
  }
  return x;
}

// The maximum of a row (class `exclude` left out; -1 for none). NaN if the row has a NaN.
template <typename T>
inline float row_max(const T* row, int64_t v, int64_t exclude = -1) {
  fVec m(-kInf);
  fVec nan(0.f);
  over_row(v, [&](int64_t i, int n) {
    const fVec x = load_excluding(row, i, n, exclude);
    m = at::vec::maximum(m, x);
    nan = nan | nan_mask(x);
  });
  if (any(nan)) return std::numeric_limits<float>::quiet_NaN();
  return hmax(m);
}

// Raises (ValueError, naming the argument) unless a row maximum is finite: NaN means the row
// has a NaN, +inf a +inf logit, -inf a row where no class can occur.
// A row maximum that no kernel can use: NaN somewhere in the row, a +inf, or only -inf logits.
// The kernels do not raise (like the CUDA ones, which cannot): they flag the row (NaN losses
// and log-probs, i_star = -1, draws = -1) and dmmd_ops raises naming the argument and row.
inline bool bad_row_max(float m) { return std::isnan(m) || m == kInf || m == -kInf; }

// x = a * inv_t - ms, the tempered logit relative to its maximum (<= 0). One definition, so
// that every pass (and the bin keys) sees bit-identical values (built with -ffp-contract=off).
inline fVec tempered(const fVec& a, float inv_t, float ms) { return a * fVec(inv_t) - fVec(ms); }
inline float tempered(float a, float inv_t, float ms) { return a * inv_t - ms; }

// 64 d (d = -x >= 0) in bin units, and its bin: one definition for the vector and scalar passes.
inline fVec bin_position(const fVec& x) { return (fVec(0.f) - x) * fVec(kBinsPerUnit); }
inline float bin_position(float x) { return (0.f - x) * kBinsPerUnit; }
inline int bin_of(float t) { return t < static_cast<float>(kBins - 1) ? static_cast<int>(t) : kBins - 1; }
// Position inside a bin in 1/1024 steps (exact: t - floor(t) and the power-of-two scale).
inline int sub_bin_of(float t) {
  const float frac = (t - static_cast<float>(bin_of(t))) * static_cast<float>(kSubBins);
  return frac < static_cast<float>(kSubBins - 1) ? static_cast<int>(frac) : kSubBins - 1;
}

// Stores the bins of lanes [i, i + n) given their tempered logits x.
inline void store_keys(uint16_t* key, int64_t i, int n, const fVec& x) {
  const fVec t = bin_position(x);
#if defined(CPU_CAPABILITY_AVX2)
  if (n == kW) {
    // min() first: +inf and huge t truncate to the last bin, like bin_of.
    const __m256i k = _mm256_cvttps_epi32(at::vec::minimum(t, fVec(static_cast<float>(kBins - 1))));
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(k), _mm256_extracti128_si256(k, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(key + i), packed);
    return;
  }
#endif
  alignas(32) float tmp[kW];
  t.store(tmp);
  for (int k = 0; k < n; ++k) key[i + k] = static_cast<uint16_t>(bin_of(tmp[k]));
}

// The exponentials e_c = exp(x_c) of a row into ws.e, with their float64 sum. With
// `keys`, also each class's coarse nucleus bin. Class `exclude` gets e = 0.
template <typename T>
inline double teacher_exp(const T* row, int64_t v, float inv_t, float ms, int64_t exclude, bool keys,
                          Workspace& ws) {
  BlockSum total;
  float* e = ws.e.data();
  uint16_t* key = ws.key.data();
  over_row(v, [&](int64_t i, int n) {
    const fVec x = tempered(load_excluding(row, i, n, exclude), inv_t, ms);
    const fVec ex = vexp(x);
    ex.store(e + i, n);
    total.add(ex);
    if (keys) store_keys(key, i, n, x);
  });
  return total.get();
}

// The nucleus threshold of a row whose ws.e and ws.key are filled by teacher_exp(keys=true).
struct Nucleus {
  float a_star;
  int64_t i_star;
  double kept;   // mass of the kept classes
  double total;  // mass of all classes (summed bin by bin)
};

template <typename T>
inline Nucleus find_nucleus(const T* row, int64_t v, float inv_t, float ms, double top_p, Workspace& ws) {
  const float* e = ws.e.data();
  const uint16_t* key = ws.key.data();
  double* h = ws.hist.data();
  std::fill(ws.hist.begin(), ws.hist.end(), 0.0);
  int64_t c = 0;
  for (; c + kHistCopies <= v; c += kHistCopies) {
    for (int k = 0; k < kHistCopies; ++k) h[k * kBins + key[c + k]] += e[c + k];
  }
  for (; c < v; ++c) h[key[c]] += e[c];
  double total = 0;
  for (int b = 0; b < kBins; ++b) {
    double m = 0;
    for (int k = 0; k < kHistCopies; ++k) m += h[k * kBins + b];
    h[b] = m;  // fold the copies into copy 0
    total += m;
  }
  const double target = top_p * total;
  double cum = 0;
  int bin = kBins - 1;
  for (int b = 0; b < kBins; ++b) {
    if (cum + h[b] >= target && h[b] > 0) {
      bin = b;
      break;
    }
    cum += h[b];
  }
  // Classes of the crossing bin, in index order.
  ws.cand.clear();
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i want = _mm256_set1_epi16(static_cast<int16_t>(bin));
  for (c = 0; c + 16 <= v; c += 16) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + c));
    uint32_t bits = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi16(k, want)));
    while (bits) {
      const int lane = __builtin_ctz(bits) >> 1;
      ws.cand.push_back(static_cast<int32_t>(c + lane));
      bits &= ~(3u << (2 * lane));
    }
  }
#else
  c = 0;
#endif
  for (; c < v; ++c)
    if (key[c] == bin) ws.cand.push_back(static_cast<int32_t>(c));

  // Split a large crossing bin into kSubBins finer bins.
  std::vector<int32_t>* final_cand = &ws.cand;
  if (ws.cand.size() > 32) {
    std::fill(ws.sub.begin(), ws.sub.end(), 0.0);
    auto sub_key = [&](int32_t i) {
      return static_cast<uint32_t>(sub_bin_of(bin_position(tempered(static_cast<float>(row[i]), inv_t, ms))));
    };
    for (int32_t i : ws.cand) ws.sub[sub_key(i)] += e[i];
    // The crossing sub-bin; if rounding (sub-bins summed in another order than their bin)
    // leaves none crossing, the last sub-bin with mass.
    int sb = -1, last = 0;
    double before = cum, before_last = cum;
    for (int b = 0; b < kSubBins; ++b) {
      if (ws.sub[b] > 0) {
        if (before + ws.sub[b] >= target) {
          sb = b;
          break;
        }
        last = b;
        before_last = before;
      }
      before += ws.sub[b];
    }
    if (sb < 0) {
      sb = last;
      before = before_last;
    }
    cum = before;
    ws.cand2.clear();
    for (int32_t i : ws.cand)
      if (sub_key(i) == static_cast<uint32_t>(sb)) ws.cand2.push_back(i);
    final_cand = &ws.cand2;
  }
  std::vector<int32_t>& fc = *final_cand;
  std::sort(fc.begin(), fc.end(), [&](int32_t x, int32_t y) {
    const float ax = static_cast<float>(row[x]), ay = static_cast<float>(row[y]);
    return ax > ay || (ax == ay && x < y);
  });
  if (fc.empty()) return Nucleus{-kInf, v - 1, total, total};  // unreachable: the bin has mass
  // Walk the sorted candidates; if rounding keeps the target out of reach, the last one.
  Nucleus out{static_cast<float>(row[fc.back()]), fc.back(), cum, total};
  for (int32_t i : fc) {
    cum += e[i];
    if (cum >= target) {
      out.a_star = static_cast<float>(row[i]);
      out.i_star = i;
      break;
    }
  }
  out.kept = std::min(cum, total);
  return out;
}

// Keep mask of lanes [i, i + kW) given their raw logits `a`: a > a_star, or a == a_star and
// index <= i_star (ties go to the lower index).
inline fVec keep_mask(const fVec& a, int64_t i, float a_star, float i_star) {
  const fVec idx = fVec::arange(static_cast<float>(i), 1.f);
  return (a > fVec(a_star)) | ((a == fVec(a_star)) & (idx <= fVec(i_star)));
}

}  // namespace dmmd::cpu
