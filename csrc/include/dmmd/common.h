// Shared by CPU (C++) and CUDA (nvcc) code. Torch-free on purpose: these headers
// compile with plain nvcc in a second and their math is tested on the host.
#pragma once

#if defined(__CUDACC__)
#define DMMD_HD __host__ __device__ __forceinline__
#else
#define DMMD_HD inline
#endif
