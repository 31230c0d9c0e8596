#pragma once
// Exact eps of isotropic Gaussian-mixture data under the critically-damped Langevin diffusion
// (CLD), the reference model of the CLD gDDIM samplers (gddim/cld_sampler.hpp).
//
// Data x_0 ~ sum_k w_k N(m_k, s_k^2 I_d), fed as u_0 = (x_0, 0) with the velocity in the kernel
// (Sigma_0 = diag(eps, gamma M + eps), gddim/cld_schedule.hpp). Every (x_j, v_j) pair of
// component k is then Gaussian at time t with
//   mean mu_kj = Psi(t,0) (m_kj, 0),  covariance C_k = Sigma_t + s_k^2 psi psi^T  (psi = Psi(t,0)
//   e_x)
// (= Psi diag(s_k^2 + eps, gamma M + eps) Psi^T + the noise part), the same for every pair, so
//   log p_k(u) = log w_k - 1/2 sum_j delta_kj^T C_k^{-1} delta_kj - (d/2) log det C_k + const,
//   score = -sum_k r_k a_k,  a_kj = C_k^{-1} delta_kj,  r = softmax(log p_k),
//   eps_K = -K_t^T score = K_t^T sum_k r_k a_k   (per pair),
// with K_t = R_t (gDDIM) or L_t = chol(Sigma_t) (the Cholesky parameterisation). The Jacobian
// is K^T [sum_k r_k C_k^{-1} - sum_k r_k a_k (a_k - abar)^T] (abar = sum_k r_k a_k), so the VJP
// of a cotangent c is, with c' = K c per pair,
//   dx = sum_k r_k C_k^{-1} c' - sum_k r_k (a_k - abar) (a_k . c').
// All arithmetic in double (float states are converted per element). State rows are
// [x (d) | v (d)]. No parameters or conditioning (cond_size() = param_size() = 0).
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "diffgrad/core/error.hpp"
#include "diffgrad/gddim/cld_sampler.hpp"
#include "diffgrad/gddim/cld_schedule.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::gddim {

template <class Scalar> class CldMixture {
public:
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  using means_type = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  /// `means` K x d, `stds` K entries >= 0 (0: a data point), `weights` K positive entries
  /// (normalised here; empty: equal weights). eps is in the `parameterisation`'s K_t.
  CldMixture(const CldSchedule& schedule, const means_type& means, const Eigen::VectorXd& stds,
             const Eigen::VectorXd& weights = {},
             CldParameterisation parameterisation = CldParameterisation::R)
      : schedule_(schedule), means_(means), stds_(stds), param_(parameterisation) {
    const char* where = "gddim::CldMixture";
    using diffgrad::detail::require;
    const auto k = means.rows();
    if (k < 1 || means.cols() < 1)
      diffgrad::detail::throw_argument(where, "means", "at least one component of dimension >= 1",
                                       diffgrad::detail::concat(k, " x ", means.cols()));
    if (!means.allFinite())
      diffgrad::detail::throw_argument(where, "means", "finite coordinates", "NaN or Inf");
    require(stds.size() == k, where, "stds", "one std per component (rows of means)",
            static_cast<double>(stds.size()));
    for (Eigen::Index i = 0; i < k; ++i)
      require(std::isfinite(stds(i)) && stds(i) >= 0, where, "stds", "finite stds >= 0", stds(i));
    Eigen::VectorXd w = weights.size() == 0 ? Eigen::VectorXd::Ones(k) : weights;
    require(w.size() == k, where, "weights", "one weight per component (rows of means)",
            static_cast<double>(w.size()));
    for (Eigen::Index i = 0; i < k; ++i)
      require(std::isfinite(w(i)) && w(i) > 0, where, "weights", "positive finite weights", w(i));
    log_weights_ = (w / w.sum()).array().log().matrix();
  }

  std::int64_t data_dim() const { return means_.cols(); }
  std::int64_t num_components() const { return means_.rows(); }
  std::int64_t cond_size() const { return 0; }
  std::int64_t param_size() const { return 0; }
  const CldSchedule& schedule() const { return schedule_; }

  /// eps_K(u, t) at node.t (node.model_t is not used: the model knows the schedule's time).
  void eps(const state_type& u, const Node& n, state_type& out) const {
    prepare(u, n.t, "gddim::CldMixture::eps");
    out.resize(u.rows(), u.cols());
    const Eigen::Index d = means_.cols();
    for (Eigen::Index r = 0; r < u.rows(); ++r) {
      row_terms(u, r);
      for (Eigen::Index j = 0; j < d; ++j) {
        const double ax = abar_[static_cast<std::size_t>(j)],
                     av = abar_[static_cast<std::size_t>(d + j)];
        out(r, j) = static_cast<Scalar>(kt_(0, 0) * ax + kt_(1, 0) * av);
        out(r, d + j) = static_cast<Scalar>(kt_(0, 1) * ax + kt_(1, 1) * av);
      }
    }
  }

  /// dx = (d eps / du)^T a. No conditioning or parameters: dcond / dparams are left alone.
  void vjp(const state_type& u, const Node& n, const state_type& a, state_type& dx, vector_type*,
           vector_type*) const {
    const char* where = "gddim::CldMixture::vjp";
    if (a.rows() != u.rows() || a.cols() != u.cols())
      throw invalid_argument(
          diffgrad::detail::concat(where, ": argument 'cotangent' expected shape ", u.rows(), " x ",
                                   u.cols(), " (that of u), got ", a.rows(), " x ", a.cols()));
    prepare(u, n.t, where);
    const Eigen::Index d = means_.cols(), kc = means_.rows();
    tmp_.resize(static_cast<std::size_t>(2 * d));
    state_type result(u.rows(), u.cols()); // a and dx may alias
    for (Eigen::Index r = 0; r < u.rows(); ++r) {
      row_terms(u, r);
      // c' = K c per pair.
      for (Eigen::Index j = 0; j < d; ++j) {
        const double cx = static_cast<double>(a(r, j)), cv = static_cast<double>(a(r, d + j));
        tmp_[static_cast<std::size_t>(j)] = kt_(0, 0) * cx + kt_(0, 1) * cv;
        tmp_[static_cast<std::size_t>(d + j)] = kt_(1, 0) * cx + kt_(1, 1) * cv;
      }
      std::vector<double>& acc = acc_;
      acc.assign(static_cast<std::size_t>(2 * d), 0.0);
      for (Eigen::Index k = 0; k < kc; ++k) {
        const double rk = resp_[static_cast<std::size_t>(k)];
        const double* ak = &a_[static_cast<std::size_t>(k * 2 * d)];
        double dot = 0;
        for (Eigen::Index j = 0; j < 2 * d; ++j) dot += ak[j] * tmp_[static_cast<std::size_t>(j)];
        const Mat2& ci = cinv_[static_cast<std::size_t>(k)];
        for (Eigen::Index j = 0; j < d; ++j) {
          const double cx = tmp_[static_cast<std::size_t>(j)],
                       cv = tmp_[static_cast<std::size_t>(d + j)];
          acc[static_cast<std::size_t>(j)] +=
              rk *
              (ci(0, 0) * cx + ci(0, 1) * cv - (ak[j] - abar_[static_cast<std::size_t>(j)]) * dot);
          acc[static_cast<std::size_t>(d + j)] +=
              rk * (ci(1, 0) * cx + ci(1, 1) * cv -
                    (ak[d + j] - abar_[static_cast<std::size_t>(d + j)]) * dot);
        }
      }
      for (Eigen::Index j = 0; j < 2 * d; ++j)
        result(r, j) = static_cast<Scalar>(acc[static_cast<std::size_t>(j)]);
    }
    dx = result;
  }

private:
  /// Per-time blocks: K_t, Psi(t,0) e_x, C_k^{-1}, log det C_k.
  void prepare(const state_type& u, double t, const char* where) const {
    const Eigen::Index d = means_.cols();
    if (u.cols() != 2 * d)
      throw invalid_argument(diffgrad::detail::concat(
          where, ": argument 'u' expected width 2d = ", 2 * d, " (rows [x | v]), got ", u.cols()));
    if (t == t_ && !cinv_.empty()) return;
    const Mat2 sigma = schedule_.covariance(t), psi = schedule_.transition(t, 0.0);
    kt_ = param_ == CldParameterisation::R ? schedule_.sqrt_covariance(t)
                                           : CldSchedule::cholesky(sigma);
    psi_x_ = psi(0, 0);
    psi_v_ = psi(1, 0);
    const Eigen::Index kc = means_.rows();
    cinv_.resize(static_cast<std::size_t>(kc));
    logdet_.resize(static_cast<std::size_t>(kc));
    for (Eigen::Index k = 0; k < kc; ++k) {
      const Eigen::Vector2d col = psi.col(0);
      const Mat2 c = sigma + (stds_(k) * stds_(k)) * (col * col.transpose());
      cinv_[static_cast<std::size_t>(k)] = CldSchedule::inverse(c);
      logdet_[static_cast<std::size_t>(k)] = std::log(c(0, 0) * c(1, 1) - c(0, 1) * c(1, 0));
    }
    t_ = t;
  }

  /// For row r: a_k = C_k^{-1} delta_k (a_, K x 2d), responsibilities resp_, abar_.
  void row_terms(const state_type& u, Eigen::Index r) const {
    const Eigen::Index d = means_.cols(), kc = means_.rows();
    a_.resize(static_cast<std::size_t>(kc * 2 * d));
    resp_.resize(static_cast<std::size_t>(kc));
    abar_.assign(static_cast<std::size_t>(2 * d), 0.0);
    double top = -std::numeric_limits<double>::infinity();
    for (Eigen::Index k = 0; k < kc; ++k) {
      const Mat2& ci = cinv_[static_cast<std::size_t>(k)];
      double* ak = &a_[static_cast<std::size_t>(k * 2 * d)];
      double quad = 0;
      for (Eigen::Index j = 0; j < d; ++j) {
        const double dx = static_cast<double>(u(r, j)) - psi_x_ * means_(k, j);
        const double dv = static_cast<double>(u(r, d + j)) - psi_v_ * means_(k, j);
        ak[j] = ci(0, 0) * dx + ci(0, 1) * dv;
        ak[d + j] = ci(1, 0) * dx + ci(1, 1) * dv;
        quad += dx * ak[j] + dv * ak[d + j];
      }
      const double logit = log_weights_(k) - 0.5 * quad -
                           0.5 * static_cast<double>(d) * logdet_[static_cast<std::size_t>(k)];
      resp_[static_cast<std::size_t>(k)] = logit;
      top = std::max(top, logit);
    }
    double total = 0;
    for (auto& v : resp_) total += (v = std::exp(v - top));
    for (Eigen::Index k = 0; k < kc; ++k) {
      const double rk = (resp_[static_cast<std::size_t>(k)] /= total);
      const double* ak = &a_[static_cast<std::size_t>(k * 2 * d)];
      for (Eigen::Index j = 0; j < 2 * d; ++j) abar_[static_cast<std::size_t>(j)] += rk * ak[j];
    }
  }

  CldSchedule schedule_;
  means_type means_;
  Eigen::VectorXd stds_, log_weights_;
  CldParameterisation param_;
  // Per-time cache and per-row scratch (the model is not thread-safe: one per thread).
  mutable double t_ = -1.0, psi_x_ = 0.0, psi_v_ = 0.0;
  mutable Mat2 kt_ = Mat2::Zero();
  mutable std::vector<Mat2> cinv_;
  mutable std::vector<double> logdet_, a_, resp_, abar_, tmp_, acc_;
};

} // namespace diffgrad::gddim
