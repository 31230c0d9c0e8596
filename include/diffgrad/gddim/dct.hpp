#pragma once
// Orthonormal 2-D DCT-II for H x W images, as two small dense products on the host (Eigen).
//
// The blurring diffusion (gDDIM's BDM) is diagonal in this basis: every frequency is an
// independent scalar diffusion. For the image sizes in scope (8x8 .. 64x64) two dense products
// cost H W (H + W) multiply-adds per image, which is cheap next to a model call, and need no
// FFT library (so no GPL dependency and the same algorithm on the GPU as a cuBLAS product).
//
//   1-D matrix      D_n[k][m] = c_k cos(pi (2m + 1) k / (2n)),  c_0 = sqrt(1/n), c_k = sqrt(2/n)
//   forward         X_hat = D_H X D_W^T          (X an H x W image)
//   inverse         X     = D_H^T X_hat D_W      (D is orthogonal: D^T = D^{-1})
//
// This is scipy.fft.dctn(type=2, norm="ortho"), the transform of the official gDDIM BDM code.
//
// Batch layout: a batch is a B x (H W) row-major matrix, one image per row, each image
// flattened row-major: pixel (r, c) sits in column r W + c, and frequency (i, j) (i along H,
// j along W) in column i W + j of the transformed row. Channels are separate rows (or
// separate batches): the transform acts on one H x W plane at a time.
#include <Eigen/Core>
#include <cmath>
#include <numbers>

#include "diffgrad/core/error.hpp"

namespace diffgrad::gddim {

/// Row-major batch of flattened images (the layout of EigenBackend<double>::state_type).
using ImageBatch = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// The n x n orthonormal DCT-II matrix D_n (rows are frequencies, columns are positions).
inline Eigen::MatrixXd dct2_matrix(Eigen::Index n) {
  diffgrad::detail::require(n >= 1, "dct2_matrix", "n", "a size >= 1", static_cast<double>(n));
  Eigen::MatrixXd d(n, n);
  const double nd = static_cast<double>(n);
  const double c0 = std::sqrt(1.0 / nd), ck = std::sqrt(2.0 / nd);
  for (Eigen::Index k = 0; k < n; ++k)
    for (Eigen::Index m = 0; m < n; ++m) {
      // (2m + 1) k is reduced modulo 4n before scaling, so the cosine's argument stays in
      // [0, 2 pi): the product itself would grow like n^2 and lose digits in the cosine.
      const auto phase = ((2 * m + 1) * k) % (4 * n);
      d(k, m) =
          (k == 0 ? c0 : ck) * std::cos(std::numbers::pi * static_cast<double>(phase) / (2.0 * nd));
    }
  return d;
}

/// Separable orthonormal 2-D DCT-II of H x W images. The matrices are built once in the
/// constructor; forward/inverse with output storage of the right shape do not allocate.
///
/// Not safe to call concurrently on one object: the products go through one H x W scratch
/// image held by the object (a copy per thread is cheap, three small matrices).
class Dct2d {
public:
  Dct2d(Eigen::Index height, Eigen::Index width) : h_(height), w_(width) {
    diffgrad::detail::require(height >= 1, "Dct2d", "height", "an image height >= 1",
                              static_cast<double>(height));
    diffgrad::detail::require(width >= 1, "Dct2d", "width", "an image width >= 1",
                              static_cast<double>(width));
    dh_ = dct2_matrix(height);
    dw_ = dct2_matrix(width);
    dw_t_ = dw_.transpose();
    scratch_.resize(height, width);
  }

  Eigen::Index height() const { return h_; }
  Eigen::Index width() const { return w_; }
  Eigen::Index size() const { return h_ * w_; }           ///< H W: the row length of a batch
  const Eigen::MatrixXd& matrix_h() const { return dh_; } ///< D_H (H x H)
  const Eigen::MatrixXd& matrix_w() const { return dw_; } ///< D_W (W x W)

  /// out.row(b) = DCT(in.row(b)) for every image b. `out` must already have in's shape; in
  /// and out may be the same matrix (each image goes through the scratch first).
  void forward(const ImageBatch& in, ImageBatch& out) const { apply(in, out, false); }
  /// out.row(b) = IDCT(in.row(b)) (the transpose of forward).
  void inverse(const ImageBatch& in, ImageBatch& out) const { apply(in, out, true); }

  /// Allocating conveniences (outside step loops).
  ImageBatch forward(const ImageBatch& in) const {
    ImageBatch out(in.rows(), in.cols());
    forward(in, out);
    return out;
  }
  ImageBatch inverse(const ImageBatch& in) const {
    ImageBatch out(in.rows(), in.cols());
    inverse(in, out);
    return out;
  }

private:
  using Image = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using ConstImageMap = Eigen::Map<const Image>;
  using ImageMap = Eigen::Map<Image>;

  void apply(const ImageBatch& in, ImageBatch& out, bool inverse) const {
    const char* where = inverse ? "Dct2d::inverse" : "Dct2d::forward";
    // Messages are built only on failure: a passing call must not allocate.
    if (in.cols() != size())
      diffgrad::detail::throw_argument(where, "in",
                                       diffgrad::detail::concat("rows of H W = ", size(),
                                                                " values (", h_, " x ", w_,
                                                                " images, row-major)"),
                                       diffgrad::detail::concat(in.cols(), " columns"));
    if (out.rows() != in.rows() || out.cols() != in.cols())
      diffgrad::detail::throw_argument(
          where, "out",
          diffgrad::detail::concat("the shape of 'in' (", in.rows(), " x ", in.cols(), ")"),
          diffgrad::detail::concat(out.rows(), " x ", out.cols()));
    for (Eigen::Index b = 0; b < in.rows(); ++b) {
      const ConstImageMap x(in.row(b).data(), h_, w_);
      ImageMap y(out.row(b).data(), h_, w_);
      // Two products through the scratch: the first reads `in` and the second writes `out`,
      // so in == out is safe and no temporary is created (noalias into distinct storage).
      if (!inverse) {
        scratch_.noalias() = dh_ * x;   // D_H X
        y.noalias() = scratch_ * dw_t_; // (D_H X) D_W^T
      } else {
        scratch_.noalias() = dh_.transpose() * x; // D_H^T X_hat
        y.noalias() = scratch_ * dw_;             // (D_H^T X_hat) D_W
      }
    }
  }

  Eigen::Index h_, w_;
  Eigen::MatrixXd dh_, dw_, dw_t_;
  mutable Image scratch_;
};

} // namespace diffgrad::gddim
