// Enough of CUDA to run dmmd's kernels (csrc/cuda/*_kernels.cuh) on the host, for tests on
// machines without a GPU. A block's threads are fibers (ucontext) in one OS thread, switched
// only at __syncthreads (and at the barriers that emulate warp shuffles); between two barriers
// they run one after another in the order `emu::schedule` picks (thread index order, reverse
// order, or a fresh seeded permutation per interval), so code that is right only in one order
// (a missing barrier whose reader runs after its writer here) differs between schedules. A
// barrier that not every thread reaches, or reaches a different number of times, is an error.
// __shared__ becomes static (one block runs at a time). Arithmetic intrinsics round like the
// device's (__fmul_rn and friends never contract); expf may differ from CUDA's by an ulp.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define DMMD_CUDA_EMULATION 1
#define DMMD_LAUNCH(kernel, grid, block, stream) \
  ::emu::launcher((grid), (block), [&](auto... args) { kernel(args...); })
using cudaStream_t = void*;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct EmuDim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __int_as_float(int32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
inline float __fsub_rn(float a, float b) {
  volatile float r = a - b;
  return r;
}
inline c10::Half __ushort_as_half(unsigned short bits) { return c10::Half(bits, c10::Half::from_bits()); }
inline float __half2float(c10::Half h) { return static_cast<float>(h); }
inline float expf(float x) { return std::exp(x); }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float fmaf(float a, float b, float c) { return std::fma(a, b, c); }

namespace emu {

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  long barriers = 0;
  int exchanges = 0;  // which exchange buffer the thread's next shuffle or vote uses
};

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  const std::function<void()>* body = nullptr;
  unsigned current = 0;
  // Two buffers of one 8-byte slot per thread, for shuffles and votes, used alternately: a
  // thread cannot write a buffer again before every thread has passed the barrier after its
  // reads, so one barrier per exchange is enough.
  std::vector<unsigned char> exchange;
};

// The order threads run in between barriers: 0 thread index order, 1 reverse, s >= 2 a
// permutation drawn afresh for every barrier interval from a generator seeded with s.
inline int64_t schedule = 0;

inline Block* block = nullptr;
inline bool misaligned = false;  // a 16-byte vector access off a 16-byte boundary (an error on a GPU)
inline int64_t vector_accesses = 0, last_vector_accesses = 0;  // 16-byte accesses of a launch

inline void check_aligned16(const void* p) {
  ++vector_accesses;
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) misaligned = true;
}

inline void barrier() {
  Fiber& f = block->fibers[block->current];
  ++f.barriers;
  swapcontext(&f.ctx, &block->scheduler);
}

inline void trampoline() {
  (*block->body)();
  block->fibers[block->current].done = true;  // then uc_link returns to the scheduler
}

// Runs body() as every thread of block `b` of a grid of `grid` blocks of `threads` threads.
inline void run_block(unsigned b, unsigned grid, unsigned threads, const std::function<void()>& body) {
  Block blk;
  blk.body = &body;
  blk.fibers.resize(threads);
  blk.exchange.assign(2 * 8 * threads, 0);
  block = &blk;
  blockIdx.x = b;
  gridDim.x = grid;
  blockDim.x = threads;
  for (auto& f : blk.fibers) {
    f.stack.resize(256 * 1024);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &blk.scheduler;
    makecontext(&f.ctx, trampoline, 0);
  }
  std::vector<unsigned> order(threads);
  std::iota(order.begin(), order.end(), 0u);
  if (schedule == 1) std::reverse(order.begin(), order.end());
  std::mt19937_64 rng(static_cast<uint64_t>(schedule) * 1000003u + b);
  for (;;) {
    unsigned done = 0;
    long at = -1;
    bool diverged = false;
    if (schedule >= 2) std::shuffle(order.begin(), order.end(), rng);
    for (unsigned t : order) {
      Fiber& f = blk.fibers[t];
      if (!f.done) {
        blk.current = t;
        threadIdx.x = t;
        swapcontext(&blk.scheduler, &f.ctx);
      }
      if (f.done) {
        ++done;
      } else {
        diverged |= at >= 0 && f.barriers != at;
        at = f.barriers;
      }
    }
    if (done == threads) break;
    if (done > 0 || diverged) {
      block = nullptr;
      throw std::runtime_error("divergent __syncthreads in block " + std::to_string(b));
    }
  }
  block = nullptr;
}

// A launch: the blocks one after another.
inline void launch(unsigned grid, unsigned threads, const std::function<void()>& body) {
  misaligned = false;
  vector_accesses = 0;
  for (unsigned b = 0; b < grid; ++b) run_block(b, grid, threads, body);
  last_vector_accesses = vector_accesses;
  if (misaligned) throw std::runtime_error("misaligned 16-byte vector access");
}

// What DMMD_LAUNCH(kernel, grid, block, stream)(args...) becomes here: the real launch code of
// csrc/cuda/launch*.cuh runs, with the grid cut to at most 3 blocks (the kernels loop over their
// rows grid-stride, so that loop still runs) to keep the emulation fast.
template <typename K>
struct Launcher {
  unsigned grid, threads;
  K kernel;

  template <typename... A>
  void operator()(A... args) const {
    launch(grid < 3 ? grid : 3, threads, [&] { kernel(args...); });
  }
};

template <typename K>
Launcher<K> launcher(unsigned grid, unsigned threads, K kernel) {
  return {grid, threads, kernel};
}

// The calling thread's next exchange buffer, as an array of V (one per thread).
template <typename V>
V* slots() {
  static_assert(sizeof(V) <= 8, "8-byte exchange slots");
  int& k = block->fibers[block->current].exchanges;
  unsigned char* buf = block->exchange.data() + static_cast<size_t>(k) * 8 * block->fibers.size();
  k ^= 1;
  return reinterpret_cast<V*>(buf);
}

}  // namespace emu

inline void __syncthreads() { emu::barrier(); }

inline int __syncthreads_or(int x) {
  int* s = emu::slots<int>();
  s[threadIdx.x] = x;
  emu::barrier();
  int r = 0;
  for (unsigned t = 0; t < blockDim.x; ++t) r |= s[t] != 0;
  return r;
}

// Warp shuffles, emulated with a block barrier (the kernels shuffle on every thread at once).
template <typename V>
V __shfl_down_sync(unsigned, V v, int o) {
  V* s = emu::slots<V>();
  s[threadIdx.x] = v;
  emu::barrier();
  const unsigned lane = threadIdx.x % 32;
  return lane + o < 32 ? s[threadIdx.x + o] : v;
}

template <typename V>
V __shfl_up_sync(unsigned, V v, int o) {
  V* s = emu::slots<V>();
  s[threadIdx.x] = v;
  emu::barrier();
  const unsigned lane = threadIdx.x % 32;
  return lane >= static_cast<unsigned>(o) ? s[threadIdx.x - o] : v;
}
