// Host program built by nvcc in the test suite: the radix-selection nucleus of dmmd/radix.h
// (what the CUDA kernels run, one block per row) replayed level by level on the host, so CI
// checks its decisions against the CPU kernels without a GPU.
//
// Input, one row per line: "kind v inv_t top_p" then v raw logit bit patterns in hex, where
// kind is f32, bf16 or f16. Output per row: "a_star_bits i_star kept total" (hex, decimal,
// %.17g, %.17g), a_star_bits in the row's own width.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "dmmd/radix.h"

namespace {

float bits_to_float(uint32_t r, int kind) {
  if (kind == 0) {
    float f;
    std::memcpy(&f, &r, 4);
    return f;
  }
  if (kind == 1) return bits_to_float(r << 16, 0);
  // IEEE half -> float
  const uint32_t sign = (r & 0x8000u) << 16, exp = (r >> 10) & 0x1Fu, man = r & 0x3FFu;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (man << 13), 0);
  if (exp == 0) {
    const float m = std::ldexp(static_cast<float>(man), -24);
    return sign ? -m : m;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13), 0);
}

// The tempered logit relative to ms, each step rounded (as the kernels' __fmul_rn / __fsub_rn).
float tempered(float a, float inv_t, float ms) {
  volatile float x = a * inv_t;
  volatile float y = x - ms;
  return y;
}

}  // namespace

int main() {
  char kind_s[8];
  long long v;
  float inv_t;
  double top_p;
  while (std::scanf("%7s %lld %f %lf", kind_s, &v, &inv_t, &top_p) == 4) {
    const int kind = std::strcmp(kind_s, "f32") == 0 ? 0 : std::strcmp(kind_s, "bf16") == 0 ? 1 : 2;
    const int bits = kind == 0 ? 32 : 16;
    std::vector<uint32_t> raw(v);
    for (long long i = 0; i < v; ++i) std::scanf("%x", &raw[i]);
    float ma = -INFINITY;
    for (long long i = 0; i < v; ++i) ma = std::fmax(ma, bits_to_float(raw[i], kind));
    volatile float ms = ma * inv_t;
    std::vector<double> e(v);
    for (long long i = 0; i < v; ++i) e[i] = std::exp(tempered(bits_to_float(raw[i], kind), inv_t, ms));

    uint32_t prefix = 0;
    double above = 0, target = 0;
    for (int level = 0; level < dmmd::radix_levels(bits); ++level) {
      double h[dmmd::kRadixBins] = {0};
      for (long long i = 0; i < v; ++i) {
        const uint32_t key = dmmd::order_key(raw[i], bits);
        if (dmmd::radix_in_prefix(key, bits, level, prefix)) h[dmmd::radix_digit(key, bits, level)] += e[i];
      }
      if (level == 0) {
        double total = 0;
        for (double x : h) total += x;
        target = top_p * total;
      }
      prefix = (prefix << dmmd::kRadixBits) | static_cast<uint32_t>(dmmd::radix_choose(h, target, &above));
    }
    const uint32_t a_bits = dmmd::key_raw(prefix, bits);
    const double e_tie = std::exp(tempered(bits_to_float(a_bits, kind), inv_t, ms));
    long long ties = 0;
    for (long long i = 0; i < v; ++i) ties += dmmd::order_key(raw[i], bits) == prefix;
    const long long keep = dmmd::radix_ties_kept(above, e_tie, target, ties);
    long long seen = 0, i_star = -1;
    for (long long i = 0; i < v && seen < keep; ++i) {
      if (dmmd::order_key(raw[i], bits) == prefix) {
        ++seen;
        i_star = i;
      }
    }
    double total = 0;
    for (double x : e) total += x;
    std::printf("%x %lld %.17g %.17g\n", a_bits, i_star, above + static_cast<double>(keep) * e_tie, total);
  }
  return 0;
}
