// Build-only stand-in for the header that PyTorch's CMake generates from
// c10/cuda/impl/cuda_cmake_macros.h.in. CPU wheels of torch ship the c10/cuda
// headers but not this generated file; `make cuda-check` (tools/cuda_check.py)
// puts this directory on the include path so the CUDA kernels compile against
// such a wheel. Never used by a real CUDA build, whose torch ships its own.
#pragma once

// torch's shared libraries are built with BUILD_SHARED_LIBS=ON, which the
// template turns into this one definition (it only matters on Windows, where
// it selects dllimport for C10_CUDA_API).
#define C10_CUDA_BUILD_SHARED_LIBS
