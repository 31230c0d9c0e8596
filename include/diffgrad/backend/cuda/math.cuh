#pragma once
// Elementary functions for host/device functors: CUDA's math library in device code, the C++
// library on the host (host functor tests). Used by the device models, whose results agree
// with the CPU models to rounding (not bit for bit: the libraries differ in the last ulp).
#include <cmath>

#include "diffgrad/backend/cuda/config.cuh"

DIFFGRAD_CUDA_NAMESPACE_BEGIN
namespace detail {

DIFFGRAD_HOST_DEVICE inline float exp_of(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}
DIFFGRAD_HOST_DEVICE inline double exp_of(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
DIFFGRAD_HOST_DEVICE inline float tanh_of(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  return std::tanh(x);
#endif
}
DIFFGRAD_HOST_DEVICE inline double tanh_of(double x) {
#if defined(__CUDA_ARCH__)
  return ::tanh(x);
#else
  return std::tanh(x);
#endif
}
template <class T> DIFFGRAD_HOST_DEVICE inline T min_of(T a, T b) { return b < a ? b : a; }
template <class T> DIFFGRAD_HOST_DEVICE inline T max_of(T a, T b) { return a < b ? b : a; }

} // namespace detail
DIFFGRAD_CUDA_NAMESPACE_END
