#pragma once
// The one generic launcher of the CUDA backend: a functor f with `void operator()(int64 i)
// const` (host/device, plain data members) is run for i in [0, n) by a grid-stride kernel on
// the caller's stream. Kernel math therefore lives in functors that also run, and are
// tested, on the host; adding an operation means writing a functor, never a kernel.
// Returns the launch status (status codes inside; the host API throws).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "diffgrad/backend/cuda/config.cuh"

DIFFGRAD_CUDA_NAMESPACE_BEGIN

namespace detail {

template <class F> DIFFGRAD_CUDA_KERNEL void for_each_index_kernel(F f, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    f(i);
}

} // namespace detail

/// Threads per block of every elementwise launch.
inline constexpr int kThreadsPerBlock = 256;
/// Grid cap: beyond it threads loop (grid stride); 2^16 blocks of 256 threads keep every SM of
/// an H100 busy with room to spare, and the loop keeps indices 64-bit for any n.
inline constexpr std::int64_t kMaxBlocks = std::int64_t{1} << 16;

/// Runs f(i) for i in [0, n) on `stream`. No-op for n <= 0.
template <class F> cudaError_t launch_for_each(const F& f, std::int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const std::int64_t blocks =
      std::min<std::int64_t>((n + kThreadsPerBlock - 1) / kThreadsPerBlock, kMaxBlocks);
  detail::for_each_index_kernel<F>
      <<<static_cast<unsigned>(blocks), kThreadsPerBlock, 0, stream>>>(f, n);
  return cudaGetLastError();
}

/// Runs f on the host for i in [0, n): the same functor, for host tests and reference runs.
template <class F> void run_for_each_on_host(const F& f, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) f(i);
}

DIFFGRAD_CUDA_NAMESPACE_END
