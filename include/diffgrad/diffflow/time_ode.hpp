#pragma once
// ODE integration in t (not in log-SNR) for a general drift v(x, t), and the log-likelihood by
// the instantaneous change of variables
//   log p_{t_0}(x_{t_0}) = log p_{t_K}(x_{t_K}) + int_{t_0}^{t_K} tr(dv/dx)(x_t, t) dt,
// integrating the state and the divergence together with classical RK4 on a given time grid
// t_0 < ... < t_K (data end first). fisher/likelihood.hpp does the same in log-SNR for
// drifts of the alpha/sigma form f x + g^2/(2 sigma) eps; a drift such as DiffFlow's
// probability flow f_theta - g^2 s_theta / 2 has no such form, hence this integrator.
//
// A field is any class with
//   void velocity(const State& x, double t, State& out) const;
//   void velocity_vjp(const State& x, double t, const State& a, State& dx) const;  // (dv/dx)^T a
// and a trace provider is called as trace(field, x, t, out) with out the B traces of dv/dx:
//   JacobianTrace    sum_j e_j^T (dv/dx)^T e_j: d VJPs, exact (small d)
//   HutchinsonTrace  z^T (dv/dx)^T z with Philox probes: k VJPs, unbiased
// The grid is the caller's: use refine() (time_grid.hpp) to put several RK4 steps in each
// interval of a chain's grid, or a geometric grid where the field is stiff near t_0.
#include <Eigen/Core>
#include <array>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <utility>
#include <vector>

#include "diffgrad/core/error.hpp"
#include "diffgrad/detail/philox.hpp"

namespace diffgrad::diffflow {

namespace detail {
inline void check_times(const std::vector<double>& t, const char* where) {
  if (t.size() < 2) diffgrad::detail::throw_argument(where, "times", "at least 2 times", t.size());
  const bool up = t[1] > t[0];
  for (std::size_t i = 0; i + 1 < t.size(); ++i) {
    diffgrad::detail::require_finite(t[i + 1], where, "times");
    if ((t[i + 1] > t[i]) != up || t[i + 1] == t[i])
      diffgrad::detail::throw_argument(where, "times", "a strictly monotone sequence",
                                       diffgrad::detail::concat("t[", i, "] = ", t[i], ", t[",
                                                                i + 1, "] = ", t[i + 1]));
  }
}
} // namespace detail

/// Integrates dx/dt = v(x, t) with RK4 along `times` (increasing or decreasing); x in/out.
template <class Field, class State>
void integrate_ode(const Field& field, State& x, const std::vector<double>& times) {
  detail::check_times(times, "integrate_ode");
  std::array<State, 4> k;
  State u;
  for (std::size_t i = 0; i + 1 < times.size(); ++i) {
    const double t = times[i], h = times[i + 1] - t;
    field.velocity(x, t, k[0]);
    u = x + (0.5 * h) * k[0];
    field.velocity(u, t + 0.5 * h, k[1]);
    u = x + (0.5 * h) * k[1];
    field.velocity(u, t + 0.5 * h, k[2]);
    u = x + h * k[2];
    field.velocity(u, t + h, k[3]);
    x += (h / 6.0) * (k[0] + 2.0 * k[1] + 2.0 * k[2] + k[3]);
  }
}

/// tr(dv/dx) by d VJPs with the unit vectors: exact for the field.
class JacobianTrace {
public:
  template <class Field, class State>
  void operator()(const Field& field, const State& x, double t, Eigen::VectorXd& out) {
    State probe(x.rows(), x.cols()), dx;
    out = Eigen::VectorXd::Zero(x.rows());
    for (Eigen::Index j = 0; j < x.cols(); ++j) {
      probe.setZero();
      probe.col(j).setOnes();
      field.velocity_vjp(x, t, probe, dx);
      out += dx.col(j).template cast<double>();
      ++vjps_;
    }
  }
  std::int64_t vjps() const { return vjps_; }

private:
  std::int64_t vjps_ = 0;
};

struct HutchinsonTraceOptions {
  int probes = 1;          ///< k probes averaged per call
  bool rademacher = true;  ///< +-1 probes (false: standard normal)
  std::uint64_t seed = 0;  ///< probe k of sample b, coordinate j keyed by (seed, k, b d + j)
};

/// Hutchinson's estimator (1/k) sum_k z_k^T (dv/dx)^T z_k, the same probes at every call (so the
/// integrand stays smooth in t and RK4 keeps its order): unbiased, k VJPs per call.
class HutchinsonTrace {
public:
  explicit HutchinsonTrace(HutchinsonTraceOptions options = {}) : opt_(options) {
    diffgrad::detail::require(options.probes >= 1, "HutchinsonTrace", "options.probes",
                              "at least 1 probe", options.probes);
  }
  template <class Field, class State>
  void operator()(const Field& field, const State& x, double t, Eigen::VectorXd& out) {
    State z(x.rows(), x.cols()), dx;
    out = Eigen::VectorXd::Zero(x.rows());
    const auto cols = static_cast<std::uint64_t>(x.cols());
    for (int k = 0; k < opt_.probes; ++k) {
      for (Eigen::Index b = 0; b < x.rows(); ++b)
        for (Eigen::Index j = 0; j < x.cols(); ++j) {
          const std::uint64_t index = static_cast<std::uint64_t>(b) * cols + static_cast<std::uint64_t>(j);
          double v;
          if (opt_.rademacher) {
            const auto r = diffgrad::detail::philox4x32_10(
                diffgrad::detail::Philox4x32{{static_cast<std::uint32_t>(index),
                                              static_cast<std::uint32_t>(index >> 32),
                                              static_cast<std::uint32_t>(k), 0x68757463u}},
                opt_.seed);
            v = (r.v[0] & 1u) ? 1.0 : -1.0;
          } else {
            v = diffgrad::detail::gaussian(opt_.seed, static_cast<std::uint64_t>(k), index);
          }
          z(b, j) = static_cast<typename State::Scalar>(v);
        }
      field.velocity_vjp(x, t, z, dx);
      out += dx.cwiseProduct(z).rowwise().sum().template cast<double>();
      ++vjps_;
    }
    out /= static_cast<double>(opt_.probes);
  }
  std::int64_t vjps() const { return vjps_; }

private:
  HutchinsonTraceOptions opt_;
  std::int64_t vjps_ = 0;
};

/// log N(x; 0, variance I) per row.
template <class State>
Eigen::VectorXd gaussian_log_density(const State& x, double variance = 1.0) {
  const double d = static_cast<double>(x.cols());
  return (-0.5 * x.template cast<double>().rowwise().squaredNorm().array() / variance -
          0.5 * d * std::log(2.0 * std::numbers::pi * variance))
      .matrix();
}

template <class State> struct TimeLikelihood {
  Eigen::VectorXd log_likelihood;      ///< log p_{t_0}(x) per sample (nats)
  Eigen::VectorXd prior_log_density;   ///< log p_{t_K}(x_{t_K})
  Eigen::VectorXd divergence_integral; ///< int tr(dv/dx) dt per sample
  State x_end;                         ///< the state at t_K
  std::int64_t field_evals = 0;
  std::int64_t trace_calls = 0;
};

/// log p_{t_0}(x) for each row of x by RK4 on `times` (increasing, data end first):
///   prior(x_end) -> Eigen::VectorXd of log p_{t_K}.
template <class Field, class Trace, class State, class Prior>
TimeLikelihood<State> log_likelihood_in_t(const Field& field, Trace& trace, const State& x,
                                          const std::vector<double>& times, Prior&& prior,
                                          bool check_finite = true) {
  const char* where = "log_likelihood_in_t";
  detail::check_times(times, where);
  if (!(times[1] > times[0]))
    diffgrad::detail::throw_argument(where, "times", "increasing times (data end first)",
                                     diffgrad::detail::concat(times[0], ", ", times[1], ", ..."));
  if (x.rows() < 1 || x.cols() < 1)
    diffgrad::detail::throw_argument(where, "x", "a non-empty batch",
                                     diffgrad::detail::concat(x.rows(), " x ", x.cols()));
  TimeLikelihood<State> r;
  r.x_end = x;
  State& xs = r.x_end;
  std::array<State, 4> k;
  std::array<Eigen::VectorXd, 4> tr;
  State u;
  Eigen::VectorXd integral = Eigen::VectorXd::Zero(x.rows());
  constexpr std::array<double, 4> kStage{0.0, 0.5, 0.5, 1.0};
  constexpr std::array<double, 4> kWeight{1.0 / 6, 2.0 / 6, 2.0 / 6, 1.0 / 6};
  for (std::size_t i = 0; i + 1 < times.size(); ++i) {
    const double t = times[i], h = times[i + 1] - t;
    for (std::size_t s = 0; s < 4; ++s) {
      const double ts = s == 3 ? times[i + 1] : t + kStage[s] * h;
      const State& at = s == 0 ? xs : u;
      if (s > 0) u = xs + (kStage[s] * h) * k[s - 1];
      field.velocity(at, ts, k[s]);
      trace(field, at, ts, tr[s]);
      ++r.field_evals;
      ++r.trace_calls;
      if (check_finite && (!k[s].allFinite() || !tr[s].allFinite()))
        throw numerical_error(diffgrad::detail::concat(
            where, ": expected a finite drift and trace, got NaN or Inf at t = ", ts));
    }
    xs += (h * kWeight[0]) * k[0] + (h * kWeight[1]) * k[1] + (h * kWeight[2]) * k[2] +
          (h * kWeight[3]) * k[3];
    for (std::size_t s = 0; s < 4; ++s) integral += (h * kWeight[s]) * tr[s];
  }
  r.prior_log_density = prior(static_cast<const State&>(xs));
  if (r.prior_log_density.size() != x.rows())
    diffgrad::detail::throw_argument(where, "prior output",
                                     diffgrad::detail::concat(x.rows(), " log densities"),
                                     r.prior_log_density.size());
  r.divergence_integral = integral;
  r.log_likelihood = r.prior_log_density + integral;
  return r;
}

/// DiffFlow's marginal-preserving family as a field in t:
///   v(x, t) = f(x, t) - (1 + lambda^2)/2 g(t)^2 s(x, t);
/// lambda = 0 (the default) is the probability-flow ODE used for the NLL.
template <class Drift, class Score, class G> class ProbabilityFlow {
public:
  using State = typename Drift::state_type;
  ProbabilityFlow(const Drift& drift, const Score& score, G g, double stochasticity = 0.0)
      : drift_(drift), score_(score), g_(std::move(g)), lam_(stochasticity) {}
  void velocity(const State& x, double t, State& out) const {
    drift_.velocity(x, t, out);
    score_.velocity(x, t, s_);
    out -= typename State::Scalar(score_coeff(t)) * s_;
  }
  void velocity_vjp(const State& x, double t, const State& a, State& dx) const {
    drift_.velocity_vjp(x, t, a, dx, nullptr, nullptr);
    score_.velocity_vjp(x, t, a, ds_, nullptr, nullptr);
    dx -= typename State::Scalar(score_coeff(t)) * ds_;
  }

private:
  double score_coeff(double t) const {
    const double g = g_(t);
    return 0.5 * (1.0 + lam_ * lam_) * g * g;
  }
  const Drift& drift_;
  const Score& score_;
  G g_;
  double lam_;
  mutable State s_, ds_;
};

} // namespace diffgrad::diffflow
