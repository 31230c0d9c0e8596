#pragma once
// DF-TM, diffusion-Fisher trace matching (Diffusion Fisher paper, Sec. 4; docs/math.md):
//   tr F(x_t) = d/sigma^2 - (alpha^2/sigma^4) [ T(x_t) - |x0_hat(x_t)|^2 ],
//   T(x_t) = E[|x0|^2 | x_t],
// exact for any data distribution (F = I/sigma^2 - (alpha^2/sigma^4) Cov[x0 | x_t] and
// tr Cov = T - |x0_hat|^2). A scalar network T_phi(x_t, t) learns T by regressing |x0|^2 from
// x_t = alpha x0 + sigma n with an L2 loss (its minimiser is the conditional mean). Then a trace
// costs one evaluation of T_phi plus x0_hat, which a likelihood integrator already has from the
// eps it evaluates for the drift: no VJP, no probe noise.
//
// Pieces:
//  - df_tm_trace(node, T, x0_hat): the formula, per sample, in double.
//  - DfTmTrace<TraceNet>: a trace provider for the likelihood integrator (likelihood.hpp),
//    called as provider(x, node, eps, out) with the eps the integrator already computed.
//    TraceNet is any callable net(x, node, x0_hat, Eigen::VectorXd& T) (one T per sample;
//    x0_hat is passed for networks that use it and may be ignored), e.g. the exact oracle of a
//    mixture (ExactSecondMoment) or MlpTraceNetwork.
//  - MlpTraceNetwork: models::Mlp read as a trace network, with two targets:
//      TraceTarget::second_moment (the paper): the MLP's d outputs regress x0_j^2 and
//        T = sum_j out_j (each output's L2 minimiser is E[x0_j^2 | x_t]; d outputs cost no
//        more than one and reuse models::Mlp as is);
//      TraceTarget::scaled_posterior_variance (diffgrad's variant): the outputs regress
//        (alpha^2/sigma^2)(x0_j - x0_hat_j)^2, whose sum r has the conditional mean
//        (alpha^2/sigma^2) tr Cov[x0 | x_t], and T = |x0_hat|^2 + (sigma^2/alpha^2) r, so that
//        tr F = (d - r)/sigma^2. Same formula, same one network call; see below for why.
//  - train_trace_network: the reference training loop (Adam, Philox-drawn minibatches, EMA of
//    the weights) on a finite data set of points (K x d), e.g. a checkerboard.
//
// Why the variant. An error delta in T is an error alpha^2 delta/sigma^4 in tr F, a relative
// error alpha^2 delta/(d sigma^2): at sigma = 0.03 a 0.1% error in T = 2 becomes a ~100% trace
// error, and a regression on noisy |x0|^2 targets does not get below ~1e-3. An error delta_r in
// r is a relative trace error delta_r/(d - r), with no 1/sigma^2, and the targets vanish where
// the posterior has collapsed. It needs x0_hat (from the eps model) when training and when
// evaluating. docs/fisher.md measures both across t.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "diffgrad/concepts/schedule.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/detail/philox.hpp"
#include "diffgrad/fisher/exact_fisher.hpp"
#include "diffgrad/gradients/optimizer.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::fisher {

/// tr F = d/sigma^2 - (alpha^2/sigma^4)(T - |x0_hat|^2) per sample (T: B values, x0_hat: B x d).
template <class State>
Eigen::VectorXd df_tm_trace(const Node& n, const Eigen::VectorXd& second_moment,
                            const State& x0_hat) {
  const char* where = "df_tm_trace";
  models::impl::require_noisy_node(n, where);
  models::impl::require_size(second_moment, x0_hat.rows(), where, "second_moment");
  const double s2 = n.sigma * n.sigma;
  const double d = static_cast<double>(x0_hat.cols());
  const Eigen::VectorXd hat_sq = x0_hat.rowwise().squaredNorm().template cast<double>();
  return (Eigen::VectorXd::Constant(x0_hat.rows(), d / s2) -
          (n.alpha * n.alpha / (s2 * s2)) * (second_moment - hat_sq))
      .eval();
}

/// The exact E[|x0|^2 | x_t] of a mixture as a trace network (DF-TM's oracle).
template <class Model> class ExactSecondMoment {
public:
  explicit ExactSecondMoment(const Model& model) : fisher_(model) {}
  template <class Hat>
  void operator()(const typename Model::state_type& x, const Node& n, const Hat&,
                  Eigen::VectorXd& out) const {
    out = fisher_.second_moment(x, n);
  }

private:
  ExactFisher<Model> fisher_;
};

/// DF-TM trace provider: provider(x, node, eps, out) writes tr F per sample, with
/// x0_hat = (x - sigma eps)/alpha from the eps the caller evaluated and T from the network.
template <class TraceNet> class DfTmTrace {
public:
  explicit DfTmTrace(TraceNet& net) : net_(net) {}

  template <class State>
  void operator()(const State& x, const Node& n, const State& eps, Eigen::VectorXd& out) {
    const char* where = "DfTmTrace";
    models::impl::require_same_shape(eps, x, where, "eps");
    models::impl::require_noisy_node(n, where);
    hat_ = ((x.template cast<double>() - n.sigma * eps.template cast<double>()) / n.alpha);
    net_(x, n, static_cast<const HatState&>(hat_), t_);
    ++calls_;
    if (t_.size() != x.rows())
      diffgrad::detail::throw_argument(
          where, "trace network output",
          diffgrad::detail::concat(x.rows(), " values (one per sample)"), t_.size());
    out = df_tm_trace(n, t_, hat_);
  }

  /// Trace-network evaluations so far.
  std::int64_t calls() const { return calls_; }

private:
  using HatState = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  TraceNet& net_;
  HatState hat_;
  Eigen::VectorXd t_;
  std::int64_t calls_ = 0;
};

/// What an MlpTraceNetwork's outputs regress (see the header note).
enum class TraceTarget {
  second_moment,             ///< x0_j^2; T = sum_j out_j (the paper's DF-TM)
  scaled_posterior_variance, ///< (alpha^2/sigma^2)(x0_j - x0_hat_j)^2; T = |x0_hat|^2 +
                             ///< (sigma^2/alpha^2) sum_j out_j
};

/// Which time value the MLP of a trace network is fed (its sin/cos features resolve about one
/// unit of MlpConfig::time_scale * input).
enum class TraceNetworkTime {
  log_snr,    ///< -lambda / 10 (about [-1, 1] for the usual schedules): resolves the data end,
              ///< where sigma changes by orders of magnitude over a small range of t
  schedule_t, ///< the node's schedule time n.t
};

/// A models::Mlp read as a trace network T(x, t). The MLP's dim must be the data dimension.
/// Called as net(x, node, x0_hat, T).
template <class Scalar> class MlpTraceNetwork {
public:
  using state_type = typename models::Mlp<Scalar>::state_type;

  explicit MlpTraceNetwork(models::Mlp<Scalar> mlp, TraceTarget target = TraceTarget::second_moment,
                           TraceNetworkTime time = TraceNetworkTime::log_snr)
      : mlp_(std::move(mlp)), target_(target), time_(time) {}

  /// The time value the MLP is called with at node n.
  double time_input(const Node& n) const {
    return time_ == TraceNetworkTime::log_snr ? -0.1 * n.lambda : n.t;
  }

  template <class Hat>
  void operator()(const state_type& x, const Node& n, const Hat& x0_hat,
                  Eigen::VectorXd& out) const {
    mlp_.eps(x, time_input(n), out_);
    out = out_.rowwise().sum().template cast<double>();
    if (target_ == TraceTarget::scaled_posterior_variance) {
      if (x0_hat.rows() != x.rows() || x0_hat.cols() != x.cols()) // x0_hat may be double
        diffgrad::detail::throw_argument(
            "MlpTraceNetwork", "x0_hat",
            diffgrad::detail::concat("shape ", x.rows(), " x ", x.cols(), " (x's shape)"),
            diffgrad::detail::concat(x0_hat.rows(), " x ", x0_hat.cols()));
      const double ratio = n.sigma * n.sigma / (n.alpha * n.alpha);
      out = x0_hat.rowwise().squaredNorm().template cast<double>() + ratio * out;
    }
  }

  /// The raw per-coordinate outputs (B x d): the regressed targets.
  void coordinates(const state_type& x, const Node& n, state_type& out) const {
    mlp_.eps(x, time_input(n), out);
  }

  models::Mlp<Scalar>& mlp() { return mlp_; }
  const models::Mlp<Scalar>& mlp() const { return mlp_; }
  std::int64_t dim() const { return mlp_.dim(); }
  TraceTarget target() const { return target_; }
  TraceNetworkTime time() const { return time_; }

private:
  models::Mlp<Scalar> mlp_;
  TraceTarget target_;
  TraceNetworkTime time_;
  mutable state_type out_;
};

/// How training draws the time of each group of samples.
enum class TraceTimeSampling {
  uniform_t,      ///< t ~ U(t_min, t_max)
  uniform_lambda, ///< lambda ~ U(lambda(t_max), lambda(t_min)): more weight on small sigma,
                  ///< where trace errors are amplified (alpha^2/sigma^4)
};

struct TraceTrainingOptions {
  int steps = 3000;            ///< Adam steps
  int batch = 256;             ///< samples per step
  int time_groups = 8;         ///< distinct times per step (the MLP takes one t per call)
  double learning_rate = 2e-3; ///< Adam step size (other Adam settings: defaults)
  double ema_decay = 0.995;    ///< the trained weights are the exponential moving average of
                               ///< the iterates with this decay (0: the last iterate); it
                               ///< averages out the noise of the regression targets
  TraceTimeSampling time_sampling = TraceTimeSampling::uniform_lambda;
  double t_min = -1.0;    ///< training time range; < 0: the schedule's t_min()
  double t_max = -1.0;    ///< < 0: the schedule's t_max()
  std::uint64_t seed = 0; ///< Philox seed of indices, times and noise
  int report_every = 0;   ///< > 0: record the mean loss every this many steps
};

struct TraceTrainingReport {
  std::vector<double> loss_history; ///< mean loss per report_every steps (if requested)
  double first_loss = 0.0;          ///< mean loss of the first step
  double final_loss = 0.0;          ///< mean loss of the last 5% of the steps
  int steps = 0;
};

namespace detail {
inline double philox_uniform(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) {
  const auto r = diffgrad::detail::philox4x32_10(
      diffgrad::detail::Philox4x32{
          {static_cast<std::uint32_t>(index), static_cast<std::uint32_t>(index >> 32),
           static_cast<std::uint32_t>(stream),
           static_cast<std::uint32_t>(stream >> 32) ^ 0x74726163u /* "trac" */}},
      seed);
  return diffgrad::detail::uniform_open0(r.v[0], r.v[1]);
}
} // namespace detail

/// Trains `net` on its target (per coordinate, see MlpTraceNetwork) from
/// x_t = alpha_t x0 + sigma_t n, x0 drawn uniformly from the rows of `data` (K x d), n ~ N(0, I):
/// L = mean over the batch of sum_j (out_j - target_j)^2, minimised with Adam, the trained
/// weights being the EMA of the iterates. The scaled_posterior_variance target needs
/// `denoiser(x_t, node, x0_hat)` (the eps model's data prediction). Deterministic for a seed.
/// All buffers are allocated before the loop.
template <Schedule S, class DenoiserFn>
TraceTrainingReport train_trace_network(
    MlpTraceNetwork<double>& net, const S& schedule,
    const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>& data,
    const TraceTrainingOptions& options, DenoiserFn&& denoiser) {
  using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const char* where = "train_trace_network";
  diffgrad::detail::require(options.steps >= 1, where, "options.steps", "at least 1",
                            options.steps);
  diffgrad::detail::require(options.time_groups >= 1, where, "options.time_groups", "at least 1",
                            options.time_groups);
  diffgrad::detail::require(options.batch >= options.time_groups, where, "options.batch",
                            "at least options.time_groups samples", options.batch);
  diffgrad::detail::require(options.ema_decay >= 0 && options.ema_decay < 1, where,
                            "options.ema_decay", "0 <= ema_decay < 1", options.ema_decay);
  diffgrad::detail::require(data.rows() >= 1 && data.allFinite(), where, "data",
                            "at least one finite data point", static_cast<double>(data.rows()));
  models::impl::require_state_dim(data, net.dim(), where, "data");
  const double t_lo = options.t_min < 0 ? schedule.t_min() : options.t_min;
  const double t_hi = options.t_max < 0 ? schedule.t_max() : options.t_max;
  diffgrad::detail::require(t_lo >= schedule.t_min() && t_lo < t_hi && t_hi <= schedule.t_max(),
                            where, "options.t_min/t_max",
                            "schedule.t_min() <= t_min < t_max <= schedule.t_max()", t_lo);
  const double l_lo = schedule.lambda(t_hi), l_hi = schedule.lambda(t_lo);

  auto& mlp = net.mlp();
  const int groups = options.time_groups;
  const int per_group = options.batch / groups;
  const Eigen::Index d = data.cols();
  Mat x0(per_group, d), xt(per_group, d), out(per_group, d), grad(per_group, d), dx(per_group, d),
      hat(per_group, d);
  const bool variance = net.target() == TraceTarget::scaled_posterior_variance;
  Eigen::VectorXd dparams = Eigen::VectorXd::Zero(mlp.param_size());
  Adam adam({.learning_rate = options.learning_rate});
  Eigen::VectorXd ema = Eigen::VectorXd::Zero(mlp.param_size());
  double ema_weight = 0.0;
  TraceTrainingReport report;
  report.steps = options.steps;
  double window = 0.0, tail = 0.0;
  int tail_count = 0;
  const int tail_start = options.steps - std::max(1, options.steps / 20);
  const double total = static_cast<double>(per_group * groups);
  std::uint64_t counter = 0;
  for (int step = 0; step < options.steps; ++step) {
    dparams.setZero();
    double loss = 0.0;
    for (int g = 0; g < groups; ++g, ++counter) {
      const double u = detail::philox_uniform(options.seed, counter, 0);
      const double t = options.time_sampling == TraceTimeSampling::uniform_t
                           ? t_lo + u * (t_hi - t_lo)
                           : schedule.t_of_lambda(l_lo + u * (l_hi - l_lo));
      const Node n = schedule.node(std::clamp(t, t_lo, t_hi));
      for (int b = 0; b < per_group; ++b) {
        const double v =
            detail::philox_uniform(options.seed, counter, static_cast<std::uint64_t>(b) + 1);
        const auto k = std::min<Eigen::Index>(
            static_cast<Eigen::Index>(v * static_cast<double>(data.rows())), data.rows() - 1);
        x0.row(b) = data.row(k);
        for (Eigen::Index j = 0; j < d; ++j)
          xt(b, j) = n.alpha * x0(b, j) +
                     n.sigma * diffgrad::detail::gaussian(options.seed ^ 0x5eedULL, counter,
                                                          static_cast<std::uint64_t>(b * d + j));
      }
      const double tau = net.time_input(n);
      mlp.eps(xt, tau, out);
      if (variance) {
        denoiser(static_cast<const Mat&>(xt), n, hat);
        models::impl::require_same_shape(hat, xt, where, "denoiser output");
        grad = out - (n.alpha * n.alpha / (n.sigma * n.sigma)) * (x0 - hat).cwiseAbs2();
      } else {
        grad = out - x0.cwiseProduct(x0);
      }
      loss += grad.squaredNorm() / total;
      grad *= 2.0 / total;
      mlp.vjp(xt, tau, grad, dx, nullptr, &dparams);
    }
    adam.step(mlp.params(), dparams);
    // Bias-corrected EMA (as Adam's moments), so early steps are not pulled to the init.
    ema = options.ema_decay * ema + (1.0 - options.ema_decay) * mlp.params();
    ema_weight = options.ema_decay * ema_weight + (1.0 - options.ema_decay);
    if (step == 0) report.first_loss = loss;
    if (step >= tail_start) {
      tail += loss;
      ++tail_count;
    }
    window += loss;
    if (options.report_every > 0 && (step + 1) % options.report_every == 0) {
      report.loss_history.push_back(window / options.report_every);
      window = 0.0;
    }
  }
  report.final_loss = tail / std::max(1, tail_count);
  if (options.ema_decay > 0) mlp.params() = ema / ema_weight;
  return report;
}

/// train_trace_network for the second_moment target (no denoiser needed).
template <Schedule S>
TraceTrainingReport train_trace_network(
    MlpTraceNetwork<double>& net, const S& schedule,
    const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>& data,
    const TraceTrainingOptions& options = {}) {
  using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  if (net.target() != TraceTarget::second_moment)
    diffgrad::detail::throw_argument("train_trace_network", "denoiser",
                                     "a denoiser for the scaled_posterior_variance target", "none");
  return train_trace_network(net, schedule, data, options, [](const Mat&, const Node&, Mat&) {});
}

} // namespace diffgrad::fisher
