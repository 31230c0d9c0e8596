// Host check of the device DCT's cuBLAS bookkeeping (gddim/cuda/spectral_field.cuh): the two
// column-major BLAS calls of channel_dct_gemms (one GEMM over the whole batch, one strided-
// batched GEMM over the images), run here through a plain column-major reference BLAS, must
// reproduce the CPU gddim::ChannelDct exactly up to rounding, for non-square images with
// several channels and batch rows, forward and inverse, in place. This is the shape,
// transposition and stride arithmetic of the GPU transform; cuBLAS itself is exercised by
// test_cuda_bdm_spectral (label gpu). Runs without a device (label cuda).
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "diffgrad/gddim/cuda/spectral_field.cuh"
#include "diffgrad/gddim/spectral_field.hpp"

namespace {

/// Column-major reference BLAS with the interface channel_dct_gemms expects (alpha 1, beta 0).
struct ReferenceBlas {
  int calls = 0;
  static double at(const double* m, bool t, std::int64_t ld, std::int64_t i, std::int64_t j) {
    return t ? m[j + i * ld] : m[i + j * ld]; // op(M)(i, j)
  }
  bool gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, const double* a,
            std::int64_t lda, const double* b, std::int64_t ldb, double* c, std::int64_t ldc) {
    ++calls;
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t i = 0; i < m; ++i) {
        double s = 0.0;
        for (std::int64_t p = 0; p < k; ++p) s += at(a, ta, lda, i, p) * at(b, tb, ldb, p, j);
        c[i + j * ldc] = s;
      }
    return true;
  }
  bool gemm_strided_batched(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k,
                            const double* a, std::int64_t lda, std::int64_t sa, const double* b,
                            std::int64_t ldb, std::int64_t sb, double* c, std::int64_t ldc,
                            std::int64_t sc, std::int64_t count) {
    for (std::int64_t q = 0; q < count; ++q)
      gemm(ta, tb, m, n, k, a + q * sa, lda, b + q * sb, ldb, c + q * sc, ldc);
    calls -= static_cast<int>(count) - 1; // one batched call
    return true;
  }
};

std::vector<double> sample_batch(std::int64_t n) {
  std::vector<double> x(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < x.size(); ++i)
    x[i] = std::sin(1.3 * static_cast<double>(i) + 0.7) * 1.5 + 0.1 * static_cast<double>(i % 5);
  return x;
}

double max_relative(const std::vector<double>& a, const diffgrad::gddim::ImageBatch& b) {
  double diff = 0.0, scale = 0.0;
  for (Eigen::Index i = 0; i < b.size(); ++i) {
    diff = std::max(diff, std::fabs(a[static_cast<std::size_t>(i)] - b.data()[i]));
    scale = std::max(scale, std::fabs(b.data()[i]));
  }
  return diff / scale;
}

} // namespace

TEST_CASE("device DCT bookkeeping (channel_dct_gemms) == CPU ChannelDct, reference BLAS",
          "[cuda][gddim][dct]") {
  namespace csd = diffgrad::gddim::cuda_spectral_detail;
  struct Shape {
    int batch, channels, height, width;
  };
  for (const Shape s : {Shape{3, 2, 4, 3}, Shape{2, 3, 5, 8}, Shape{1, 1, 1, 6}, Shape{2, 1, 7, 1},
                        Shape{1, 1, 1, 1}}) {
    INFO("batch " << s.batch << ", " << s.channels << " channels of " << s.height << " x "
                  << s.width);
    const std::int64_t dim = std::int64_t{s.channels} * s.height * s.width;
    const std::int64_t size = s.batch * dim;
    const std::vector<double> dh = csd::row_major_dct<double>(s.height);
    const std::vector<double> dw = csd::row_major_dct<double>(s.width);
    const std::vector<double> x = sample_batch(size);
    const diffgrad::gddim::ChannelDct cpu(s.height, s.width, s.channels);
    const diffgrad::gddim::ImageBatch x_cpu =
        Eigen::Map<const diffgrad::gddim::ImageBatch>(x.data(), s.batch, dim);
    for (const bool inverse : {false, true}) {
      INFO((inverse ? "inverse" : "forward"));
      diffgrad::gddim::ImageBatch expected;
      if (inverse)
        cpu.inverse(x_cpu, expected);
      else
        cpu.forward(x_cpu, expected);
      ReferenceBlas blas;
      std::vector<double> scratch(static_cast<std::size_t>(size), NAN), out = x; // in place
      REQUIRE(csd::channel_dct_gemms(blas, inverse, std::int64_t{s.batch} * s.channels, s.height,
                                     s.width, dh.data(), dw.data(), out.data(), scratch.data(),
                                     out.data()));
      CHECK(blas.calls == 2); // one GEMM + one strided-batched GEMM, whatever the batch
      // Same products, other summation order: a few ulps (tolerance 1e-14 relative).
      CHECK(max_relative(out, expected) <= 1e-14);
    }
  }
}

TEST_CASE("device DCT bookkeeping: forward then inverse is the identity", "[cuda][gddim][dct]") {
  namespace csd = diffgrad::gddim::cuda_spectral_detail;
  const int batch = 2, channels = 3, h = 6, w = 4;
  const std::int64_t size = std::int64_t{batch} * channels * h * w;
  const std::vector<double> dh = csd::row_major_dct<double>(h), dw = csd::row_major_dct<double>(w);
  const std::vector<double> x = sample_batch(size);
  std::vector<double> y(x.size()), back(x.size()), scratch(x.size());
  ReferenceBlas blas;
  REQUIRE(csd::channel_dct_gemms(blas, false, batch * channels, h, w, dh.data(), dw.data(),
                                 x.data(), scratch.data(), y.data()));
  REQUIRE(csd::channel_dct_gemms(blas, true, batch * channels, h, w, dh.data(), dw.data(), y.data(),
                                 scratch.data(), back.data()));
  const diffgrad::gddim::ImageBatch x_map =
      Eigen::Map<const diffgrad::gddim::ImageBatch>(x.data(), batch, size / batch);
  CHECK(max_relative(back, x_map) <= 1e-14);
  // Orthonormal: the transform keeps the squared norm (so standard normal noise stays so).
  double nx = 0.0, ny = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    nx += x[i] * x[i];
    ny += y[i] * y[i];
  }
  CHECK(std::fabs(ny - nx) <= 1e-13 * nx);
}
