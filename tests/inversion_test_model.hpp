#pragma once
// A deterministic, strongly nonlinear test model for the inversion and reversible-gradient
// tests: the exact eps of a Gaussian mixture with K isotropic components,
//   means m_i = Y_i + c   (c: the conditioning, a d-vector shift),
//   weights softmax(theta) (theta: the K parameters), component std s0.
// At a node (alpha, sigma), x | i ~ N(alpha m_i, v I), v = alpha^2 s0^2 + sigma^2, so
//   w_i = softmax_i(theta_i - |x - alpha m_i|^2 / (2 v)),  xhat = sum_i w_i m_i,
//   eps(x) = (sigma / v) (x - alpha xhat).
// VJP with cotangent a (per sample), b = -(sigma alpha / v) a, lbar_i = w_i <b, m_i - xhat>:
//   dx     = (sigma / v) a + (alpha / v) sum_i lbar_i (m_i - xhat)
//   dcond += b - (alpha^2 / v) sum_i lbar_i (m_i - xhat)         (summed over the batch)
//   dtheta_i += lbar_i                                             (summed over the batch)
// (s0 -> 0 gives the Dirac mixture, docs/math.md's exact problem 3; the VJP is then sigma F a.)
// Computed in double whatever the state's Scalar. Checked against finite differences in
// test_reversible_gradient.cpp.
#include <Eigen/Core>
#include <cmath>
#include <cstdint>

#include "diffgrad/schedule/node.hpp"

namespace diffgrad::testing {

template <class Scalar> class MixtureModel {
public:
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  MixtureModel(Eigen::MatrixXd atoms, Eigen::VectorXd cond, Eigen::VectorXd logits, double s0)
      : atoms_(std::move(atoms)), cond_(std::move(cond)), logits_(std::move(logits)), s0_(s0) {}

  /// The fixed problem used by the tests: d = 3, K = 3.
  static MixtureModel standard() {
    Eigen::MatrixXd y(3, 3);
    y << 1.0, -0.5, 0.3, //
        -0.8, 0.6, -0.2, //
        0.1, 0.9, 1.1;
    Eigen::VectorXd c(3), th(3);
    c << 0.15, -0.1, 0.05;
    th << 0.2, -0.3, 0.1;
    return MixtureModel(y, c, th, 0.3);
  }

  std::int64_t cond_size() const { return cond_.size(); }
  std::int64_t param_size() const { return logits_.size(); }
  Eigen::VectorXd& cond() { return cond_; }
  Eigen::VectorXd& logits() { return logits_; }
  const Eigen::VectorXd& cond() const { return cond_; }
  const Eigen::VectorXd& logits() const { return logits_; }

  void eps(const state_type& x, const Node& n, state_type& out) const {
    out.resize(x.rows(), x.cols());
    const double v = n.alpha * n.alpha * s0_ * s0_ + n.sigma * n.sigma;
    for (Eigen::Index r = 0; r < x.rows(); ++r) {
      const Eigen::VectorXd xr = x.row(r).transpose().template cast<double>();
      Eigen::VectorXd w;
      const Eigen::VectorXd xhat = posterior_mean(xr, n.alpha, v, w);
      out.row(r) = ((n.sigma / v) * (xr - n.alpha * xhat)).transpose().template cast<Scalar>();
    }
  }

  void vjp(const state_type& x, const Node& n, const state_type& a, state_type& dx,
           vector_type* dcond, vector_type* dparams) const {
    dx.resize(x.rows(), x.cols());
    const double v = n.alpha * n.alpha * s0_ * s0_ + n.sigma * n.sigma;
    const auto K = atoms_.rows();
    for (Eigen::Index r = 0; r < x.rows(); ++r) {
      const Eigen::VectorXd xr = x.row(r).transpose().template cast<double>();
      const Eigen::VectorXd ar = a.row(r).transpose().template cast<double>();
      Eigen::VectorXd w;
      const Eigen::VectorXd xhat = posterior_mean(xr, n.alpha, v, w);
      const Eigen::VectorXd b = -(n.sigma * n.alpha / v) * ar;
      Eigen::VectorXd acc = Eigen::VectorXd::Zero(xr.size()); // sum_i lbar_i (m_i - xhat)
      for (Eigen::Index i = 0; i < K; ++i) {
        const Eigen::VectorXd dm = mean(i) - xhat;
        const double lbar = w(i) * b.dot(dm);
        acc += lbar * dm;
        if (dparams) (*dparams)(i) += Scalar(lbar);
      }
      dx.row(r) = ((n.sigma / v) * ar + (n.alpha / v) * acc).transpose().template cast<Scalar>();
      if (dcond) *dcond += (b - (n.alpha * n.alpha / v) * acc).template cast<Scalar>();
    }
  }

private:
  Eigen::VectorXd mean(Eigen::Index i) const { return atoms_.row(i).transpose() + cond_; }
  /// xhat and the posterior weights w (log-sum-exp stabilised).
  Eigen::VectorXd posterior_mean(const Eigen::VectorXd& x, double alpha, double v,
                                 Eigen::VectorXd& w) const {
    const auto K = atoms_.rows();
    w.resize(K);
    for (Eigen::Index i = 0; i < K; ++i)
      w(i) = logits_(i) - (x - alpha * mean(i)).squaredNorm() / (2.0 * v);
    w = (w.array() - w.maxCoeff()).exp().matrix();
    w /= w.sum();
    Eigen::VectorXd xhat = Eigen::VectorXd::Zero(x.size());
    for (Eigen::Index i = 0; i < K; ++i) xhat += w(i) * mean(i);
    return xhat;
  }

  Eigen::MatrixXd atoms_;
  Eigen::VectorXd cond_, logits_;
  double s0_;
};

} // namespace diffgrad::testing
