#pragma once
// Exact eps of Gaussian data N(mu, s^2 I) (docs/math.md, exact test problem 1):
//   v_t = alpha_t^2 s^2 + sigma_t^2,   eps(x, t) = sigma_t (x - alpha_t mu) / v_t.
// The PF-ODE flow is known in closed form (exact_flow), so every solver's global error and
// every gradient can be checked against it. mu is the conditioning; s is the one parameter.
#include <Eigen/Core>
#include <cmath>

#include "diffgrad/core/error.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::models {

template <class Scalar> class GaussianData {
public:
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  GaussianData(vector_type mu, double s) : mu_(std::move(mu)), s_(s) {
    detail::require(s > 0 && std::isfinite(s), "GaussianData", "s", "a positive finite std", s);
  }
  const vector_type& mu() const { return mu_; }
  vector_type& mu() { return mu_; }
  double s() const { return s_; }
  void set_s(double s) { s_ = s; }
  std::int64_t dim() const { return mu_.size(); }
  std::int64_t cond_size() const { return mu_.size(); }
  std::int64_t param_size() const { return 1; }

  double variance(const Node& n) const { return n.alpha * n.alpha * s_ * s_ + n.sigma * n.sigma; }

  void eps(const state_type& x, const Node& n, state_type& out) const {
    check_dim(x);
    const double v = variance(n);
    out = (Scalar(n.sigma / v) * (x.rowwise() - Scalar(n.alpha) * mu_.transpose())).eval();
  }

  /// dx = (d eps/dx)^T a; *dcond += (d eps/dmu)^T a summed over the batch; *dparams += d/ds.
  void vjp(const state_type& x, const Node& n, const state_type& a, state_type& dx,
           vector_type* dcond, vector_type* dparams) const {
    check_dim(x);
    const double v = variance(n);
    if (dcond) *dcond += Scalar(-n.sigma * n.alpha / v) * a.colwise().sum().transpose();
    if (dparams) {
      const double dv_ds = 2.0 * n.alpha * n.alpha * s_;
      const double inner =
          (a.cwiseProduct(x.rowwise() - Scalar(n.alpha) * mu_.transpose())).template cast<double>().sum();
      (*dparams)(0) += Scalar(-n.sigma * dv_ds / (v * v) * inner);
    }
    dx = Scalar(n.sigma / v) * a;
  }

  /// Exact PF-ODE map from node `from` to node `to`:
  /// x_to = alpha_to mu + sqrt(v_to / v_from) (x_from - alpha_from mu).
  state_type exact_flow(const state_type& x, const Node& from, const Node& to) const {
    const double r = std::sqrt(variance(to) / variance(from));
    return ((Scalar(r) * (x.rowwise() - Scalar(from.alpha) * mu_.transpose())).rowwise() +
            Scalar(to.alpha) * mu_.transpose())
        .eval();
  }

private:
  void check_dim(const state_type& x) const {
    if (x.cols() != mu_.size())
      detail::throw_argument("GaussianData::eps", "x", detail::concat("dimension ", mu_.size()),
                             x.cols());
  }
  vector_type mu_;
  double s_;
};

} // namespace diffgrad::models
