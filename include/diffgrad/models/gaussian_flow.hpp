#pragma once
// Exact rectified-flow velocity between noise N(0, I) at t = 0 and data N(mu, s^2 I) at
// t = 1 under the independent coupling X_t = (1 - t) x0 + t x1. X_t is Gaussian with
//   m_t = t mu,   var_t = (1 - t)^2 + t^2 s^2   (per coordinate),
// and the marginal velocity is the regression of x1 - x0 on X_t:
//   v(x, t) = E[x1 - x0 | X_t = x] = mu + c_t (x - t mu),
//   c_t = Cov(x1 - x0, X_t) / var_t = (t s^2 - (1 - t)) / var_t = var_t' / (2 var_t).
// Since c_t = d/dt log sqrt(var_t), the flow keeps z = (x - t mu)/sqrt(var_t) constant:
//   x_to = t_to mu + sqrt(var_to / var_from) (x_from - t_from mu)      (exact_flow)
// (dz/dt = (v - mu)/sqrt(var) - (x - t mu) var'/(2 var^{3/2}) = 0). The flow-sampler tests'
// analogue of the Gaussian-data eps model: every solver's global error is known.
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <utility>

#include "diffgrad/core/error.hpp"

namespace diffgrad::models {

template <class Scalar> class GaussianFlow {
public:
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  GaussianFlow(vector_type mu, double s) : mu_(std::move(mu)), s_(s) {
    detail::require(s > 0 && std::isfinite(s), "GaussianFlow", "s", "a positive finite std", s);
  }
  const vector_type& mu() const { return mu_; }
  vector_type& mu() { return mu_; }
  double s() const { return s_; }
  void set_s(double s) {
    detail::require(s > 0 && std::isfinite(s), "GaussianFlow::set_s", "s",
                    "a positive finite std", s);
    s_ = s;
  }
  std::int64_t dim() const { return mu_.size(); }
  std::int64_t cond_size() const { return mu_.size(); }  ///< the condition is mu
  std::int64_t param_size() const { return 1; }          ///< the one parameter is s

  /// var_t = (1 - t)^2 + t^2 s^2.
  double variance(double t) const { return (1.0 - t) * (1.0 - t) + t * t * s_ * s_; }
  /// c_t = (t s^2 - (1 - t)) / var_t, the slope of v in x.
  double slope(double t) const { return (t * s_ * s_ - (1.0 - t)) / variance(t); }

  /// out = mu + c_t (x - t mu) for every row of x.
  void velocity(const state_type& x, double t, state_type& out) const {
    check(x, t, "GaussianFlow::velocity");
    const double c = slope(t);
    out = ((Scalar(c) * x).rowwise() + Scalar(1.0 - c * t) * mu_.transpose()).eval();
  }

  /// dx = (dv/dx)^T a = c_t a;  *dcond += (dv/dmu)^T a = (1 - c_t t) sum_b a_b;
  /// *dparams += (dv/ds)^T a = (dc_t/ds) sum_b <a_b, x_b - t mu>, dc_t/ds = 2 t s (1-t)/var_t^2.
  void velocity_vjp(const state_type& x, double t, const state_type& a, state_type& dx,
                    vector_type* dcond, vector_type* dparams) const {
    check(x, t, "GaussianFlow::velocity_vjp");
    if (a.rows() != x.rows() || a.cols() != x.cols())
      detail::throw_argument("GaussianFlow::velocity_vjp", "a",
                             detail::concat("the shape of x (", x.rows(), " x ", x.cols(), ")"),
                             detail::concat(a.rows(), " x ", a.cols()));
    const double c = slope(t);
    if (dcond) *dcond += Scalar(1.0 - c * t) * a.colwise().sum().transpose();
    if (dparams) {
      const double v = variance(t);
      const double dc_ds = 2.0 * t * s_ * (1.0 - t) / (v * v);
      const double inner = (a.template cast<double>().cwiseProduct(
                                (x.rowwise() - Scalar(t) * mu_.transpose()).template cast<double>()))
                               .sum();
      (*dparams)(0) += Scalar(dc_ds * inner);
    }
    dx = Scalar(c) * a;
  }

  /// The exact flow map from time t_from to time t_to (either direction).
  state_type exact_flow(const state_type& x, double t_from, double t_to) const {
    check(x, t_from, "GaussianFlow::exact_flow");
    const double r = std::sqrt(variance(t_to) / variance(t_from));
    return ((Scalar(r) * (x.rowwise() - Scalar(t_from) * mu_.transpose())).rowwise() +
            Scalar(t_to) * mu_.transpose())
        .eval();
  }

private:
  void check(const state_type& x, double t, const char* where) const {
    if (x.cols() != mu_.size())
      detail::throw_argument(where, "x", detail::concat("dimension ", mu_.size()), x.cols());
    if (!(t >= 0.0 && t <= 1.0)) detail::throw_argument(where, "t", "a flow time in [0, 1]", t);
  }
  vector_type mu_;
  double s_;
};

} // namespace diffgrad::models
