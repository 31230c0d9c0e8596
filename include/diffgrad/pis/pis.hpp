#pragma once
// The Path Integral Sampler (Zhang & Chen, "Path Integral Sampler: a stochastic control
// approach for sampling"; docs/pis.md) on the library's SDE stepping layer.
//
// Controlled SDE from a point mass (official parameterisation, pis/controls.hpp):
//   x_{k+1} = x_k + g u_k h + g sqrt(h) xi_k,   x_0 = 0,  h = T / N
// run by sde::SdeScheme with the two running-cost columns, so every sample carries
//   K = sum_k |u_k|^2 h / 2,   M = sum_k u_k . xi_k sqrt(h),   Psi(x_N) = log mu^0(x_N) - log mu_hat(x_N)
// (mu^0 = N(0, g^2 T I), the uncontrolled chain's exact terminal law) and the log-weight
//   log w = -S = -(K + M + Psi(x_N)).
// e^{-S} = mu_hat(x_N) p^0(x_{1:N}) / (mu^0(x_N) q^u(x_{1:N})) exactly for the Euler chain, so
// E[e^{-S}] = Z for ANY control and ANY N: Z_hat = mean(w) is unbiased, E[-S] <= log Z is a
// lower bound, and (sum w)^2 / (n sum w^2) is the normalised effective sample size.
// The log-weights are accumulated in double (the state is double).
//
// Training loss (the official code's, without its division by d): mean over the batch of
// K + Psi(x_N); its exact discrete gradient w.r.t. the control's parameters (and x_0) comes
// from the library's discrete adjoint through sde::sde_gradient (noise regenerated from
// Philox, never stored; any MemoryMode). Training uses the library's Adam.
//
//   PathIntegralSampler pis({.dim = 2});                 // g = sqrt(0.2), T = 5, N = 100
//   auto target = GaussianMixtureTarget::nine_modes();
//   PisGrad control(target);
//   pis.train(control, target, {.iterations = 1500, .batch = 300, .seed = 1});
//   PisSamples s = pis.sample(control, target, 6000, /*seed=*/7);
//   LogZEstimate est = estimate_log_z(s.log_weights);   // lower bound, IS, ESS
#include <Eigen/Core>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numbers>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/concepts/observer.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/gradients/optimizer.hpp"
#include "diffgrad/pis/controls.hpp"
#include "diffgrad/pis/targets.hpp"
#include "diffgrad/sde/sde.hpp"

namespace diffgrad::pis {

using PisBackend = EigenBackend<double>;

/// The SDE layer's drift f = g clip(u) of a control (sde::DifferentiableDriftModel).
template <class C> struct ControlDrift {
  ControlDrift(C& control_, double g_, double clip_) : control(control_), g(g_), clip(clip_) {}
  C& control;
  double g = 1.0;
  double clip = 0.0; ///< 0: none
  mutable Matrix u_, a_;

  std::int64_t param_size() const {
    if constexpr (requires { control.param_size(); })
      return static_cast<std::int64_t>(control.param_size());
    else
      return 0;
  }
  void drift(const Matrix& x, double t, Matrix& out) const {
    control.control(x, t, out);
    if (clip > 0.0) out = out.cwiseMax(-clip).cwiseMin(clip);
    out *= g;
  }
  void drift_vjp(const Matrix& x, double t, const Matrix& a, Matrix& dx,
                 Eigen::VectorXd* dp) const {
    a_ = g * a;
    if (clip > 0.0) {
      control.control(x, t, u_);
      a_ = (u_.array().abs() > clip).select(0.0, a_);
    }
    control.control_vjp(x, t, a_, dx, dp);
  }
};

/// Samples of a PIS run and their per-sample terms (all double).
struct PisSamples {
  Matrix x;                      ///< x_N (n x d)
  Eigen::VectorXd kinetic;       ///< K = sum_k |u_k|^2 h / 2
  Eigen::VectorXd noise_term;    ///< M = sum_k u_k . xi_k sqrt(h)
  Eigen::VectorXd terminal_cost; ///< Psi(x_N)
  Eigen::VectorXd log_weights;   ///< -S = -(K + M + Psi)
};

/// log Z estimates from n log-weights (-S).
struct LogZEstimate {
  double lower_bound = 0.0;         ///< mean(-S) <= log Z
  double importance_weighted = 0.0; ///< log mean(e^{-S}) (max-shifted logsumexp)
  double ess = 0.0;                 ///< (sum w)^2 / (n sum w^2) in (0, 1]
  std::int64_t samples = 0;
};

inline LogZEstimate estimate_log_z(const Eigen::VectorXd& log_weights) {
  const auto n = log_weights.size();
  diffgrad::detail::require(n >= 1, "estimate_log_z", "log_weights", "at least one weight",
                            static_cast<double>(n));
  diffgrad::detail::require(log_weights.allFinite(), "estimate_log_z", "log_weights",
                            "finite log-weights", 0.0);
  LogZEstimate e;
  e.samples = n;
  e.lower_bound = log_weights.mean();
  const double mx = log_weights.maxCoeff();
  const Eigen::ArrayXd w = (log_weights.array() - mx).exp();
  const double sw = w.sum(), sw2 = w.square().sum();
  e.importance_weighted = mx + std::log(sw) - std::log(static_cast<double>(n));
  e.ess = sw * sw / (static_cast<double>(n) * sw2);
  return e;
}

struct PisTrainOptions {
  int iterations = 1500;
  int batch = 300;
  double learning_rate = 5e-3;
  double weight_decay = 1e-7; ///< L2 term added to the gradient (torch Adam's weight_decay)
  std::uint64_t seed = 0;     ///< iteration k draws its noise with seed noise_seed(seed, k)
  MemoryMode memory = MemoryMode::store_all();
};

struct PisTrainResult {
  std::vector<double> losses; ///< the loss of every iteration done
  int iterations_done = 0;
  bool stopped = false; ///< the progress callback asked to stop
  double seconds = 0.0;
};

/// (iteration done, iterations, its loss) -> proceed / stop.
using PisProgress = std::function<ObserverAction(int, int, double)>;

/// Loss value and exact gradients of one batch.
struct PisLossGradient {
  double loss = 0.0;          ///< mean(K + Psi(x_N))
  Eigen::VectorXd grad_params;
  Matrix grad_x0;             ///< dL/dx_0 (B x d)
  GradientCost cost;
};

class PathIntegralSampler {
public:
  explicit PathIntegralSampler(PisConfig config)
      : config_((config.validate("PathIntegralSampler"), config)),
        scheme_(backend_, sde::uniform_times(config.num_steps, 0.0, config.horizon),
                config.diffusion, config.dim, {.running_costs = true}) {}

  const PisConfig& config() const { return config_; }
  const sde::SdeScheme<PisBackend>& scheme() const { return scheme_; }

  /// The noise seed of training iteration k (distinct streams, reproducible).
  static std::uint64_t noise_seed(std::uint64_t seed, int k) {
    return seed * 0x9E3779B97F4A7C15ull + 0xD1B54A32D192ED03ull * static_cast<std::uint64_t>(k + 1);
  }

  /// Psi(x) = log N(x; 0, g^2 T I) - log mu_hat(x) and, when grad != null, its gradient.
  template <Target T>
  void terminal_cost(const T& target, const Matrix& x, Eigen::VectorXd& psi,
                     Matrix* grad = nullptr) const {
    check_target(target, "PathIntegralSampler::terminal_cost");
    const double v0 = config_.prior_variance(), d = static_cast<double>(config_.dim);
    target.log_density(x, psi);
    psi = -(x.rowwise().squaredNorm() / (2.0 * v0)).array() -
          0.5 * d * std::log(2.0 * std::numbers::pi * v0) - psi.array();
    if (grad) {
      target.grad_log_density(x, *grad);
      *grad = (-x / v0 - *grad).eval();
    }
  }

  /// n samples of the controlled chain from x_0 = 0 with their weights. Noise: Philox keyed by
  /// `seed`, rows numbered from row_offset (a run split into shards gives the same samples).
  template <Control C, Target T>
  PisSamples sample(C& control, const T& target, std::int64_t n, std::uint64_t seed,
                    std::uint64_t row_offset = 0) const {
    check_target(target, "PathIntegralSampler::sample");
    diffgrad::detail::require(n >= 1, "PathIntegralSampler::sample", "n", ">= 1 samples",
                              static_cast<double>(n));
    ControlDrift<C> drift(control, config_.diffusion, config_.control_clip);
    Matrix x = Matrix::Zero(n, scheme_.width());
    sde::simulate(scheme_, backend_, drift, x, {.seed = seed, .row_offset = row_offset});
    return finish(target, x);
  }

  /// The training loss of one batch started at x0 (B x d; PIS uses zeros) and its exact
  /// gradient w.r.t. the control's parameters and x0 (discrete adjoint, `memory`).
  template <DifferentiableControl C, Target T>
  PisLossGradient loss_gradient(C& control, const T& target, const Matrix& x0, std::uint64_t seed,
                                MemoryMode memory = MemoryMode::store_all()) const {
    check_target(target, "PathIntegralSampler::loss_gradient");
    diffgrad::detail::require(x0.cols() == config_.dim && x0.rows() >= 1,
                              "PathIntegralSampler::loss_gradient", "x0",
                              diffgrad::detail::concat("a B x ", config_.dim, " batch"),
                              static_cast<double>(x0.cols()));
    ControlDrift<C> drift(control, config_.diffusion, config_.control_clip);
    const Matrix start = sde::augment(scheme_, x0);
    GradientOptions opts{.memory = memory, .wrt_params = true, .seed = seed};
    auto ws = sde::make_sde_gradient_workspace(scheme_, backend_, drift, start, opts);
    return run_loss(drift, target, start, opts, ws);
  }

  /// Trains the control's parameters with Adam on fresh noise every iteration. Seeded and
  /// reproducible; `progress` is called after every iteration and may stop the training.
  template <DifferentiableControl C, Target T>
  PisTrainResult train(C& control, const T& target, const PisTrainOptions& options,
                       const PisProgress& progress = {}) const {
    const char* where = "PathIntegralSampler::train";
    check_target(target, where);
    diffgrad::detail::require(options.iterations >= 0, where, "options.iterations", ">= 0",
                              options.iterations);
    diffgrad::detail::require(options.batch >= 1, where, "options.batch", ">= 1",
                              options.batch);
    diffgrad::detail::require(options.weight_decay >= 0.0, where, "options.weight_decay", ">= 0",
                              options.weight_decay);
    ControlDrift<C> drift(control, config_.diffusion, config_.control_clip);
    const Matrix start = Matrix::Zero(options.batch, scheme_.width());
    GradientOptions opts{.memory = options.memory, .wrt_params = true};
    auto ws = sde::make_sde_gradient_workspace(scheme_, backend_, drift, start, opts);
    Adam adam({.learning_rate = options.learning_rate});
    Eigen::VectorXd theta = control.params();
    PisTrainResult result;
    const auto t0 = std::chrono::steady_clock::now();
    for (int k = 0; k < options.iterations; ++k) {
      opts.seed = noise_seed(options.seed, k);
      const PisLossGradient r = run_loss(drift, target, start, opts, ws);
      if (!std::isfinite(r.loss) || !r.grad_params.allFinite())
        throw numerical_error(diffgrad::detail::concat(
            where, ": the loss or its gradient is not finite at iteration ", k, " (loss ", r.loss,
            ")"));
      Eigen::VectorXd grad = r.grad_params;
      if (options.weight_decay > 0.0) grad += options.weight_decay * theta;
      adam.step(theta, grad);
      control.set_params(theta);
      result.losses.push_back(r.loss);
      result.iterations_done = k + 1;
      if (progress && progress(k + 1, options.iterations, r.loss) == ObserverAction::stop) {
        result.stopped = true;
        break;
      }
    }
    result.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return result;
  }

private:
  template <Target T> void check_target(const T& target, const char* where) const {
    if (target.dim() != config_.dim)
      diffgrad::detail::throw_argument(where, "target",
                                       diffgrad::detail::concat("dimension ", config_.dim,
                                                                " (config.dim)"),
                                       target.dim());
  }

  template <Target T> PisSamples finish(const T& target, const Matrix& x) const {
    PisSamples s;
    const auto d = config_.dim;
    s.x = x.leftCols(d);
    s.kinetic = x.col(scheme_.kinetic_column());
    s.noise_term = x.col(scheme_.noise_column());
    terminal_cost(target, s.x, s.terminal_cost);
    s.log_weights = -(s.kinetic + s.noise_term + s.terminal_cost);
    return s;
  }

  template <class C, Target T>
  PisLossGradient run_loss(ControlDrift<C>& drift, const T& target, const Matrix& start,
                           const GradientOptions& opts, GradientWorkspace<PisBackend>& ws) const {
    const auto d = config_.dim;
    const double inv_b = 1.0 / static_cast<double>(start.rows());
    const auto loss = [&](const PisBackend&, const Matrix& xn, Matrix& grad) {
      xn_ = xn.leftCols(d);
      terminal_cost(target, xn_, psi_, &gpsi_);
      grad.setZero();
      grad.leftCols(d) = inv_b * gpsi_;
      grad.col(scheme_.kinetic_column()).setConstant(inv_b);
      return inv_b * (xn.col(scheme_.kinetic_column()).sum() + psi_.sum());
    };
    const auto& r = sde::sde_gradient(scheme_, backend_, drift, start, loss, opts, ws);
    PisLossGradient out;
    out.loss = r.loss;
    out.grad_params = r.grad_params;
    out.grad_x0 = r.grad_x.leftCols(d);
    out.cost = r.cost;
    return out;
  }

  PisBackend backend_{};
  PisConfig config_;
  sde::SdeScheme<PisBackend> scheme_;
  mutable Matrix xn_, gpsi_;
  mutable Eigen::VectorXd psi_;
};

} // namespace diffgrad::pis
