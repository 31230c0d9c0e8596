#pragma once
// CUDA hygiene of the header-only device code (docs/cuda.md):
//  - the CUDA backend's namespace is diffgrad::gpu, not diffgrad::cuda: CCCL (Thrust, CUB,
//    libcu++) owns the global namespace ::cuda, and a diffgrad::cuda would make every `cuda::`
//    ambiguous in code that says `using namespace diffgrad;`;
//  - every kernel and every device-code template lives in diffgrad::gpu inside an inline
//    namespace named after the library version (DIFFGRAD_CUDA_NAMESPACE_BEGIN/END), so two
//    diffgrad versions linked into one program never share a kernel symbol;
//  - kernels are declared with hidden ELF visibility (DIFFGRAD_CUDA_KERNEL): a header-only
//    kernel is instantiated in every shared library that uses it, possibly for different
//    GPU architectures, and with default visibility the dynamic linker would bind all of them
//    to one copy (the bug CCCL fixed in NVIDIA/cccl#166). Hidden, each library keeps its own.
// The macros expand to nothing special for the host compiler, so the functor headers that
// carry the kernel math also compile (and are tested) as plain C++.
#include "diffgrad/config.hpp"

#define DIFFGRAD_CUDA_CAT_(a, b, c, d) a##b##_##c##_##d
#define DIFFGRAD_CUDA_CAT(a, b, c, d) DIFFGRAD_CUDA_CAT_(a, b, c, d)
/// The versioned inline namespace, e.g. v0_1_0.
#define DIFFGRAD_CUDA_ABI_NAMESPACE                                                                \
  DIFFGRAD_CUDA_CAT(v, DIFFGRAD_VERSION_MAJOR, DIFFGRAD_VERSION_MINOR, DIFFGRAD_VERSION_PATCH)

#define DIFFGRAD_CUDA_NAMESPACE_BEGIN                                                              \
  namespace diffgrad::gpu {                                                                        \
  inline namespace DIFFGRAD_CUDA_ABI_NAMESPACE {
#define DIFFGRAD_CUDA_NAMESPACE_END                                                                \
  }                                                                                                \
  }

#if defined(__CUDACC__)
#if defined(__GNUC__) || defined(__clang__)
#define DIFFGRAD_CUDA_KERNEL __global__ __attribute__((visibility("hidden")))
#else
#define DIFFGRAD_CUDA_KERNEL __global__
#endif
#endif

/// Unroll hint for device code only (the host compiler does not know `#pragma unroll`; loops
/// with compile-time trip counts are unrolled there anyway).
#if defined(__CUDA_ARCH__)
#define DIFFGRAD_UNROLL _Pragma("unroll")
#else
#define DIFFGRAD_UNROLL
#endif
