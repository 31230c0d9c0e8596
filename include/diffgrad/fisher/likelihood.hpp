#pragma once
// PF-ODE log-likelihood by the instantaneous change of variables (docs/math.md):
//   log p_{t0}(x_{t0}) = log p_{t1}(x_{t1}) + int_{t0}^{t1} div(drift)(x_t, t) dt,
//   drift = f x + (g^2/(2 sigma)) eps,   div(drift) = f d + (g^2/2) tr F,
// integrating the state and the divergence together from the data end t0 to the noise end t1.
//
// The integrator is classical RK4 on a fixed grid uniform in lambda = log(alpha/sigma), where
// the system is smooth and non-stiff (in t, tr F ~ d/sigma^2 makes the integrand blow up like
// 1/t at the data end of VP). With dt = dlambda / (dlambda/dt) and g^2 = -2 sigma^2 dlambda/dt:
//   dx/dlambda  = c x - sigma eps,           c = dlog(alpha)/dlambda = -2 sigma^2 f / g^2,
//   dl/dlambda  = c d - sigma^2 tr F,        l = the accumulated divergence integral,
// and log p_{t0}(x_{t0}) = log p_{t1}(x_{t1}) + l(lambda_1) (l starts at 0 at lambda_0 and the
// grid runs from lambda_0 = lambda(t0) down to lambda_1 = lambda(t1)). Global error O(h^4),
// verified against the closed form for Gaussian data (tests/test_likelihood.cpp).
//
// The trace is a provider, called as provider(x, node, eps, out) with the eps the integrator
// just evaluated (B x d) and out the B traces of F:
//   ExactTrace       exact mixture Fisher (exact_fisher.hpp)
//   DfTmTrace        DF-TM with a trace network (df_tm.hpp): one network call, no VJP
//   VjpTrace         sum_j e_j^T (d eps/dx)^T e_j / sigma: d VJPs, exact for the model
//   HutchinsonTrace  z^T (d eps/dx)^T z / sigma with Philox probes: k VJPs, unbiased
// so the three can be run side by side on the same samples (examples/likelihood.cpp).
#include <Eigen/Core>
#include <array>
#include <cmath>
#include <cstdint>
#include <numbers>

#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/concepts/schedule.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/detail/philox.hpp"
#include "diffgrad/fisher/exact_fisher.hpp"
#include "diffgrad/gradients/vjp_call.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/schedule/node.hpp"
#include "diffgrad/solvers/model_call.hpp"

namespace diffgrad::fisher {

/// tr F from the exact Fisher of a DiracMixture / GaussianMixture (ignores eps).
template <class Model> class ExactTrace {
public:
  explicit ExactTrace(const Model& model) : fisher_(model) {}
  template <class State>
  void operator()(const State& x, const Node& n, const State&, Eigen::VectorXd& out) {
    fisher_.trace(x, n, out);
    ++calls_;
  }
  std::int64_t calls() const { return calls_; }

private:
  ExactFisher<Model> fisher_;
  std::int64_t calls_ = 0;
};

namespace detail {
template <class Model, class State>
void eps_vjp(Model& model, const State& x, const Node& n, const State& a, State& dx) {
  using Vector = Eigen::Matrix<typename State::Scalar, Eigen::Dynamic, 1>;
  EpsVjp<Model>{model}(x, n, a, dx, static_cast<Vector*>(nullptr), static_cast<Vector*>(nullptr));
}
} // namespace detail

/// tr F = tr(d eps/dx)/sigma by d VJPs with the unit vectors (the paper's "VJP method"):
/// exact for the model, d VJPs per call. Batched: VJP j uses e_j for every sample.
template <class Model, class State = typename detail::model_state<Model>::type> class VjpTrace {
public:
  explicit VjpTrace(Model& model) : model_(model) {}
  void operator()(const State& x, const Node& n, const State&, Eigen::VectorXd& out) {
    models::impl::require_noisy_node(n, "VjpTrace");
    probe_.resize(x.rows(), x.cols());
    out.resize(x.rows());
    out.setZero();
    for (Eigen::Index j = 0; j < x.cols(); ++j) {
      probe_.setZero();
      probe_.col(j).setOnes();
      detail::eps_vjp(model_, x, n, probe_, dx_);
      out += dx_.col(j).template cast<double>() / n.sigma;
      ++vjps_;
    }
    ++calls_;
  }
  std::int64_t calls() const { return calls_; }
  std::int64_t vjps() const { return vjps_; }

private:
  Model& model_;
  State probe_, dx_;
  std::int64_t calls_ = 0, vjps_ = 0;
};

enum class ProbeDistribution {
  rademacher, ///< z_i = +-1: the minimum-variance choice for a fixed matrix
  gaussian,   ///< z_i ~ N(0, 1)
};

struct HutchinsonOptions {
  int probes = 1; ///< k: VJPs per call; the estimate averages k probes
  ProbeDistribution distribution = ProbeDistribution::rademacher;
  std::uint64_t seed = 0;        ///< Philox seed: probe k of sample b, coordinate j is keyed by
                                 ///< (seed, k [+ k_total * call], b * d + j)
  bool redraw_each_call = false; ///< false: the same probes for every call (FFJORD's choice:
                                 ///< the integrand stays smooth in time, so RK4 keeps its
                                 ///< order); true: fresh probes per call
};

/// Hutchinson's estimator tr F ~ (1/k) sum_k z_k^T (d eps/dx)^T z_k / sigma: unbiased, k VJPs
/// per call, with counter-based (Philox) probes so runs are reproducible.
template <class Model, class State = typename detail::model_state<Model>::type>
class HutchinsonTrace {
public:
  explicit HutchinsonTrace(Model& model, HutchinsonOptions options = {})
      : model_(model), opt_(options) {
    diffgrad::detail::require(options.probes >= 1, "HutchinsonTrace", "options.probes",
                              "at least 1 probe", options.probes);
  }
  void operator()(const State& x, const Node& n, const State&, Eigen::VectorXd& out) {
    models::impl::require_noisy_node(n, "HutchinsonTrace");
    probe_.resize(x.rows(), x.cols());
    out.resize(x.rows());
    out.setZero();
    const auto cols = static_cast<std::uint64_t>(x.cols());
    for (int k = 0; k < opt_.probes; ++k) {
      const std::uint64_t stream =
          static_cast<std::uint64_t>(k) +
          (opt_.redraw_each_call
               ? static_cast<std::uint64_t>(calls_) * static_cast<std::uint64_t>(opt_.probes)
               : 0);
      for (Eigen::Index b = 0; b < x.rows(); ++b)
        for (Eigen::Index j = 0; j < x.cols(); ++j)
          probe_(b, j) = static_cast<typename State::Scalar>(probe_value(
              stream, static_cast<std::uint64_t>(b) * cols + static_cast<std::uint64_t>(j)));
      detail::eps_vjp(model_, x, n, probe_, dx_);
      out += dx_.cwiseProduct(probe_).rowwise().sum().template cast<double>();
      ++vjps_;
    }
    out /= n.sigma * static_cast<double>(opt_.probes);
    ++calls_;
  }
  std::int64_t calls() const { return calls_; }
  std::int64_t vjps() const { return vjps_; }
  const HutchinsonOptions& options() const { return opt_; }

private:
  double probe_value(std::uint64_t stream, std::uint64_t index) const {
    if (opt_.distribution == ProbeDistribution::gaussian)
      return diffgrad::detail::gaussian(opt_.seed, stream, index);
    // One Philox block per 128 probe entries would be cheaper; one per entry keeps the keying
    // identical to the Gaussian case and is negligible next to a VJP.
    const auto r = diffgrad::detail::philox4x32_10(
        diffgrad::detail::Philox4x32{
            {static_cast<std::uint32_t>(index), static_cast<std::uint32_t>(index >> 32),
             static_cast<std::uint32_t>(stream),
             static_cast<std::uint32_t>(stream >> 32) ^ 0x68757463u /* "hutc" */}},
        opt_.seed);
    return (r.v[0] & 1u) ? 1.0 : -1.0;
  }

  Model& model_;
  HutchinsonOptions opt_;
  State probe_, dx_;
  std::int64_t calls_ = 0, vjps_ = 0;
};

/// log N(x; 0, (alpha^2 s^2 + sigma^2) I) at the noise end: the prior for data of scale s
/// (s = 1 gives VP's N(0, I); s = 0 gives VE/EDM's N(0, sigma_max^2 I)).
class GaussianPrior {
public:
  explicit GaussianPrior(double data_std) : s_(data_std) {
    diffgrad::detail::require(data_std >= 0 && std::isfinite(data_std), "GaussianPrior", "data_std",
                              "a finite std >= 0", data_std);
  }
  template <class State> Eigen::VectorXd operator()(const State& x, const Node& n) const {
    const double v = n.alpha * n.alpha * s_ * s_ + n.sigma * n.sigma;
    const double d = static_cast<double>(x.cols());
    return (-0.5 * x.rowwise().squaredNorm().template cast<double>().array() / v -
            0.5 * d * std::log(2.0 * std::numbers::pi * v))
        .matrix();
  }

private:
  double s_;
};

struct LikelihoodOptions {
  int steps = 32;           ///< RK4 steps, uniform in lambda between t0 and t1
  bool check_finite = true; ///< check every model output and trace for NaN/Inf
};

template <class State> struct LikelihoodResult {
  Eigen::VectorXd log_likelihood;      ///< log p_{t0}(x) per sample (nats)
  Eigen::VectorXd prior_log_density;   ///< log p_{t1}(x_{t1}) from the prior
  Eigen::VectorXd divergence_integral; ///< int_{t0}^{t1} div(drift) dt per sample
  State x_end;                         ///< the state at t1 (the encoding of x)
  int steps = 0;
  std::int64_t model_evals = 0; ///< eps evaluations (4 per step)
  std::int64_t trace_calls = 0; ///< trace-provider calls (4 per step)
};

namespace detail {
/// dlog(alpha)/dlambda at a node: -2 sigma^2 f / g^2.
template <Schedule S> double dlog_alpha_dlambda(const S& schedule, const Node& n) {
  const double g2 = schedule.g2(n.t);
  return g2 == 0.0 ? 0.0 : -2.0 * n.sigma * n.sigma * schedule.f(n.t) / g2;
}
} // namespace detail

/// log p_{t0}(x) for each row of x, by RK4 in lambda from t0 (data end) to t1 (noise end).
///   model:  any noise model (eps(x, t|Node, out)); its eps is the PF-ODE drift
///   trace:  a trace provider (see the header), called as trace(x, node, eps, out)
///   prior:  prior(x_{t1}, node_{t1}) -> Eigen::VectorXd of log densities (GaussianPrior, or a
///           mixture's exact log_density for tests)
/// Cost: 4 N model evaluations and 4 N trace calls. Buffers are allocated before the loop.
template <Backend B, Schedule S, class Model, class Trace, class Prior>
LikelihoodResult<typename B::state_type>
log_likelihood(const B& backend, const S& schedule, Model& model, Trace& trace,
               const typename B::state_type& x, double t0, double t1, Prior&& prior,
               const LikelihoodOptions& options = {}) {
  using State = typename B::state_type;
  const char* where = "log_likelihood";
  diffgrad::detail::require(options.steps >= 1, where, "options.steps", "at least 1 step",
                            options.steps);
  diffgrad::detail::require(t0 >= schedule.t_min() && t0 < t1 && t1 <= schedule.t_max(), where,
                            "t0/t1",
                            diffgrad::detail::concat("t_min = ", schedule.t_min(),
                                                     " <= t0 < t1 <= t_max = ", schedule.t_max()),
                            t0);
  diffgrad::detail::require(B::batch(x) >= 1 && B::dim(x) >= 1, where, "x", "a non-empty batch",
                            static_cast<double>(B::batch(x)));
  const auto batch = B::batch(x), dim = B::dim(x);
  const double d = static_cast<double>(dim);
  const Node first = schedule.node(t0), last = schedule.node(t1);
  models::impl::require_noisy_node(first, where);
  const double l0 = first.lambda, l1 = last.lambda;
  const double h = (l1 - l0) / options.steps; // negative: data -> noise
  const auto node_at = [&](int i, double frac) {
    if (i == options.steps && frac == 0.0) return last;
    if (i == 0 && frac == 0.0) return first;
    return schedule.node(schedule.t_of_lambda(l0 + (static_cast<double>(i) + frac) * h));
  };

  LikelihoodResult<State> result;
  result.x_end = backend.make_state(batch, dim);
  backend.copy(result.x_end, x);
  State& xs = result.x_end;
  std::array<State, 4> u{backend.make_state(batch, dim), backend.make_state(batch, dim),
                         backend.make_state(batch, dim), backend.make_state(batch, dim)};
  std::array<State, 4> e{backend.make_state(batch, dim), backend.make_state(batch, dim),
                         backend.make_state(batch, dim), backend.make_state(batch, dim)};
  std::array<Eigen::VectorXd, 4> tr;
  for (auto& v : tr) v = Eigen::VectorXd::Zero(batch);
  Eigen::VectorXd integral = Eigen::VectorXd::Zero(batch);
  constexpr std::array<double, 4> kStage{0.0, 0.5, 0.5, 1.0};
  constexpr std::array<double, 4> kWeight{1.0 / 6, 2.0 / 6, 2.0 / 6, 1.0 / 6};

  for (int i = 0; i < options.steps; ++i) {
    backend.copy(u[0], xs);
    std::array<Node, 4> nodes{};
    std::array<double, 4> c{};
    for (int s = 0; s < 4; ++s) {
      const auto k = static_cast<std::size_t>(s);
      nodes[k] = node_at(s == 3 ? i + 1 : i, s == 3 ? 0.0 : kStage[k]);
      c[k] = detail::dlog_alpha_dlambda(schedule, nodes[k]);
      if (s > 0) {
        // u_s = x + a_s h k_{s-1},  k = c u - sigma e.
        const auto p = k - 1;
        const double a = kStage[k] * h;
        const LinTerm<State> terms[3] = {
            {1.0, &xs}, {a * c[p], &u[p]}, {-a * nodes[p].sigma, &e[p]}};
        backend.lincomb(u[k], std::span<const LinTerm<State>>(terms, 3));
      }
      EpsField<Model>{model}(static_cast<const State&>(u[k]), nodes[k], e[k]);
      ++result.model_evals;
      ::diffgrad::detail::check_model_output(backend, u[k], e[k], options.check_finite, i,
                                             nodes[k]);
      trace(static_cast<const State&>(u[k]), nodes[k], static_cast<const State&>(e[k]), tr[k]);
      ++result.trace_calls;
      if (tr[k].size() != batch)
        diffgrad::detail::throw_argument(
            where, "trace provider output",
            diffgrad::detail::concat(batch, " traces (one per sample)"), tr[k].size());
      if (options.check_finite && !tr[k].allFinite())
        throw numerical_error(diffgrad::detail::concat(where,
                                                       ": trace provider: expected finite "
                                                       "values, got NaN or Inf at step ",
                                                       i));
    }
    // x += h sum_s w_s (c_s u_s - sigma_s e_s);  l += h sum_s w_s (c_s d - sigma_s^2 tr_s).
    std::array<LinTerm<State>, 8> terms{};
    int n = 0;
    double x_coeff = 1.0;
    for (int s = 0; s < 4; ++s) {
      const auto k = static_cast<std::size_t>(s);
      const double w = h * kWeight[k];
      if (s == 0)
        x_coeff += w * c[k]; // u_0 is x itself
      else
        terms[static_cast<std::size_t>(n++)] = {w * c[k], &u[k]};
      terms[static_cast<std::size_t>(n++)] = {-w * nodes[k].sigma, &e[k]};
      integral.array() += w * (c[k] * d - nodes[k].sigma * nodes[k].sigma * tr[k].array());
    }
    terms[static_cast<std::size_t>(n++)] = {x_coeff, &u[0]};
    backend.lincomb(xs, std::span<const LinTerm<State>>(terms.data(), static_cast<std::size_t>(n)));
    ++result.steps;
  }
  result.prior_log_density = prior(static_cast<const State&>(xs), last);
  models::impl::require_size(result.prior_log_density, batch, where, "prior output");
  result.divergence_integral = integral;
  result.log_likelihood = result.prior_log_density + integral;
  return result;
}

} // namespace diffgrad::fisher
