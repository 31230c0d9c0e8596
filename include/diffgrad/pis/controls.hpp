#pragma once
// Controls of the Path Integral Sampler (docs/pis.md) and the PIS configuration.
//
// The controlled SDE, in the parameterisation of the official PIS code:
//   dx = g u(t, x) dt + g dW,  x_0 = 0,  t in [0, T]      (defaults g = sqrt(0.2), T = 5)
// which is the unit-diffusion system of the paper, dx = u dt + dW on [0, g^2 T], under the
// time change tau = g^2 t: u_official(t, x) = g u_unit(g^2 t, x). g = 1 gives the paper's.
//
// A control maps a batch of states (B x d, double) and the time t to u (B x d):
//   control.control(x, t, u)
//   control.control_vjp(x, t, a, dx, dparams)   dx = (du/dx)^T a; *dparams += (du/dtheta)^T a
//   control.param_size(), control.params(), control.set_params(theta)   (trainable ones)
// Built in: ZeroControl, AffineControl u = (a0 + a1 t) x + b0 + b1 t (state dependent, for
// exact-gradient tests), the closed-form optimal controls of Gaussian and Gaussian-mixture
// targets, PisNN (u = NN1(t, x)) and PisGrad (u = NN1(t, x) + NN2(t) * grad log mu_hat(x)).
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>

#include "diffgrad/core/error.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/pis/targets.hpp"

namespace diffgrad::pis {

struct PisConfig {
  std::int64_t dim = 2;
  double horizon = 5.0;               ///< T
  double diffusion = 0.4472135954999579; ///< g = sqrt(0.2) (the official code's)
  int num_steps = 100;                ///< N: Euler steps of size T / N
  /// 0: none (a diverging control fails loudly). > 0: u is clamped elementwise to
  /// [-control_clip, control_clip] (zero derivative where clamped) -- an explicit option,
  /// as the official code's clipping; documented in docs/pis.md.
  double control_clip = 0.0;

  /// Variance of the uncontrolled chain's terminal law N(0, g^2 T I) (the prior mu^0).
  double prior_variance() const { return diffusion * diffusion * horizon; }
  void validate(const char* where) const {
    diffgrad::detail::require(dim >= 1, where, "config.dim", ">= 1", static_cast<double>(dim));
    diffgrad::detail::require(horizon > 0.0 && std::isfinite(horizon), where, "config.horizon",
                              "a positive finite horizon T", horizon);
    diffgrad::detail::require(diffusion > 0.0 && std::isfinite(diffusion), where,
                              "config.diffusion", "a positive finite g", diffusion);
    diffgrad::detail::require(num_steps >= 1, where, "config.num_steps", ">= 1", num_steps);
    diffgrad::detail::require(control_clip >= 0.0, where, "config.control_clip",
                              ">= 0 (0: no clipping)", control_clip);
  }
};

template <class C>
concept Control = requires(C& c, const Matrix& x, double t, Matrix& u) { c.control(x, t, u); };

template <class C>
concept DifferentiableControl =
    Control<C> && requires(C& c, const Matrix& x, double t, const Matrix& a, Matrix& dx,
                           Eigen::VectorXd* dp, const Eigen::VectorXd& theta) {
      c.control_vjp(x, t, a, dx, dp);
      { c.param_size() } -> std::convertible_to<std::int64_t>;
      c.set_params(theta);
      { c.params() } -> std::convertible_to<Eigen::VectorXd>;
    };

/// u = 0: the uncontrolled chain (its terminal law is the prior N(0, g^2 T I)).
struct ZeroControl {
  void control(const Matrix& x, double, Matrix& u) const { u = Matrix::Zero(x.rows(), x.cols()); }
  void control_vjp(const Matrix& x, double, const Matrix&, Matrix& dx, Eigen::VectorXd*) const {
    dx = Matrix::Zero(x.rows(), x.cols());
  }
  std::int64_t param_size() const { return 0; }
  Eigen::VectorXd params() const { return {}; }
  void set_params(const Eigen::VectorXd&) {}
};

/// u = (a0 + a1 t) x + b0 + b1 t; theta = [a0, a1, b0 (d), b1 (d)].
class AffineControl {
public:
  explicit AffineControl(std::int64_t dim) : d_(dim), theta_(Eigen::VectorXd::Zero(2 + 2 * dim)) {
    diffgrad::detail::require(dim >= 1, "AffineControl", "dim", ">= 1", static_cast<double>(dim));
  }
  std::int64_t param_size() const { return theta_.size(); }
  Eigen::VectorXd params() const { return theta_; }
  void set_params(const Eigen::VectorXd& theta) {
    diffgrad::detail::require(theta.size() == theta_.size(), "AffineControl::set_params", "theta",
                              diffgrad::detail::concat(theta_.size(), " values"),
                              static_cast<double>(theta.size()));
    theta_ = theta;
  }
  void control(const Matrix& x, double t, Matrix& u) const {
    u = (theta_(0) + theta_(1) * t) * x;
    u.rowwise() += (theta_.segment(2, d_) + t * theta_.segment(2 + d_, d_)).transpose();
  }
  void control_vjp(const Matrix& x, double t, const Matrix& a, Matrix& dx,
                   Eigen::VectorXd* dp) const {
    dx = (theta_(0) + theta_(1) * t) * a;
    if (!dp) return;
    const double ax = (a.array() * x.array()).sum();
    (*dp)(0) += ax;
    (*dp)(1) += t * ax;
    const Eigen::VectorXd col = a.colwise().sum().transpose();
    dp->segment(2, d_) += col;
    dp->segment(2 + d_, d_) += t * col;
  }

private:
  std::int64_t d_;
  Eigen::VectorXd theta_;
};

/// The optimal control of the Gaussian target Z N(m, s^2 I) (closed form, linear in x): in
/// the unit system (horizon T_u = g^2 T, time tau = g^2 t), with kappa = 1 - s^2 / T_u,
///   u_unit(tau, x) = (m - kappa x) / (T_u - kappa tau),   u(t, x) = g u_unit(g^2 t, x).
class GaussianOptimalControl {
public:
  GaussianOptimalControl(const PisConfig& config, const GaussianTarget& target)
      : g_(config.diffusion), tu_(config.prior_variance()), mean_(target.mean()),
        kappa_(1.0 - target.stddev() * target.stddev() / config.prior_variance()) {}
  double kappa() const { return kappa_; }
  void control(const Matrix& x, double t, Matrix& u) const {
    const double den = tu_ - kappa_ * g_ * g_ * t;
    u = (g_ / den) * ((-kappa_ * x).rowwise() + mean_.transpose());
  }
  void control_vjp(const Matrix&, double t, const Matrix& a, Matrix& dx, Eigen::VectorXd*) const {
    dx = (-g_ * kappa_ / (tu_ - kappa_ * g_ * g_ * t)) * a;
  }
  std::int64_t param_size() const { return 0; }
  Eigen::VectorXd params() const { return {}; }
  void set_params(const Eigen::VectorXd&) {}

private:
  double g_, tu_;
  Eigen::VectorXd mean_;
  double kappa_;
};

/// The optimal control of a Gaussian mixture sum_k w_k N(m_k, s_k^2 I) (times Z), unit
/// system as above: u_unit = sum_k r_k(tau, x) (m_k - kappa_k x) / (T_u - kappa_k tau),
/// r_k proportional to w_k N(x; (tau / T_u) m_k, v_k I), v_k = (tau/T_u)^2 s_k^2 +
/// tau (T_u - tau) / T_u, kappa_k = 1 - s_k^2 / T_u (at tau = 0 its limit, r_k proportional
/// to w_k exp(x.m_k / T_u + s_k^2 |x|^2 / (2 T_u^2))). The "ground truth" control of PIS's
/// mixture experiment. Not differentiable (no VJP): for sampling and Z estimates.
class MixtureOptimalControl {
public:
  MixtureOptimalControl(const PisConfig& config, const GaussianMixtureTarget& target)
      : g_(config.diffusion), tu_(config.prior_variance()), target_(target) {}
  void control(const Matrix& x, double t, Matrix& u) const {
    const double tau = g_ * g_ * t, rho = tau / tu_;
    const Eigen::Index k_count = target_.components(), d = x.cols();
    Matrix logr(x.rows(), k_count);
    for (Eigen::Index k = 0; k < k_count; ++k) {
      const double s2 = target_.stddev(k) * target_.stddev(k);
      if (tau == 0.0) {
        // The limit tau -> 0 (v_k -> 0 for every k): phi_0's component k is
        // int e^{x.y/Tu} N(y; m_k, s_k^2) dy, so r_k ~ w_k exp(x.m_k/Tu + s_k^2 |x|^2/(2 Tu^2)).
        logr.col(k) = (x * target_.means().row(k).transpose() / tu_).array() +
                      (std::log(target_.weight(k)) +
                       s2 * x.rowwise().squaredNorm().array() / (2.0 * tu_ * tu_));
        continue;
      }
      const double v = rho * rho * s2 + tau * (tu_ - tau) / tu_;
      logr.col(k) = (std::log(target_.weight(k)) - 0.5 * static_cast<double>(d) * std::log(v)) -
                    ((x.rowwise() - rho * target_.means().row(k)).rowwise().squaredNorm() /
                     (2.0 * v))
                        .array();
    }
    u = Matrix::Zero(x.rows(), d);
    for (Eigen::Index r = 0; r < x.rows(); ++r) {
      const double mx = logr.row(r).maxCoeff();
      const Eigen::RowVectorXd w = (logr.row(r).array() - mx).exp().matrix();
      const double total = w.sum();
      for (Eigen::Index k = 0; k < k_count; ++k) {
        const double kappa = 1.0 - target_.stddev(k) * target_.stddev(k) / tu_;
        u.row(r) += (w(k) / total) * (target_.means().row(k) - kappa * x.row(r)) /
                    (tu_ - kappa * tau);
      }
    }
    u *= g_;
  }

private:
  double g_, tu_;
  GaussianMixtureTarget target_;
};

/// Options of the PIS networks (docs/pis.md: the official code's are 2 hidden layers of 64
/// with the 0.1..100 linear time embedding).
struct PisNetOptions {
  std::vector<int> hidden{64, 64};
  int time_frequencies = 32;
  models::Activation activation = models::Activation::silu;
  models::TimeEmbedding time_embedding = models::TimeEmbedding::linear;
  double frequency_min = 0.1, frequency_max = 100.0;
  /// tau = time_scale * t is what the embedding sees (t in [0, T]).
  double time_scale = 1.0;
  /// clip of grad log mu_hat in PIS-Grad (the official config's 1e4); 0: none.
  double grad_clip = 1e4;
  /// PIS-Grad's VJP in x: true (default) treats grad log mu_hat(x) as a constant (a
  /// stop-gradient), as the official code, whose score is computed on a detached copy of x;
  /// the loss gradient w.r.t. the parameters is then that code's, not the exact one. false:
  /// the exact derivative through the target's Hessian-vector product (when it has one).
  bool detach_target_gradient = true;
};

namespace detail {
inline models::MlpConfig mlp_config(int in_dim, int out_dim, const PisNetOptions& o) {
  models::MlpConfig c;
  c.dim = in_dim;
  c.output_dim = out_dim;
  c.hidden = o.hidden;
  c.time_frequencies = o.time_frequencies;
  c.time_scale = o.time_scale;
  c.activation = o.activation;
  c.time_embedding = o.time_embedding;
  c.frequency_min = o.frequency_min;
  c.frequency_max = o.frequency_max;
  return c;
}
/// Sets the last layer's weights to zero and its bias to `bias` (the control starts flat).
inline void zero_last_layer(models::Mlp<double>& net, double bias) {
  const std::size_t last = net.widths().size() - 2;
  Eigen::VectorXd p = net.params();
  const Eigen::Index w0 = net.weight_offset(last), b0 = net.bias_offset(last);
  p.segment(w0, b0 - w0).setZero();
  p.segment(b0, net.widths().back()).setConstant(bias);
  net.set_params(p);
}
} // namespace detail

/// PIS-NN: u = NN1(t, x), an Mlp of x and the time embedding; its last layer starts at zero
/// (u = 0: the prior), as the official code.
class PisNN {
public:
  PisNN(std::int64_t dim, const PisNetOptions& options = {}, std::uint64_t seed = 0)
      : nn1_(detail::mlp_config(static_cast<int>(dim), 0, options), seed) {
    detail::zero_last_layer(nn1_, 0.0);
  }
  std::int64_t param_size() const { return nn1_.param_size(); }
  Eigen::VectorXd params() const { return nn1_.params(); }
  void set_params(const Eigen::VectorXd& theta) { nn1_.set_params(theta); }
  const models::Mlp<double>& nn1() const { return nn1_; }
  void control(const Matrix& x, double t, Matrix& u) const { nn1_.drift(x, t, u); }
  void control_vjp(const Matrix& x, double t, const Matrix& a, Matrix& dx,
                   Eigen::VectorXd* dp) const {
    nn1_.drift_vjp(x, t, a, dx, dp);
  }

private:
  models::Mlp<double> nn1_;
};

/// PIS-Grad: u = NN1(t, x) + NN2(t) * clip(grad log mu_hat(x)) (elementwise; NN2 is an Mlp of
/// t alone with d outputs whose last layer starts at weight 0, bias 0.01, as the official
/// code). theta = [theta_1 | theta_2]. The VJP in x treats grad log mu_hat as constant in x
/// (a stop-gradient, as the official code's detached score: PisNetOptions::
/// detach_target_gradient, the default) or, with that option false and a target that has a
/// Hessian-vector product, is exact -- uses_exact_x_vjp() says which.
template <Target T> class PisGrad {
public:
  PisGrad(const T& target, const PisNetOptions& options = {}, std::uint64_t seed = 0)
      : target_(target), clip_(options.grad_clip), detach_(options.detach_target_gradient),
        nn1_(detail::mlp_config(static_cast<int>(target.dim()), 0, options), seed),
        nn2_(detail::mlp_config(0, static_cast<int>(target.dim()), options), seed + 1) {
    detail::zero_last_layer(nn1_, 0.0);
    detail::zero_last_layer(nn2_, 0.01);
  }
  /// Whether the target can give the exact x-derivative (a Hessian-vector product).
  static constexpr bool has_exact_x_vjp() { return TargetWithHessian<T>; }
  /// Whether this control's VJP uses it (PisNetOptions::detach_target_gradient == false).
  bool uses_exact_x_vjp() const { return TargetWithHessian<T> && !detach_; }
  std::int64_t param_size() const { return nn1_.param_size() + nn2_.param_size(); }
  Eigen::VectorXd params() const {
    Eigen::VectorXd p(param_size());
    p << nn1_.params(), nn2_.params();
    return p;
  }
  void set_params(const Eigen::VectorXd& theta) {
    diffgrad::detail::require(theta.size() == param_size(), "PisGrad::set_params", "theta",
                              diffgrad::detail::concat(param_size(), " values"),
                              static_cast<double>(theta.size()));
    nn1_.set_params(theta.head(nn1_.param_size()));
    nn2_.set_params(theta.tail(nn2_.param_size()));
  }
  void control(const Matrix& x, double t, Matrix& u) const {
    nn1_.drift(x, t, u);
    scale(t);
    clipped_grad(x);
    u.array() += grad_.array().rowwise() * scale_.row(0).array();
  }
  void control_vjp(const Matrix& x, double t, const Matrix& a, Matrix& dx,
                   Eigen::VectorXd* dp) const {
    Eigen::VectorXd* dp1 = nullptr;
    if (dp) {
      dp1_.setZero(nn1_.param_size());
      dp1 = &dp1_;
    }
    nn1_.drift_vjp(x, t, a, dx, dp1);
    scale(t);
    clipped_grad(x);
    if (dp) {
      dp->head(nn1_.param_size()) += dp1_;
      const Matrix cot = (a.array() * grad_.array()).colwise().sum().matrix();
      dp2_.setZero(nn2_.param_size());
      nn2_.drift_vjp(empty_, t, cot, dx2_, &dp2_);
      dp->tail(nn2_.param_size()) += dp2_;
    }
    if constexpr (TargetWithHessian<T>) {
      if (detach_) return;
      // d/dx [s * clip(g(x))]^T a = H (mask * s * a), H symmetric.
      v_ = (a.array().rowwise() * scale_.row(0).array() * mask_.array()).matrix();
      target_.hvp_log_density(x, v_, hv_);
      dx += hv_;
    }
  }
  const models::Mlp<double>& nn1() const { return nn1_; }
  const models::Mlp<double>& nn2() const { return nn2_; }

private:
  void scale(double t) const {
    empty_.resize(1, 0);
    nn2_.drift(empty_, t, scale_);
  }
  void clipped_grad(const Matrix& x) const {
    // The SDE layer's adjoint evaluates the control and then its VJP at the same state: the
    // target's gradient (the costly part for mixtures) is reused when x is unchanged.
    if (have_grad_ && x.rows() == grad_x_.rows() && x.cols() == grad_x_.cols() && x == grad_x_)
      return;
    grad_x_ = x;
    have_grad_ = true;
    target_.grad_log_density(x, grad_);
    mask_ = Matrix::Ones(grad_.rows(), grad_.cols());
    if (clip_ > 0.0)
      for (Eigen::Index k = 0; k < grad_.size(); ++k)
        if (std::abs(grad_.data()[k]) > clip_) {
          grad_.data()[k] = std::clamp(grad_.data()[k], -clip_, clip_);
          mask_.data()[k] = 0.0;
        }
  }

  const T& target_;
  double clip_;
  bool detach_;
  models::Mlp<double> nn1_, nn2_;
  mutable Matrix empty_, scale_, grad_, mask_, v_, hv_, dx2_, grad_x_;
  mutable bool have_grad_ = false;
  mutable Eigen::VectorXd dp1_, dp2_;
};

} // namespace diffgrad::pis
