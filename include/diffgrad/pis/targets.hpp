#pragma once
// Target densities for the Path Integral Sampler (docs/pis.md). A target is an unnormalised
// density mu_hat = Z mu on R^d, evaluated for a batch of rows x (B x d, double):
//
//   target.dim()                                  d
//   target.log_density(x, out)                    out(r) = log mu_hat(x_r)      (B)
//   target.grad_log_density(x, out)               out = grad log mu_hat        (B x d)
//   target.hvp_log_density(x, v, out)  optional   out_r = Hess log mu_hat(x_r) v_r
//   target.log_normalizer()            optional   log Z, when known
//
// The optional Hessian-vector product makes PIS-Grad's control exactly differentiable in x
// (pis/controls.hpp); without it the control treats grad log mu_hat as a constant in x.
// Built in: an isotropic Gaussian (its optimal control is known in closed form), isotropic
// Gaussian mixtures (the 9-mode 2-D grid of the PIS experiments) and Neal's funnel.
#include <Eigen/Core>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <numbers>
#include <utility>
#include <vector>

#include "diffgrad/core/error.hpp"

namespace diffgrad::pis {

using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class T>
concept Target = requires(const T& t, const Matrix& x, Eigen::VectorXd& logp, Matrix& grad) {
  { t.dim() } -> std::convertible_to<std::int64_t>;
  t.log_density(x, logp);
  t.grad_log_density(x, grad);
};

template <class T>
concept TargetWithHessian =
    Target<T> && requires(const T& t, const Matrix& x, const Matrix& v, Matrix& out) {
      t.hvp_log_density(x, v, out);
    };

template <class T>
concept TargetWithLogZ = Target<T> && requires(const T& t) {
  { t.log_normalizer() } -> std::convertible_to<double>;
};

namespace detail {
inline void require_rows(const Matrix& x, std::int64_t d, const char* where) {
  if (x.cols() != d)
    diffgrad::detail::throw_argument(where, "x", diffgrad::detail::concat("rows of dimension ", d),
                                     diffgrad::detail::concat("dimension ", x.cols()));
}
} // namespace detail

/// mu_hat = Z N(mean, s^2 I).
class GaussianTarget {
public:
  GaussianTarget(Eigen::VectorXd mean, double stddev, double log_z = 0.0)
      : mean_(std::move(mean)), s_(stddev), log_z_(log_z) {
    diffgrad::detail::require(mean_.size() >= 1, "GaussianTarget", "mean", "a non-empty vector",
                              static_cast<double>(mean_.size()));
    diffgrad::detail::require(stddev > 0.0 && std::isfinite(stddev), "GaussianTarget", "stddev",
                              "a positive finite standard deviation", stddev);
    diffgrad::detail::require_finite(log_z, "GaussianTarget", "log_z");
  }
  std::int64_t dim() const { return mean_.size(); }
  const Eigen::VectorXd& mean() const { return mean_; }
  double stddev() const { return s_; }
  double log_normalizer() const { return log_z_; }
  void log_density(const Matrix& x, Eigen::VectorXd& out) const {
    detail::require_rows(x, dim(), "GaussianTarget::log_density");
    const double d = static_cast<double>(dim());
    out = (log_z_ - 0.5 * d * std::log(2.0 * std::numbers::pi * s_ * s_)) -
          ((x.rowwise() - mean_.transpose()).rowwise().squaredNorm() / (2.0 * s_ * s_)).array();
  }
  void grad_log_density(const Matrix& x, Matrix& out) const {
    detail::require_rows(x, dim(), "GaussianTarget::grad_log_density");
    out = (-(x.rowwise() - mean_.transpose()) / (s_ * s_)).eval();
  }
  void hvp_log_density(const Matrix& x, const Matrix& v, Matrix& out) const {
    detail::require_rows(x, dim(), "GaussianTarget::hvp_log_density");
    out = -v / (s_ * s_);
  }

private:
  Eigen::VectorXd mean_;
  double s_, log_z_;
};

/// mu_hat = Z sum_k w_k N(m_k, s_k^2 I) (weights normalised to sum 1).
class GaussianMixtureTarget {
public:
  GaussianMixtureTarget(Matrix means, std::vector<double> stddevs, std::vector<double> weights,
                        double log_z = 0.0)
      : means_(std::move(means)), s_(std::move(stddevs)), w_(std::move(weights)), log_z_(log_z) {
    const char* where = "GaussianMixtureTarget";
    const auto k = static_cast<std::size_t>(means_.rows());
    diffgrad::detail::require(k >= 1 && means_.cols() >= 1, where, "means",
                              "at least one component of dimension >= 1",
                              static_cast<double>(k));
    diffgrad::detail::require(s_.size() == k, where, "stddevs", "one per component",
                              static_cast<double>(s_.size()));
    diffgrad::detail::require(w_.size() == k, where, "weights", "one per component",
                              static_cast<double>(w_.size()));
    double total = 0;
    for (std::size_t j = 0; j < k; ++j) {
      diffgrad::detail::require(s_[j] > 0.0 && std::isfinite(s_[j]), where, "stddevs",
                                "positive finite values", s_[j]);
      diffgrad::detail::require(w_[j] > 0.0 && std::isfinite(w_[j]), where, "weights",
                                "positive finite values", w_[j]);
      total += w_[j];
    }
    for (double& w : w_) w /= total;
    diffgrad::detail::require_finite(log_z, where, "log_z");
    inv_s2_.resize(static_cast<Eigen::Index>(k));
    for (std::size_t j = 0; j < k; ++j) inv_s2_(static_cast<Eigen::Index>(j)) = 1.0 / (s_[j] * s_[j]);
    inv_s4_ = inv_s2_.array().square().matrix();
  }

  /// The 9-mode grid of the PIS experiments: modes at {-5, 0, 5}^2, variance 0.3, equal
  /// weights, log Z = 0.
  static GaussianMixtureTarget nine_modes() {
    Matrix m(9, 2);
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) m.row(3 * i + j) << -5.0 + 5.0 * i, -5.0 + 5.0 * j;
    return GaussianMixtureTarget(m, std::vector<double>(9, std::sqrt(0.3)),
                                 std::vector<double>(9, 1.0));
  }

  std::int64_t dim() const { return means_.cols(); }
  std::int64_t components() const { return means_.rows(); }
  const Matrix& means() const { return means_; }
  double stddev(std::int64_t k) const { return s_[static_cast<std::size_t>(k)]; }
  double weight(std::int64_t k) const { return w_[static_cast<std::size_t>(k)]; }
  double log_normalizer() const { return log_z_; }

  void log_density(const Matrix& x, Eigen::VectorXd& out) const {
    detail::require_rows(x, dim(), "GaussianMixtureTarget::log_density");
    Matrix logc;
    component_logs(x, logc);
    out.resize(x.rows());
    for (Eigen::Index r = 0; r < x.rows(); ++r) {
      const double mx = logc.row(r).maxCoeff();
      out(r) = log_z_ + mx + std::log((logc.row(r).array() - mx).exp().sum());
    }
  }
  void grad_log_density(const Matrix& x, Matrix& out) const {
    detail::require_rows(x, dim(), "GaussianMixtureTarget::grad_log_density");
    responsibilities(x, resp_);
    grad_from_responsibilities(x, resp_, out);
  }
  /// Hess log mu = sum_k r_k (g_k g_k^T - I / s_k^2) - g g^T, g_k = (m_k - x) / s_k^2,
  /// g = sum_k r_k g_k. Batched over rows and components (one responsibility pass).
  void hvp_log_density(const Matrix& x, const Matrix& v, Matrix& out) const {
    detail::require_rows(x, dim(), "GaussianMixtureTarget::hvp_log_density");
    responsibilities(x, resp_);
    grad_from_responsibilities(x, resp_, g_);
    // sum_k r_k g_k (g_k . v) = sum_k c_k (m_k - x), c_k = r_k (m_k . v - x . v) / s_k^4.
    const Eigen::ArrayXd xv = (x.array() * v.array()).rowwise().sum();
    const Eigen::ArrayXd gv = (g_.array() * v.array()).rowwise().sum();
    c_ = v * means_.transpose(); // m_k . v  (B x K)
    c_.array().colwise() -= xv;
    c_.array() *= resp_.array().rowwise() * inv_s4_.array();
    out = c_ * means_;
    out -= (c_.rowwise().sum().asDiagonal() * x);
    const Eigen::VectorXd r_over_s2 = resp_ * inv_s2_.transpose();
    out -= r_over_s2.asDiagonal() * v;
    out -= (gv.matrix().asDiagonal() * g_);
  }
  /// r_k(x) = w_k N(x; m_k, s_k^2) / sum_j w_j N(x; m_j, s_j^2)  (B x K).
  void responsibilities(const Matrix& x, Matrix& resp) const {
    component_logs(x, resp);
    const Eigen::ArrayXd mx = resp.rowwise().maxCoeff();
    resp.array().colwise() -= mx;
    resp.array() = resp.array().exp();
    const Eigen::ArrayXd total = resp.rowwise().sum();
    resp.array().colwise() /= total;
  }

private:
  /// g = sum_k r_k (m_k - x) / s_k^2 = (R / s^2) M - diag(sum_k r_k / s_k^2) x.
  void grad_from_responsibilities(const Matrix& x, const Matrix& resp, Matrix& out) const {
    rs_ = (resp.array().rowwise() * inv_s2_.array()).matrix();
    out = rs_ * means_;
    out -= rs_.rowwise().sum().asDiagonal() * x;
  }
  void component_logs(const Matrix& x, Matrix& out) const {
    const double d = static_cast<double>(dim());
    out.resize(x.rows(), means_.rows());
    for (Eigen::Index k = 0; k < means_.rows(); ++k) {
      const double s2 = s_[static_cast<std::size_t>(k)] * s_[static_cast<std::size_t>(k)];
      out.col(k) = (std::log(w_[static_cast<std::size_t>(k)]) -
                    0.5 * d * std::log(2.0 * std::numbers::pi * s2)) -
                   ((x.rowwise() - means_.row(k)).rowwise().squaredNorm() / (2.0 * s2)).array();
    }
  }

  Matrix means_;
  std::vector<double> s_, w_;
  double log_z_;
  Eigen::RowVectorXd inv_s2_, inv_s4_; ///< 1 / s_k^2, 1 / s_k^4
  mutable Matrix resp_, g_, c_, rs_;   ///< scratch of the batched gradient and HVP
};

/// Neal's funnel (normalised, log Z = 0): x_0 ~ N(0, s0^2), x_{1..d-1} | x_0 ~ N(0, e^{x_0}).
/// The PIS thesis uses s0 = 3 (x_0 ~ N(0, 9)) and d = 10; its released code uses s0 = 1.
class FunnelTarget {
public:
  explicit FunnelTarget(std::int64_t dim = 10, double x0_stddev = 3.0) : d_(dim), s0_(x0_stddev) {
    diffgrad::detail::require(dim >= 2, "FunnelTarget", "dim", "at least 2",
                              static_cast<double>(dim));
    diffgrad::detail::require(x0_stddev > 0.0 && std::isfinite(x0_stddev), "FunnelTarget",
                              "x0_stddev", "a positive finite standard deviation", x0_stddev);
  }
  std::int64_t dim() const { return d_; }
  double log_normalizer() const { return 0.0; }
  void log_density(const Matrix& x, Eigen::VectorXd& out) const {
    detail::require_rows(x, d_, "FunnelTarget::log_density");
    const double k = static_cast<double>(d_ - 1), l2pi = std::log(2.0 * std::numbers::pi);
    const auto x0 = x.col(0).array();
    const auto rest = x.rightCols(d_ - 1).rowwise().squaredNorm().array();
    out = (-0.5 * l2pi - std::log(s0_) - x0.square() / (2.0 * s0_ * s0_)) +
          (-0.5 * k * l2pi - 0.5 * k * x0 - 0.5 * rest * (-x0).exp());
  }
  void grad_log_density(const Matrix& x, Matrix& out) const {
    detail::require_rows(x, d_, "FunnelTarget::grad_log_density");
    const double k = static_cast<double>(d_ - 1);
    const Eigen::ArrayXd e = (-x.col(0).array()).exp();
    out.resize(x.rows(), d_);
    out.col(0) = (-x.col(0).array() / (s0_ * s0_) - 0.5 * k +
                  0.5 * x.rightCols(d_ - 1).rowwise().squaredNorm().array() * e)
                     .matrix();
    out.rightCols(d_ - 1) = -(e.matrix().asDiagonal() * x.rightCols(d_ - 1));
  }
  void hvp_log_density(const Matrix& x, const Matrix& v, Matrix& out) const {
    detail::require_rows(x, d_, "FunnelTarget::hvp_log_density");
    const Eigen::ArrayXd e = (-x.col(0).array()).exp();
    const auto xr = x.rightCols(d_ - 1);
    const auto vr = v.rightCols(d_ - 1);
    // H00 = -1/s0^2 - |x_r|^2 e / 2,  H0i = x_i e,  Hii = -e.
    const Eigen::ArrayXd xv = (xr.array() * vr.array()).rowwise().sum();
    out.resize(x.rows(), d_);
    out.col(0) = ((-1.0 / (s0_ * s0_) - 0.5 * xr.rowwise().squaredNorm().array() * e) *
                      v.col(0).array() +
                  e * xv)
                     .matrix();
    out.rightCols(d_ - 1) =
        (e.matrix().asDiagonal() * ((xr.array().colwise() * v.col(0).array()) - vr.array()).matrix());
  }

private:
  std::int64_t d_;
  double s0_;
};

} // namespace diffgrad::pis
