// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// the counter-based generator behind every draw in dmmd. One implementation for host and
// device, so CPU and CUDA kernels produce identical words for the same (key, counter).
//
// Stream convention (docs/design.md §8): key = (seed_lo, seed_hi); counter = (index_lo,
// index_hi, offset_lo, offset_hi), where `index` is the global element (row) index.
#pragma once
#include <cstdint>

#include "dmmd/common.h"

namespace dmmd {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct PhiloxWords {
  uint32_t w[4];
};

DMMD_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// The raw generator: 10 rounds over a 128-bit counter with a 64-bit key.
DMMD_HD PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                  uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kPhiloxM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kPhiloxM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  PhiloxWords out;
  out.w[0] = c0;
  out.w[1] = c1;
  out.w[2] = c2;
  out.w[3] = c3;
  return out;
}

// The four words for element `index` of the stream (seed, offset).
DMMD_HD PhiloxWords philox_element(uint64_t seed, uint64_t offset, uint64_t index) {
  return philox4x32_10(static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                       static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// A double in [0, 1) with 53 random bits: `hi` gives the top 32 bits, `lo` the next 21.
// Float64 on purpose: draws must stay exact in the far tail (docs/design.md §8).
DMMD_HD double uniform53(uint32_t hi, uint32_t lo) {
  const uint64_t bits = (static_cast<uint64_t>(hi) << 21) | static_cast<uint64_t>(lo >> 11);
  return static_cast<double>(bits) * 1.1102230246251565404236316680908203125e-16;  // 2^-53
}

// Each element's two uniforms: u0 from words (0, 1), u1 from words (2, 3).
struct Uniform2 {
  double u0, u1;
};

DMMD_HD Uniform2 element_uniforms(uint64_t seed, uint64_t offset, uint64_t index) {
  const PhiloxWords r = philox_element(seed, offset, index);
  Uniform2 u;
  u.u0 = uniform53(r.w[0], r.w[1]);
  u.u1 = uniform53(r.w[2], r.w[3]);
  return u;
}

}  // namespace dmmd
