#pragma once
// Exact eps of an isotropic Gaussian mixture of images under the blurring diffusion (BDM,
// gddim/bdm_schedule.hpp): data ~ sum_m pi_m N(mu_m, s_m^2 I) in pixel space, C channels of
// H x W images per row. In the DCT basis (y = DCT(x), each channel separately) the mixture
// stays isotropic (the DCT is orthonormal): component m is N(nu_m, s_m^2 I), nu_m = DCT(mu_m),
// and every frequency k diffuses independently, so at time t
//   y_k | m ~ N(alpha_k(t) nu_{m,k}, v_{m,k}),      v_{m,k} = alpha_k(t)^2 s_m^2 + sigma(t)^2,
//   r_m = log pi_m - 1/2 sum_k log v_{m,k} - 1/2 sum_k (y_k - alpha_k nu_{m,k})^2 / v_{m,k},
//   w = softmax(r),   eps_y = -sigma grad log p_t = sigma sum_m w_m (y - alpha nu_m) / v_m,
// with alpha_k(t) = a(t) d_k(t) repeated over the channels. This is the reference model of
// the BDM sampler's tests and benchmarks (the eps a perfectly trained network would give).
//
// eps(x, node, out) is the PIXEL-space model (what a network is: the sampler wraps it with
// gddim::SpectralEpsField); eps_spectral(y, t, out) is the same field in the DCT basis.
// The node's time t picks the schedule's alpha_k(t) and sigma(t); the rest of the node is
// not read. No VJP (not a differentiable model); s_m = 0 (Dirac components) is allowed for
// t > 0 since sigma(t) > 0 there.
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <utility>

#include "diffgrad/core/error.hpp"
#include "diffgrad/gddim/bdm_schedule.hpp"
#include "diffgrad/gddim/dct.hpp"
#include "diffgrad/gddim/spectral_field.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::models {

template <class Vp = gddim::BdmCosineSchedule> class BdmGaussianMixture {
public:
  using state_type = gddim::ImageBatch;

  /// `means` is M x (C H W) in pixel space (channel after channel, each row-major), `stds`
  /// and `weights` have M entries (weights are normalised here). C = channels.
  BdmGaussianMixture(const gddim::BdmSchedule<Vp>& schedule, const state_type& means,
                     const Eigen::VectorXd& stds, const Eigen::VectorXd& weights,
                     Eigen::Index channels = 1)
      : schedule_(schedule), dct_(schedule.height(), schedule.width(), channels), stds_(stds) {
    const char* where = "BdmGaussianMixture";
    const Eigen::Index m = means.rows();
    if (m < 1 || means.cols() != dct_.size())
      diffgrad::detail::throw_argument(
          where, "means",
          diffgrad::detail::concat("at least one component of C H W = ", dct_.size(), " pixels (",
                                   channels, " channels of ", schedule.height(), " x ",
                                   schedule.width(), ")"),
          diffgrad::detail::concat(means.rows(), " x ", means.cols()));
    if (stds.size() != m)
      diffgrad::detail::throw_argument(where, "stds", diffgrad::detail::concat(m, " entries"),
                                       stds.size());
    if (weights.size() != m)
      diffgrad::detail::throw_argument(where, "weights", diffgrad::detail::concat(m, " entries"),
                                       weights.size());
    for (Eigen::Index k = 0; k < m; ++k) {
      diffgrad::detail::require(stds(k) >= 0 && std::isfinite(stds(k)), where, "stds",
                                "non-negative finite stds", stds(k));
      diffgrad::detail::require(weights(k) > 0 && std::isfinite(weights(k)), where, "weights",
                                "positive finite weights", weights(k));
    }
    if (!means.allFinite())
      diffgrad::detail::throw_argument(where, "means", "finite pixel values", "NaN or Inf");
    nu_.resize(m, dct_.size());
    dct_.forward(means, nu_);
    log_weights_ = (weights / weights.sum()).array().log().matrix();
    alpha_k_.resize(schedule.size());
    alpha_col_.resize(dct_.size());
  }
  BdmGaussianMixture(const gddim::BdmSchedule<Vp>& schedule, const state_type& means,
                     const Eigen::VectorXd& stds, Eigen::Index channels = 1)
      : BdmGaussianMixture(schedule, means, stds, Eigen::VectorXd::Ones(means.rows()), channels) {}

  std::int64_t dim() const { return dct_.size(); }
  std::int64_t num_components() const { return nu_.rows(); }
  const state_type& spectral_means() const { return nu_; } ///< nu_m = DCT(mu_m), M x (C H W)
  const gddim::BdmSchedule<Vp>& schedule() const { return schedule_; }

  /// Pixel-space eps at the node's time: IDCT(eps_spectral(DCT(x), node.t)).
  void eps(const state_type& x, const Node& n, state_type& out) const {
    check(x, "BdmGaussianMixture::eps");
    fit(spec_, x.rows(), x.cols());
    fit(spec_eps_, x.rows(), x.cols());
    dct_.forward(x, spec_);
    eps_spectral(spec_, n.t, spec_eps_);
    fit(out, x.rows(), x.cols());
    dct_.inverse(spec_eps_, out);
  }

  /// eps in the DCT basis at time t (y, out: B x (C H W) DCT coefficients).
  void eps_spectral(const state_type& y, double t, state_type& out) const {
    check(y, "BdmGaussianMixture::eps_spectral");
    schedule_.alpha(t, alpha_k_);
    const double sigma = schedule_.sigma(t), s2 = sigma * sigma;
    const Eigen::Index plane = schedule_.size(), d = dct_.size(), m = nu_.rows();
    for (Eigen::Index c = 0; c < d; ++c) alpha_col_[c] = alpha_k_[c % plane];
    fit(out, y.rows(), y.cols());
    logits_.resize(m);
    for (Eigen::Index b = 0; b < y.rows(); ++b) {
      for (Eigen::Index k = 0; k < m; ++k) {
        const double sk2 = stds_(k) * stds_(k);
        double quad = 0.0, log_det = 0.0;
        for (Eigen::Index c = 0; c < d; ++c) {
          const double v = alpha_col_[c] * alpha_col_[c] * sk2 + s2;
          const double e = y(b, c) - alpha_col_[c] * nu_(k, c);
          quad += e * e / v;
          log_det += std::log(v);
        }
        logits_[k] = log_weights_[k] - 0.5 * log_det - 0.5 * quad;
      }
      const double top = logits_.maxCoeff();
      logits_ = (logits_.array() - top).exp().matrix();
      logits_ /= logits_.sum();
      for (Eigen::Index c = 0; c < d; ++c) {
        double acc = 0.0;
        for (Eigen::Index k = 0; k < m; ++k) {
          const double v = alpha_col_[c] * alpha_col_[c] * stds_(k) * stds_(k) + s2;
          acc += logits_[k] * (y(b, c) - alpha_col_[c] * nu_(k, c)) / v;
        }
        out(b, c) = sigma * acc;
      }
    }
  }

private:
  static void fit(state_type& m, Eigen::Index rows, Eigen::Index cols) {
    if (m.rows() != rows || m.cols() != cols) m.resize(rows, cols);
  }
  void check(const state_type& x, const char* where) const {
    if (x.cols() != dct_.size())
      diffgrad::detail::throw_argument(
          where, "x", diffgrad::detail::concat("rows of C H W = ", dct_.size(), " values"),
          diffgrad::detail::concat(x.cols(), " columns"));
  }

  gddim::BdmSchedule<Vp> schedule_;
  gddim::ChannelDct dct_;
  Eigen::VectorXd stds_, log_weights_;
  state_type nu_;
  mutable Eigen::VectorXd alpha_k_, alpha_col_, logits_;
  mutable state_type spec_, spec_eps_;
};

} // namespace diffgrad::models
