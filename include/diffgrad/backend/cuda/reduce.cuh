#pragma once
// Reductions of the CUDA backend, on CUB (cub::DeviceReduce::TransformReduce): the dot
// product accumulated in double (as EigenBackend does) and the finite check. The per-element
// transforms are host/device functors (tested on the host). CUB's temporary storage and the
// result slots live in a ReduceScratch that grows on first use and is reused afterwards, so
// steady-state reductions allocate nothing. A reduction returns its value to the host:
// it synchronises the stream (one small device-to-host copy into pinned memory).
//
// Summation order differs from Eigen's, so dot products agree with the CPU to rounding
// (about n u |a||b|), not bit for bit; CUB's order is run-to-run deterministic on one GPU.
#include <cuda_runtime.h>

#include <cub/device/device_reduce.cuh>
#include <cuda/functional>
#include <cuda/std/functional>
#include <thrust/iterator/counting_iterator.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "diffgrad/backend/cuda/config.cuh"
#include "diffgrad/backend/cuda/device_buffer.cuh"

DIFFGRAD_CUDA_NAMESPACE_BEGIN

/// double(a[i]) * double(b[i]).
template <class Scalar> struct DotTransform {
  const Scalar* a;
  const Scalar* b;
  DIFFGRAD_HOST_DEVICE double operator()(std::int64_t i) const {
    return static_cast<double>(a[i]) * static_cast<double>(b[i]);
  }
};

/// 1 when x[i] is NaN or +-Inf, else 0.
template <class Scalar> struct NonFiniteTransform {
  const Scalar* x;
  DIFFGRAD_HOST_DEVICE int operator()(std::int64_t i) const {
#if defined(__CUDA_ARCH__)
    return isfinite(x[i]) ? 0 : 1;
#else
    return std::isfinite(x[i]) ? 0 : 1;
#endif
  }
};

/// CUB temporary storage and result slots, reused across reductions (grows, never shrinks).
class ReduceScratch {
public:
  ReduceScratch() = default;
  ReduceScratch(const ReduceScratch&) = delete;
  ReduceScratch& operator=(const ReduceScratch&) = delete;
  ~ReduceScratch() {
    if (host_) (void)cudaFreeHost(host_);
  }

  /// sum_i double(a[i]) double(b[i]) over n elements, into `result` (synchronises `stream`).
  template <class Scalar>
  cudaError_t dot(const Scalar* a, const Scalar* b, std::int64_t n, cudaStream_t stream,
                  double& result) {
    result = 0.0;
    if (n <= 0) return cudaSuccess;
    if (cudaError_t e = prepare(stream); e != cudaSuccess) return e;
    const DotTransform<Scalar> op{a, b};
    return reduce(op, n, ::cuda::std::plus<double>{}, 0.0, dev_sum_.data(), &host_->sum, stream,
                  result);
  }

  /// all x[i] finite, into `result` (synchronises `stream`).
  template <class Scalar>
  cudaError_t all_finite(const Scalar* x, std::int64_t n, cudaStream_t stream, bool& result) {
    result = true;
    if (n <= 0) return cudaSuccess;
    if (cudaError_t e = prepare(stream); e != cudaSuccess) return e;
    int any_bad = 0;
    const NonFiniteTransform<Scalar> op{x};
    const cudaError_t e =
        reduce(op, n, ::cuda::maximum<int>{}, 0, dev_flag_.data(), &host_->flag, stream, any_bad);
    result = any_bad == 0;
    return e;
  }

private:
  struct HostSlots {
    double sum;
    int flag;
  };

  cudaError_t prepare(cudaStream_t stream) {
    if (host_) return cudaSuccess;
    // Pinned slots: the device-to-host copy of a result is a true async copy.
    if (cudaError_t e = cudaMallocHost(reinterpret_cast<void**>(&host_), sizeof(HostSlots));
        e != cudaSuccess) {
      host_ = nullptr;
      return e;
    }
    try {
      dev_sum_ = DeviceBuffer<double>(1, stream);
      dev_flag_ = DeviceBuffer<int>(1, stream);
    } catch (const cuda_error& err) {
      return static_cast<cudaError_t>(err.code());
    }
    return cudaSuccess;
  }

  template <class Op, class Reduction, class T>
  cudaError_t reduce(const Op& op, std::int64_t n, Reduction reduction, T init, T* dev_out,
                     T* host_out, cudaStream_t stream, T& result) {
    const thrust::counting_iterator<std::int64_t> first(0);
    std::size_t bytes = 0;
    if (cudaError_t e = cub::DeviceReduce::TransformReduce(nullptr, bytes, first, dev_out, n,
                                                           reduction, op, init, stream);
        e != cudaSuccess)
      return e;
    // Never pass a null temp pointer below: CUB would read it as another size query.
    if (bytes > temp_.bytes() || temp_.data() == nullptr) {
      try {
        temp_ =
            DeviceBuffer<unsigned char>(static_cast<std::int64_t>(bytes < 16 ? 16 : bytes), stream);
      } catch (const cuda_error& err) {
        return static_cast<cudaError_t>(err.code());
      }
    }
    std::size_t capacity = temp_.bytes();
    if (cudaError_t e = cub::DeviceReduce::TransformReduce(temp_.data(), capacity, first, dev_out,
                                                           n, reduction, op, init, stream);
        e != cudaSuccess)
      return e;
    if (cudaError_t e =
            cudaMemcpyAsync(host_out, dev_out, sizeof(T), cudaMemcpyDeviceToHost, stream);
        e != cudaSuccess)
      return e;
    if (cudaError_t e = cudaStreamSynchronize(stream); e != cudaSuccess) return e;
    result = *host_out;
    return cudaSuccess;
  }

  DeviceBuffer<unsigned char> temp_;
  DeviceBuffer<double> dev_sum_;
  DeviceBuffer<int> dev_flag_;
  HostSlots* host_ = nullptr;
};

DIFFGRAD_CUDA_NAMESPACE_END
