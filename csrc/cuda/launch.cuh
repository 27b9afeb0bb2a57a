// DMMD_LAUNCH(kernel, grid, block, stream)(args...): a kernel launch on a stream, and
// DMMD_LAUNCH_SHARED(kernel, grid, block, shared_bytes, stream)(args...) one with dynamic shared
// memory. Every CUDA launch of dmmd is written with them, in launch_losses.cuh,
// launch_samplers.cuh and launch_gram.cuh (one per .cu file, since a non-template __global__ may
// be defined in one translation unit only), from the params each op's host prologue filled
// (dmmd/params.h). The tests' host emulation (tests/csrc/cuda_emulation.h) defines both to run
// the same launches on blocks of fibers, so it tests this code too.
#pragma once
#include <cstdlib>
#include <cstring>

#include "dmmd/params.h"

#if !defined(DMMD_CUDA_EMULATION)
#include <c10/cuda/CUDAException.h>

#include <map>
#include <mutex>
#include <utility>
#endif

#ifndef DMMD_LAUNCH
#define DMMD_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#define DMMD_LAUNCH_SHARED(kernel, grid, block, shared, stream) kernel<<<(grid), (block), (shared), (stream)>>>
#endif

// A row kernel built staged and unstaged (row_block.cuh, stage_row), launched with one argument
// list: `staged` with `stage` bytes of dynamic shared memory when stage > 0 (stage_bytes_for),
// else `unstaged`.
#define DMMD_LAUNCH_STAGED_OR_NOT(staged, unstaged, stage, grid, block, stream, ...) \
  do {                                                                                 \
    if ((stage) > 0) {                                                                 \
      DMMD_LAUNCH_SHARED(staged, grid, block, stage, stream)(__VA_ARGS__);             \
    } else {                                                                           \
      DMMD_LAUNCH(unstaged, grid, block, stream)(__VA_ARGS__);                         \
    }                                                                                  \
  } while (0)

namespace dmmd::cuda {

// Whether rows may be staged in shared memory (row_block.cuh, stage_row): yes unless the
// environment sets DMMD_ROW_STAGING=0, which benchmarks use to time the unstaged kernels beside
// the staged ones in one run. Read at every launch.
inline bool row_staging_enabled() {
  const char* e = std::getenv("DMMD_ROW_STAGING");
  return e == nullptr || std::strcmp(e, "0") != 0;
}

#if !defined(DMMD_CUDA_EMULATION)
// The most dynamic shared memory `kernel` may have on the current device besides its static
// shared memory (the device's opt-in limit per block), granted to it on first use per (kernel,
// device) and remembered: a launch costs no further driver calls.
template <typename K>
int64_t dynamic_shared_limit(K* kernel) {
  static std::mutex lock;
  static std::map<std::pair<const void*, int>, int64_t> granted;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> hold(lock);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  const auto found = granted.find(key);
  if (found != granted.end()) return found->second;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const int limit = optin - static_cast<int>(attr.sharedSizeBytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
  return granted[key] = limit;
}
#define DMMD_DYNAMIC_SHARED_LIMIT(kernel) ::dmmd::cuda::dynamic_shared_limit(kernel)
#endif

// Bytes of dynamic shared memory a row of v elements of elem_bytes needs when staged
// (row_block.cuh, stage_row): the row, at its offset within 16 bytes in global memory.
inline int64_t row_stage_bytes(int64_t v, int elem_bytes) { return v * elem_bytes + 16; }

// Dynamic shared memory for a launch of `kernel` over rows of v elements of elem_bytes: the
// bytes of one staged row where it fits beside the kernel's own shared memory, else 0 (the
// kernel then reads the row from global memory, pass after pass).
template <typename K>
int64_t stage_bytes_for(K* kernel, int64_t v, int elem_bytes) {
  if (!row_staging_enabled()) return 0;
  const int64_t bytes = row_stage_bytes(v, elem_bytes);
  return bytes <= DMMD_DYNAMIC_SHARED_LIMIT(kernel) ? bytes : 0;
}

}  // namespace dmmd::cuda
