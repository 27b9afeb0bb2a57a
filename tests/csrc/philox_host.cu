// Host program built by nvcc in the test suite: runs the shared Philox header through the
// CUDA compiler (host side) so that CI checks the device toolchain's view of the math
// without a GPU. Reads "c0 c1 c2 c3 k0 k1" (hex) per line, prints the four output words.
#include <cstdio>

#include "dmmd/philox.h"

int main() {
  unsigned c[4], k[2];
  while (std::scanf("%x %x %x %x %x %x", &c[0], &c[1], &c[2], &c[3], &k[0], &k[1]) == 6) {
    const dmmd::PhiloxWords r = dmmd::philox4x32_10(c[0], c[1], c[2], c[3], k[0], k[1]);
    std::printf("%08x %08x %08x %08x\n", r.w[0], r.w[1], r.w[2], r.w[3]);
  }
  return 0;
}
