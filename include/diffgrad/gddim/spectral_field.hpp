#pragma once
// Running a pixel-space noise model in the DCT basis (the blurring diffusion sampler's state).
//
// The BDM gDDIM sampler (gddim/bdm_sampler.hpp) keeps its state as DCT coefficients, where
// every step coefficient is a per-frequency diagonal. The user's network predicts pixel-space
// noise, so the engine calls it through these adapters:
//
//   field:  eps_y = D eps(D^T y)               (D: the orthonormal 2-D DCT of every channel)
//   VJP:    (d eps_y / d y)^T a = D J^T D^T a  (D orthonormal: D^{-1} = D^T)
//
// i.e. y -> IDCT -> model -> DCT, and for the VJP the cotangent goes IDCT -> model VJP -> DCT
// (conditioning and parameter gradients come straight from the model's VJP at the pixel
// cotangent D^T a). Since D is orthonormal, standard normal noise is standard normal in either
// basis, so eps means the same in both.
//
// Layout: a state row holds `channels` images of H x W, channel after channel, each flattened
// row-major (pixel (r, c) of channel ch at column ch H W + r W + c); the DCT acts on each
// channel's H x W block separately, frequency (i, j) of channel ch at column ch H W + i W + j.
// Double states (EigenBackend<double>) only: Dct2d is a double transform.
//
// Scratch buffers are sized at construction for a batch size; a call with another batch
// size resizes them once (allocates) and then runs allocation-free again.
#include <Eigen/Core>
#include <cstdint>
#include <type_traits>

#include "diffgrad/concepts/model.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/gddim/dct.hpp"
#include "diffgrad/gradients/vjp_call.hpp"
#include "diffgrad/schedule/node.hpp"
#include "diffgrad/solvers/model_call.hpp"

namespace diffgrad::gddim {

/// The orthonormal 2-D DCT-II of every H x W channel block of a B x (C H W) row-major batch,
/// built on Dct2d's matrices (dct2_matrix). forward/inverse do not allocate; in and out may be
/// the same matrix. Not thread-safe on one object (one scratch image), like Dct2d.
class ChannelDct {
public:
  ChannelDct(Eigen::Index height, Eigen::Index width, Eigen::Index channels = 1)
      : h_(height), w_(width), c_(channels) {
    const char* where = "ChannelDct";
    diffgrad::detail::require(height >= 1, where, "height", "an image height >= 1",
                              static_cast<double>(height));
    diffgrad::detail::require(width >= 1, where, "width", "an image width >= 1",
                              static_cast<double>(width));
    diffgrad::detail::require(channels >= 1, where, "channels", "at least 1 channel",
                              static_cast<double>(channels));
    dh_ = dct2_matrix(height);
    dw_ = dct2_matrix(width);
    dh_t_ = dh_.transpose();
    dw_t_ = dw_.transpose();
    scratch_.resize(height, width);
  }
  Eigen::Index height() const { return h_; }
  Eigen::Index width() const { return w_; }
  Eigen::Index channels() const { return c_; }
  Eigen::Index plane() const { return h_ * w_; }     ///< H W
  Eigen::Index size() const { return c_ * h_ * w_; } ///< C H W: the row length of a batch

  /// out.row(b) = DCT of every channel block of in.row(b); out is resized to in's shape if
  /// needed (allocation-free when it already has it).
  void forward(const ImageBatch& in, ImageBatch& out) const { apply(in, out, false); }
  /// The inverse (transpose) of forward.
  void inverse(const ImageBatch& in, ImageBatch& out) const { apply(in, out, true); }

private:
  using Image = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  void apply(const ImageBatch& in, ImageBatch& out, bool inverse) const {
    const char* where = inverse ? "ChannelDct::inverse" : "ChannelDct::forward";
    if (in.cols() != size())
      diffgrad::detail::throw_argument(where, "in",
                                       diffgrad::detail::concat("rows of C H W = ", size(),
                                                                " values (", c_, " channels of ",
                                                                h_, " x ", w_, ")"),
                                       diffgrad::detail::concat(in.cols(), " columns"));
    // (out == in always has the right shape; other storage is sized once.)
    if (out.rows() != in.rows() || out.cols() != in.cols()) out.resize(in.rows(), in.cols());
    const Eigen::Index p = plane();
    for (Eigen::Index b = 0; b < in.rows(); ++b)
      for (Eigen::Index ch = 0; ch < c_; ++ch) {
        const Eigen::Map<const Image> x(in.row(b).data() + ch * p, h_, w_);
        Eigen::Map<Image> y(out.row(b).data() + ch * p, h_, w_);
        // Through the scratch: the first product reads `in`, the second writes `out`, so
        // in == out is safe and nothing is allocated.
        if (!inverse) {
          scratch_.noalias() = dh_ * x;
          y.noalias() = scratch_ * dw_t_;
        } else {
          scratch_.noalias() = dh_t_ * x;
          y.noalias() = scratch_ * dw_;
        }
      }
  }

  Eigen::Index h_, w_, c_;
  Eigen::MatrixXd dh_, dw_, dh_t_, dw_t_;
  mutable Image scratch_;
};

namespace spectral_detail {
inline void fit(ImageBatch& m, Eigen::Index rows, Eigen::Index cols) {
  if (m.rows() != rows || m.cols() != cols) m.resize(rows, cols);
}
} // namespace spectral_detail

/// The engine's field(y, node, out) for a pixel-space noise model: out = DCT(eps(IDCT(y))).
/// The model gets the node as EpsField gives it (the whole Node for node-aware models, the
/// model time otherwise). Holds a reference to the model: it must outlive the field.
template <class Model> class SpectralEpsField {
public:
  SpectralEpsField(Model& model, const ChannelDct& dct, Eigen::Index batch = 1)
      : model_(model), dct_(dct), pix_in_(batch, dct.size()), pix_out_(batch, dct.size()) {}

  void operator()(const ImageBatch& y, const Node& n, ImageBatch& out) {
    spectral_detail::fit(pix_in_, y.rows(), y.cols());
    spectral_detail::fit(pix_out_, y.rows(), y.cols());
    dct_.inverse(y, pix_in_);
    EpsField<Model>{model_}(static_cast<const ImageBatch&>(pix_in_), n, pix_out_);
    if (pix_out_.rows() != y.rows() || pix_out_.cols() != y.cols())
      diffgrad::detail::throw_argument(
          "SpectralEpsField", "model",
          diffgrad::detail::concat("an eps of the input's shape ", y.rows(), " x ", y.cols()),
          diffgrad::detail::concat(pix_out_.rows(), " x ", pix_out_.cols()));
    spectral_detail::fit(out, y.rows(), y.cols());
    dct_.forward(pix_out_, out);
  }

private:
  Model& model_;
  const ChannelDct& dct_;
  ImageBatch pix_in_, pix_out_;
};

/// The engine's vjp(y, node, a, dx, dcond, dparams) for a pixel-space differentiable noise
/// model: dx = DCT(vjp_pix(IDCT(y), IDCT(a))); dcond and dparams accumulate the model's own
/// gradients at the pixel cotangent IDCT(a) (the DCT does not depend on them).
template <class Model> class SpectralEpsVjp {
public:
  SpectralEpsVjp(Model& model, const ChannelDct& dct, Eigen::Index batch = 1)
      : model_(model), dct_(dct), pix_in_(batch, dct.size()), pix_cot_(batch, dct.size()),
        pix_dx_(batch, dct.size()) {}

  template <class Vector>
  void operator()(const ImageBatch& y, const Node& n, const ImageBatch& cotangent, ImageBatch& dx,
                  Vector* dcond, Vector* dparams) {
    for (ImageBatch* m : {&pix_in_, &pix_cot_, &pix_dx_})
      spectral_detail::fit(*m, y.rows(), y.cols());
    dct_.inverse(y, pix_in_);
    dct_.inverse(cotangent, pix_cot_);
    EpsVjp<Model>{model_}(static_cast<const ImageBatch&>(pix_in_), n,
                          static_cast<const ImageBatch&>(pix_cot_), pix_dx_, dcond, dparams);
    if (pix_dx_.rows() != y.rows() || pix_dx_.cols() != y.cols())
      diffgrad::detail::throw_argument(
          "SpectralEpsVjp", "model",
          diffgrad::detail::concat("a vjp dx of the input's shape ", y.rows(), " x ", y.cols()),
          diffgrad::detail::concat(pix_dx_.rows(), " x ", pix_dx_.cols()));
    spectral_detail::fit(dx, y.rows(), y.cols());
    dct_.forward(pix_dx_, dx);
  }

private:
  Model& model_;
  const ChannelDct& dct_;
  ImageBatch pix_in_, pix_cot_, pix_dx_;
};

} // namespace diffgrad::gddim
