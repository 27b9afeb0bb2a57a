// The top-p nucleus by radix selection (used by the CUDA kernels; host-tested through nvcc).
//
// Classes are ranked by the raw logit (higher first, ties by lower index) and a class is kept
// while the mass strictly before it is < top_p * total (docs/design.md §4). Instead of sorting,
// we look for the threshold logit a* digit by digit over an order-preserving integer key of
// the raw logit, most significant digit first: at each level every class whose key agrees
// with the digits chosen so far adds its mass to one of 16 bins (its next 4 bits), and the
// highest bin where the mass of everything above plus the bin reaches the target is chosen.
// After all levels the key of a* is known, with the mass of every class above it; the tied
// classes at a* (equal logits, equal masses) are then kept in index order until the target
// is reached, which gives the last kept index i*. Keep iff a > a*, or a == a* and i <= i*.
#pragma once
#include <cstdint>

#include "dmmd/common.h"

namespace dmmd {

constexpr int kRadixBits = 4;
constexpr int kRadixBins = 1 << kRadixBits;

// Order-preserving key of an IEEE float's raw bits of width `bits` (16 or 32): the key of a
// larger value is larger. -0 is folded into +0 first (equal logits must tie by index).
DMMD_HD uint32_t order_key(uint32_t raw, int bits) {
  const uint32_t sign = 1u << (bits - 1);
  const uint32_t all = bits == 32 ? 0xFFFFFFFFu : (sign << 1) - 1u;
  if ((raw & all) == sign) raw = 0;  // -0 -> +0
  return (raw & sign) ? (~raw & all) : (raw | sign);
}

// The raw bits back from a key (inverse of order_key, except that -0 comes back as +0).
DMMD_HD uint32_t key_raw(uint32_t key, int bits) {
  const uint32_t sign = 1u << (bits - 1);
  const uint32_t all = bits == 32 ? 0xFFFFFFFFu : (sign << 1) - 1u;
  return (key & sign) ? (key & ~sign & all) : (~key & all);
}

// The digit of `key` at `level` (0 = most significant) and whether the key agrees with the
// digits chosen so far (`prefix` holds them, right-aligned: the key's bits above the digit).
DMMD_HD int radix_levels(int bits) { return bits / kRadixBits; }
DMMD_HD int radix_shift(int bits, int level) { return bits - kRadixBits * (level + 1); }
DMMD_HD bool radix_in_prefix(uint32_t key, int bits, int level, uint32_t prefix) {
  const int above = radix_shift(bits, level) + kRadixBits;
  return above >= 32 || (static_cast<uint64_t>(key) >> above) == prefix;
}
DMMD_HD int radix_digit(uint32_t key, int bits, int level) {
  return static_cast<int>((key >> radix_shift(bits, level)) & (kRadixBins - 1));
}

// One level's decision from the 16 bin masses: the highest bin (largest keys) where
// `above` + bin >= target, skipping empty bins. If rounding (the bins summed in another order
// than the level before) leaves none crossing, the lowest bin with mass. Updates `above` to
// the mass of the classes above the chosen bin and returns the bin.
DMMD_HD int radix_choose(const double* bins, double target, double* above) {
  int lowest = -1;
  double above_lowest = *above;
  double a = *above;
  for (int d = kRadixBins - 1; d >= 0; --d) {
    if (!(bins[d] > 0)) continue;
    if (a + bins[d] >= target) {
      *above = a;
      return d;
    }
    lowest = d;
    above_lowest = a;
    a += bins[d];
  }
  *above = above_lowest;
  return lowest < 0 ? 0 : lowest;
}

// How many of the `ties` classes at a* (each of mass e_tie) the nucleus keeps: the fewest k
// >= 1 with above + k e_tie >= target (all of them if rounding keeps the target out of reach).
DMMD_HD int64_t radix_ties_kept(double above, double e_tie, double target, int64_t ties) {
  if (ties <= 1) return 1;
  if (!(e_tie > 0)) return ties;
  const double k = (target - above) / e_tie;
  int64_t n = k <= 1 ? 1 : static_cast<int64_t>(k);
  if (n > ties) n = ties;
  while (n > 1 && above + static_cast<double>(n - 1) * e_tie >= target) --n;
  while (n < ties && above + static_cast<double>(n) * e_tie < target) ++n;
  return n;
}

}  // namespace dmmd
