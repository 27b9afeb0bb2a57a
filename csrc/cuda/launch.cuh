// DMMD_LAUNCH(kernel, grid, block, stream)(args...): a kernel launch on a stream. Every CUDA
// launch of dmmd is written with it, in launch_losses.cuh, launch_samplers.cuh and
// launch_gram.cuh (one per .cu file, since a non-template __global__ may be defined in one
// translation unit only), from the params each op's host prologue filled (dmmd/params.h). The
// tests' host emulation (tests/csrc/cuda_emulation.h) defines DMMD_LAUNCH to run the same
// launches on blocks of fibers, so it tests this code too.
#pragma once
#include "dmmd/params.h"

#ifndef DMMD_LAUNCH
#define DMMD_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#endif
