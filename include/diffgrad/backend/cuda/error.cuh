#pragma once
// Errors of the CUDA backend. Inside (kernels, launch helpers, the cuBLAS/CUB wrappers)
// everything reports a status code (cudaError_t, cublasStatus_t); only the host API
// (CudaBackend, DeviceState, the device models) turns a failed status into an exception,
// diffgrad::gpu::cuda_error, which names the operation and the CUDA error.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "diffgrad/backend/cuda/config.cuh"

namespace diffgrad::gpu {

/// A CUDA runtime or cuBLAS call failed (no device, out of memory, a launch error, ...).
class cuda_error : public std::runtime_error {
public:
  cuda_error(const std::string& what, int code) : std::runtime_error(what), code_(code) {}
  /// The cudaError_t or cublasStatus_t value.
  int code() const { return code_; }

private:
  int code_;
};

/// Throws cuda_error("<where>: <operation> failed: <error name> (<message>)") on failure.
inline void check(cudaError_t status, const char* where, const char* operation) {
  if (status == cudaSuccess) return;
  throw cuda_error(std::string(where) + ": " + operation + " failed: " + cudaGetErrorName(status) +
                       " (" + cudaGetErrorString(status) + ")",
                   static_cast<int>(status));
}

inline const char* cublas_status_name(cublasStatus_t status) {
  switch (status) {
  case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
  case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
  case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
  case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
  case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
  case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
  case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
  case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
  case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
  default: return "cuBLAS error";
  }
}

inline void check(cublasStatus_t status, const char* where, const char* operation) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw cuda_error(std::string(where) + ": " + operation + " failed: " + cublas_status_name(status),
                   static_cast<int>(status));
}

/// Number of CUDA devices visible to this process; 0 (not an exception) when there is no
/// driver or no device, so callers can skip GPU work cleanly.
inline int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError(); // clear the sticky "no device" error
    return 0;
  }
  return count;
}

} // namespace diffgrad::gpu
