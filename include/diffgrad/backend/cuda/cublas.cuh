#pragma once
// cuBLAS for the device models: an RAII handle bound to a stream, and GEMM/GEMV on ROW-MAJOR
// matrices (the states' layout). cuBLAS is column-major; a row-major r x c matrix is the
// column-major c x r transpose with the same memory, so the row-major product
// C = op(A) op(B) is computed as the column-major C^T = op(B)^T op(A)^T with A and B swapped.
// Math mode is pinned to CUBLAS_DEFAULT_MATH with TF32 off, so float GEMMs are true FP32
// (NVIDIA_TF32_OVERRIDE=1 in the environment would still override it; the tests' float
// tolerance assumes FP32). Status codes inside; CublasHandle's constructor throws.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "diffgrad/backend/cuda/error.cuh"

namespace diffgrad::gpu {

class CublasHandle {
public:
  explicit CublasHandle(cudaStream_t stream) {
    check(cublasCreate(&handle_), "CublasHandle", "cublasCreate");
    const cublasStatus_t s1 = cublasSetStream(handle_, stream);
    const cublasStatus_t s2 = cublasSetMathMode(handle_, CUBLAS_DEFAULT_MATH);
    if (s1 != CUBLAS_STATUS_SUCCESS || s2 != CUBLAS_STATUS_SUCCESS) {
      cublasDestroy(handle_);
      check(s1 != CUBLAS_STATUS_SUCCESS ? s1 : s2, "CublasHandle", "cublasSetStream/MathMode");
    }
  }
  ~CublasHandle() {
    if (handle_) (void)cublasDestroy(handle_);
  }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  cublasHandle_t get() const { return handle_; }

private:
  cublasHandle_t handle_ = nullptr;
};

namespace blas {

enum class Op { n, t }; ///< op(M) = M or M^T (of the ROW-MAJOR matrix)

inline cublasOperation_t to_cublas(Op op) { return op == Op::n ? CUBLAS_OP_N : CUBLAS_OP_T; }

inline cublasStatus_t gemm_cm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                              int n, int k, float alpha, const float* a, int lda, const float* b,
                              int ldb, float beta, float* c, int ldc) {
  return cublasSgemm(h, ta, tb, m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc);
}
inline cublasStatus_t gemm_cm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                              int n, int k, double alpha, const double* a, int lda, const double* b,
                              int ldb, double beta, double* c, int ldc) {
  return cublasDgemm(h, ta, tb, m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc);
}

/// Row-major C (m x n, leading dimension ldc) = alpha op(A) op(B) + beta C, with op(A) m x k
/// and op(B) k x n; lda/ldb are the row strides of A and B as stored. (Handle is
/// cublasHandle_t; the host tests pass a reference column-major BLAS to check the mapping.)
template <class Scalar, class Handle>
cublasStatus_t gemm(Handle h, Op op_a, Op op_b, std::int64_t m, std::int64_t n, std::int64_t k,
                    Scalar alpha, const Scalar* a, std::int64_t lda, const Scalar* b,
                    std::int64_t ldb, Scalar beta, Scalar* c, std::int64_t ldc) {
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  // Column-major: C^T (n x m) = op(B)^T (n x k) op(A)^T (k x m).
  return gemm_cm(h, to_cublas(op_b), to_cublas(op_a), static_cast<int>(n), static_cast<int>(m),
                 static_cast<int>(k), alpha, b, static_cast<int>(ldb), a, static_cast<int>(lda),
                 beta, c, static_cast<int>(ldc));
}

inline cublasStatus_t gemv_cm(cublasHandle_t h, cublasOperation_t t, int m, int n, float alpha,
                              const float* a, int lda, const float* x, float beta, float* y) {
  return cublasSgemv(h, t, m, n, &alpha, a, lda, x, 1, &beta, y, 1);
}
inline cublasStatus_t gemv_cm(cublasHandle_t h, cublasOperation_t t, int m, int n, double alpha,
                              const double* a, int lda, const double* x, double beta, double* y) {
  return cublasDgemv(h, t, m, n, &alpha, a, lda, x, 1, &beta, y, 1);
}

/// y (n) = alpha A^T x + beta y for a row-major A (m x n, row stride lda) and x (m): the
/// column sums of A when x is all ones.
template <class Scalar, class Handle>
cublasStatus_t gemv_t(Handle h, std::int64_t m, std::int64_t n, Scalar alpha, const Scalar* a,
                      std::int64_t lda, const Scalar* x, Scalar beta, Scalar* y) {
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  // Row-major A (m x n) is column-major A^T (n x m): A^T x is a plain (N) GEMV there.
  return gemv_cm(h, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m), alpha, a,
                 static_cast<int>(lda), x, beta, y);
}

/// y (m) = alpha A x + beta y for a row-major A (m x n, row stride lda) and x (n).
template <class Scalar, class Handle>
cublasStatus_t gemv_n(Handle h, std::int64_t m, std::int64_t n, Scalar alpha, const Scalar* a,
                      std::int64_t lda, const Scalar* x, Scalar beta, Scalar* y) {
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  return gemv_cm(h, CUBLAS_OP_T, static_cast<int>(n), static_cast<int>(m), alpha, a,
                 static_cast<int>(lda), x, beta, y);
}

} // namespace blas
} // namespace diffgrad::gpu
