// Enough of CUDA to run dmmd's kernels (csrc/cuda/*_kernels.cuh) on the host, for tests on
// machines without a GPU. A block's threads are fibers (ucontext) in one OS thread, switched
// only at __syncthreads (and at the barriers that emulate warp shuffles); between two barriers
// they run one after another in the order `emu::schedule` picks (thread index order, reverse
// order, or a fresh seeded permutation per interval), so code that is right only in one order
// (a missing barrier whose reader runs after its writer here) differs between schedules. A
// barrier that not every thread reaches, or reaches a different number of times, or threads
// waiting at different kinds of barrier (__syncthreads and a shuffle) is an error.
//
// Races are found directly too (emu::detect_races): the kernels declare shared memory with
// DMMD_SHARED_ARRAY / DMMD_SHARED_SCALAR (csrc/cuda/row_block.cuh), which here are tracked
// arrays. Only __syncthreads orders shared memory between threads (a warp shuffle does not: the
// warps of a block are not in step on a GPU, nor are the lanes of one since Volta), so a
// location written by one thread and read or written by another between the same two
// __syncthreads is an error naming the kernel, the variable, the element and both threads,
// whatever order the threads happened to run in. The same holds for the shuffles' exchange
// buffers between two barriers, and for global memory written with DMMD_STORE: two threads
// writing one address in a launch is an error. Errors are collected during the launch and
// thrown after it (an exception cannot cross a fiber's stack).
//
// Dynamic shared memory (a row staged by stage_row, csrc/cuda/row_block.cuh) is one buffer per
// launch, filled with 0xA5 bytes at every block's start (a GPU block finds whatever was there),
// whose accesses the kernels report through DMMD_STAGE_ACCESS and which is watched like a
// tracked array, by 2-byte granule; an access past its end is an error. The most a launch may
// ask for is `emu::dynamic_shared_limit` (an H100's 227 KB less a kernel's static shared memory,
// unless a test changes it).
//
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
#include <unordered_map>
#include <utility>
#include <vector>

#define DMMD_CUDA_EMULATION 1
#define DMMD_LAUNCH(kernel, grid, block, stream) \
  ::emu::launcher(#kernel, (grid), (block), [&](auto... args) { kernel(args...); })
#define DMMD_LAUNCH_SHARED(kernel, grid, block, shared, stream) \
  ::emu::launcher(#kernel, (grid), (block), [&](auto... args) { kernel(args...); }, (shared))
#define DMMD_DYNAMIC_SHARED_LIMIT(kernel) (::emu::dynamic_shared_limit)
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

// The barriers a thread can wait at: __syncthreads (also __syncthreads_or), which orders
// shared memory, and the one that emulates a warp shuffle, which does not.
enum class Barrier { kSync, kShuffle };

// Who touched one memory location in the current interval between barriers.
struct Access {
  uint64_t write_at = 0, read_at = 0;  // the intervals of the last write and of the last reads
  int writer = -1, reader = -1, other_reader = -1;  // threads; other_reader: a second reader
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  long barriers = 0;
  Barrier waiting = Barrier::kSync;  // the kind of the barrier it waits at
  int exchanges = 0;  // which exchange buffer the thread's next shuffle or vote uses
};

// Buffers of one 8-byte slot per thread for shuffles and votes, used in turn: a thread cannot
// write a buffer again before every thread has passed the barrier after its reads, so with two
// one barrier per exchange is enough (1 is allowed only to show the race detector at work).
inline int exchange_buffers = 2;

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  const std::function<void()>* body = nullptr;
  unsigned current = 0;
  std::vector<unsigned char> exchange;  // exchange_buffers x threads slots
  std::vector<Access> exchange_access;
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

inline void barrier(Barrier kind) {
  Fiber& f = block->fibers[block->current];
  ++f.barriers;
  f.waiting = kind;
  swapcontext(&f.ctx, &block->scheduler);
}

// ----------------------------------------------------------------------------- race detection

inline bool detect_races = true;
inline const char* kernel = "";  // the running launch's kernel, as DMMD_LAUNCH names it
inline std::string race;         // the launch's first race ("" for none)
// Interval counters, never reset (so what an earlier block or launch recorded never matches):
// `interval` moves at every block start and every __syncthreads, `barrier_round` at every barrier.
inline uint64_t interval = 0, barrier_round = 0;

inline void report(const std::string& what) {
  if (race.empty()) race = std::string(kernel) + ": " + what;
}

// Records an access of the running thread to one location (element `index` of `var`; -1 for a
// scalar) in interval `now`; another thread's conflicting access in the same interval is a race.
inline void access(Access& a, bool write, uint64_t now, const char* var, int64_t index,
                   const char* ordering = "__syncthreads") {
  if (!detect_races || block == nullptr) return;
  const int t = static_cast<int>(block->current);
  auto where = [&] {
    return std::string(var) + (index >= 0 ? "[" + std::to_string(index) + "]" : "") + " in block " +
           std::to_string(blockIdx.x) + ": ";
  };
  if (a.write_at == now && a.writer != t) {
    report(where() + "written by thread " + std::to_string(a.writer) + " and " + (write ? "" : "read ") +
           "by thread " + std::to_string(t) + " with no " + ordering + " between");
  }
  if (write) {
    const int other = a.read_at != now ? -1 : a.reader != t ? a.reader : a.other_reader;
    if (other >= 0) {
      report(where() + "read by thread " + std::to_string(other) + " and written by thread " + std::to_string(t) +
             " with no " + ordering + " between");
    }
    a.write_at = now;
    a.writer = t;
  } else if (a.read_at != now) {
    a.read_at = now;
    a.reader = t;
    a.other_reader = -1;
  } else if (a.reader != t && a.other_reader < 0) {
    a.other_reader = t;
  }
}

// What DMMD_SHARED_ARRAY(T, name, n) declares here: n values of T whose every access through
// operator[] is recorded (a read when the element converts to T, a write when assigned).
template <typename T, int N>
class SharedArray {
 public:
  explicit SharedArray(const char* name) : name_(name) {}

  class Ref {
   public:
    Ref(SharedArray& a, int64_t i) : a_(a), i_(i) {}
    operator T() const {
      access(a_.access_[i_], false, interval, a_.name_, i_);
      return a_.data_[i_];
    }
    Ref& operator=(const T& v) {
      access(a_.access_[i_], true, interval, a_.name_, i_);
      a_.data_[i_] = v;
      return *this;
    }
    Ref& operator=(const Ref& r) { return *this = static_cast<T>(r); }

   private:
    SharedArray& a_;
    int64_t i_;
  };

  Ref operator[](int64_t i) {
    if (i < 0 || i >= N) {
      report(std::string(name_) + "[" + std::to_string(i) + "] is outside its " + std::to_string(N) + " elements");
      i = 0;  // the launch fails after it; meanwhile write nothing outside the array
    }
    return Ref(*this, i);
  }

 private:
  const char* name_;
  T data_[N]{};
  Access access_[N];
};

// What DMMD_SHARED_SCALAR(T, name) declares here: one tracked value.
template <typename T>
class SharedScalar {
 public:
  explicit SharedScalar(const char* name) : name_(name) {}
  operator T() {
    access(access_, false, interval, name_, -1);
    return value_;
  }
  SharedScalar& operator=(const T& v) {
    access(access_, true, interval, name_, -1);
    value_ = v;
    return *this;
  }

 private:
  const char* name_;
  T value_{};
  Access access_;
};

// Global memory written in the running launch, by 2-byte granule: the writing thread
// (block * threads + thread).
inline std::unordered_map<uintptr_t, int64_t> written;

// What DMMD_STORE(dst, value) does here: *dst = value, recording the writer.
template <typename T, typename V>
void store(T* dst, const V& value, const char* what) {
  if (detect_races && block != nullptr) {
    const int64_t me = static_cast<int64_t>(blockIdx.x) * blockDim.x + block->current;
    const uintptr_t at = reinterpret_cast<uintptr_t>(dst);
    for (uintptr_t g = at / 2; g < (at + sizeof(T) + 1) / 2; ++g) {
      const auto [it, fresh] = written.emplace(g, me);
      if (!fresh && it->second != me) {
        const int64_t threads = blockDim.x;
        report(std::string("global ") + what + " written by block " + std::to_string(it->second / threads) +
               " thread " + std::to_string(it->second % threads) + " and by block " + std::to_string(blockIdx.x) +
               " thread " + std::to_string(block->current) + " in one launch");
        break;
      }
    }
  }
  *dst = static_cast<T>(value);
}

// The launch's dynamic shared memory (see the header's comment).
inline int64_t dynamic_shared_limit = 227 * 1024 - 8 * 1024;
inline std::vector<uint4> stage;         // 16-byte aligned
inline int64_t stage_bytes = 0;           // what the launch asked for
inline int64_t last_stage_bytes = 0;      // ... the last launch
inline std::vector<Access> stage_access_;  // per 2-byte granule

inline unsigned char* row_stage() {
  return stage_bytes > 0 ? reinterpret_cast<unsigned char*>(stage.data()) : nullptr;
}

// Records an access of `bytes` at `p` when p lies in the dynamic shared memory (others are global).
inline void stage_access(const void* p, size_t bytes, bool write) {
  if (stage_bytes == 0) return;
  const auto* base = reinterpret_cast<const unsigned char*>(stage.data());
  const auto* at = static_cast<const unsigned char*>(p);
  if (at < base || at >= base + stage.size() * sizeof(uint4)) return;
  const int64_t first = at - base;
  if (first + static_cast<int64_t>(bytes) > stage_bytes) {
    report("dynamic shared memory [" + std::to_string(first) + ", " + std::to_string(first + bytes) +
           ") is outside the launch's " + std::to_string(stage_bytes) + " bytes");
    return;
  }
  for (int64_t g = first / 2; g < (first + static_cast<int64_t>(bytes) + 1) / 2; ++g) {
    access(stage_access_[g], write, interval, "the staged row (dynamic shared memory)", 2 * g);
  }
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
  blk.exchange.assign(static_cast<size_t>(exchange_buffers) * 8 * threads, 0);
  blk.exchange_access.assign(static_cast<size_t>(exchange_buffers) * threads, Access{});
  block = &blk;
  if (stage_bytes > 0) std::memset(static_cast<void*>(stage.data()), 0xA5, stage.size() * sizeof(uint4));
  ++interval;
  ++barrier_round;
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
    bool diverged = false, mixed = false;
    const Fiber* first = nullptr;
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
        mixed |= first != nullptr && f.waiting != first->waiting;
        if (first == nullptr) first = &f;
      }
    }
    if (done == threads) break;
    if (done > 0 || diverged || mixed) {
      block = nullptr;
      throw std::runtime_error(std::string(kernel) + ": divergent " +
                               (mixed ? "barriers (threads wait at __syncthreads and at a shuffle)" : "__syncthreads") +
                               " in block " + std::to_string(b));
    }
    ++barrier_round;
    if (first->waiting == Barrier::kSync) ++interval;
  }
  block = nullptr;
}

// A launch: the blocks one after another, each with `shared` bytes of dynamic shared memory.
inline void launch(const char* name, unsigned grid, unsigned threads, const std::function<void()>& body,
                   int64_t shared = 0) {
  kernel = name;
  if (shared > dynamic_shared_limit) {
    throw std::runtime_error(std::string(name) + ": " + std::to_string(shared) +
                             " bytes of dynamic shared memory, more than the " +
                             std::to_string(dynamic_shared_limit) + " a block may have");
  }
  stage_bytes = last_stage_bytes = shared;
  stage.assign(static_cast<size_t>((shared + 15) / 16), uint4{0, 0, 0, 0});
  stage_access_.assign(static_cast<size_t>((shared + 1) / 2), Access{});
  misaligned = false;
  vector_accesses = 0;
  race.clear();
  written.clear();
  try {
    for (unsigned b = 0; b < grid; ++b) run_block(b, grid, threads, body);
  } catch (const std::runtime_error& e) {
    written.clear();
    if (race.empty()) throw;
    throw std::runtime_error("race in " + race + " (and then " + e.what() + ")");  // the race first: the likely cause
  }
  last_vector_accesses = vector_accesses;
  written.clear();
  if (!race.empty()) throw std::runtime_error("race in " + race);
  if (misaligned) throw std::runtime_error(std::string(name) + ": misaligned 16-byte vector access");
}

// What DMMD_LAUNCH(kernel, grid, block, stream)(args...) becomes here: the real launch code of
// csrc/cuda/launch*.cuh runs, with the grid cut to at most 3 blocks (the kernels loop over their
// rows grid-stride, so that loop still runs) to keep the emulation fast.
template <typename K>
struct Launcher {
  const char* name;
  unsigned grid, threads;
  K kernel;
  int64_t shared;

  template <typename... A>
  void operator()(A... args) const {
    launch(name, grid < 3 ? grid : 3, threads, [&] { kernel(args...); }, shared);
  }
};

template <typename K>
Launcher<K> launcher(const char* name, unsigned grid, unsigned threads, K kernel, int64_t shared = 0) {
  return {name, grid, threads, kernel, shared};
}

// One exchange buffer of a shuffle or vote: every thread puts its value in its slot, passes a
// barrier, then gets the slots it needs; each access is recorded like a shared one.
template <typename V>
class Exchange {
 public:
  Exchange() : k_(block->fibers[block->current].exchanges) {
    static_assert(sizeof(V) <= 8, "8-byte exchange slots");
    int& next = block->fibers[block->current].exchanges;
    next = (next + 1) % exchange_buffers;
  }
  void put(V v) {
    const unsigned t = block->current;
    access(slot_access(t), true, barrier_round, "the shuffle exchange buffer", t, "barrier");
    std::memcpy(slot(t), &v, sizeof(V));
  }
  V get(unsigned t) const {
    access(slot_access(t), false, barrier_round, "the shuffle exchange buffer", t, "barrier");
    V v;
    std::memcpy(&v, slot(t), sizeof(V));
    return v;
  }

 private:
  unsigned char* slot(unsigned t) const {
    return block->exchange.data() + (static_cast<size_t>(k_) * block->fibers.size() + t) * 8;
  }
  Access& slot_access(unsigned t) const {
    return block->exchange_access[static_cast<size_t>(k_) * block->fibers.size() + t];
  }
  int k_;
};

}  // namespace emu

inline void __syncthreads() { emu::barrier(emu::Barrier::kSync); }

inline int __syncthreads_or(int x) {
  emu::Exchange<int> s;
  s.put(x);
  emu::barrier(emu::Barrier::kSync);
  int r = 0;
  for (unsigned t = 0; t < blockDim.x; ++t) r |= s.get(t) != 0;
  return r;
}

// Warp shuffles, emulated with a block barrier (the kernels shuffle on every thread at once).
template <typename V>
V __shfl_down_sync(unsigned, V v, int o) {
  emu::Exchange<V> s;
  s.put(v);
  emu::barrier(emu::Barrier::kShuffle);
  const unsigned lane = threadIdx.x % 32;
  return lane + o < 32 ? s.get(threadIdx.x + o) : v;
}

template <typename V>
V __shfl_up_sync(unsigned, V v, int o) {
  emu::Exchange<V> s;
  s.put(v);
  emu::barrier(emu::Barrier::kShuffle);
  const unsigned lane = threadIdx.x % 32;
  return lane >= static_cast<unsigned>(o) ? s.get(threadIdx.x - o) : v;
}
