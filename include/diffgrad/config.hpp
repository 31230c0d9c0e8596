#pragma once
// Build-wide macros. DIFFGRAD_HOST_DEVICE is the one host/device annotation used by
// every function that must also run inside a CUDA kernel.
#include "diffgrad/version.hpp"

#if defined(__CUDACC__)
#define DIFFGRAD_HOST_DEVICE __host__ __device__
#else
#define DIFFGRAD_HOST_DEVICE
#endif
