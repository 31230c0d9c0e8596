#pragma once
// Discrete-time DDPM schedules (a table alphas_cumprod[n], n = 0..N-1) made continuous the
// way the official DPM-Solver code does: node n sits at t_n = (n + 1)/N and log alpha is
// piecewise linear in t between nodes. At the nodes this coincides with diffusers' integer
// timesteps (timestep k <-> t = (k + 1)/N), so both peers' grids are expressible here.
#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>
#include <utility>
#include <vector>

#include "diffgrad/schedule/detail_vp.hpp"

namespace diffgrad {

enum class BetaSchedule { linear, scaled_linear, squaredcos_cap_v2 };

/// What the network is called with at time t.
enum class DiscreteTimeInput {
  dpm_solver_official, ///< 1000 (t - 1/N)  (official DPM-Solver "discrete" wrapper)
  timestep_index       ///< N t - 1 = the (fractional) integer timestep k of diffusers
};

/// Betas as diffusers defines them, computed in double. (diffusers builds its table in
/// float32; to reproduce it bit-for-bit pass its alphas_cumprod to from_alphas_cumprod.)
inline std::vector<double> make_betas(BetaSchedule kind, int num_train_timesteps = 1000,
                                      double beta_start = 1e-4, double beta_end = 0.02) {
  detail::require(num_train_timesteps >= 2, "make_betas", "num_train_timesteps", ">= 2",
                  num_train_timesteps);
  const int n = num_train_timesteps;
  std::vector<double> betas(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    double& beta = betas[static_cast<std::size_t>(i)];
    const double frac = static_cast<double>(i) / (n - 1);
    switch (kind) {
    case BetaSchedule::linear: beta = beta_start + frac * (beta_end - beta_start); break;
    case BetaSchedule::scaled_linear: {
      const double r = std::sqrt(beta_start) + frac * (std::sqrt(beta_end) - std::sqrt(beta_start));
      beta = r * r;
      break;
    }
    case BetaSchedule::squaredcos_cap_v2: {
      auto alpha_bar = [](double t) {
        const double c = std::cos((t + 0.008) / 1.008 * std::numbers::pi / 2.0);
        return c * c;
      };
      beta =
          std::min(1.0 - alpha_bar((i + 1.0) / n) / alpha_bar(static_cast<double>(i) / n), 0.999);
      break;
    }
    }
  }
  return betas;
}

class DiscreteSchedule {
public:
  /// From the cumulative products alphas_cumprod[n] (strictly decreasing, in (0, 1)).
  static DiscreteSchedule
  from_alphas_cumprod(std::vector<double> alphas_cumprod,
                      DiscreteTimeInput input = DiscreteTimeInput::dpm_solver_official) {
    return DiscreteSchedule(std::move(alphas_cumprod), input);
  }
  static DiscreteSchedule
  from_betas(const std::vector<double>& betas,
             DiscreteTimeInput input = DiscreteTimeInput::dpm_solver_official) {
    std::vector<double> cumprod(betas.size());
    double acc = 1.0;
    for (std::size_t i = 0; i < betas.size(); ++i) {
      detail::require(betas[i] > 0 && betas[i] < 1, "DiscreteSchedule::from_betas", "betas",
                      "every beta in (0, 1)", betas[i]);
      acc *= 1.0 - betas[i];
      cumprod[i] = acc;
    }
    return DiscreteSchedule(std::move(cumprod), input);
  }
  static DiscreteSchedule
  from_beta_schedule(BetaSchedule kind, int num_train_timesteps = 1000, double beta_start = 1e-4,
                     double beta_end = 0.02,
                     DiscreteTimeInput input = DiscreteTimeInput::dpm_solver_official) {
    return from_betas(make_betas(kind, num_train_timesteps, beta_start, beta_end), input);
  }

  int num_train_timesteps() const { return static_cast<int>(log_alpha_.size()); }
  const std::vector<double>& alphas_cumprod() const { return alphas_cumprod_; }
  double t_min() const { return 1.0 / num_train_timesteps(); }
  double t_max() const { return 1.0; }
  /// Continuous time of integer timestep k (0-based).
  double t_of_timestep(double k) const { return (k + 1.0) / num_train_timesteps(); }

  double log_alpha(double t) const {
    const auto [i, w] = segment(t);
    return (1.0 - w) * log_alpha_[i] + w * log_alpha_[i + 1];
  }
  double alpha(double t) const { return std::exp(log_alpha(t)); }
  double sigma(double t) const { return detail::vp_sigma(log_alpha(t)); }
  double lambda(double t) const { return detail::vp_lambda(log_alpha(t)); }
  double t_of_lambda(double lambda) const {
    const double la = detail::vp_log_alpha_of_lambda(lambda);
    // log alpha decreases along the table: find the bracketing segment (clamped at the ends,
    // which extrapolates linearly like the official code).
    const auto n = log_alpha_.size();
    const auto it = std::lower_bound(log_alpha_.begin(), log_alpha_.end(), la,
                                     [](double table, double v) { return table > v; });
    std::size_t hi = static_cast<std::size_t>(
        std::clamp<std::ptrdiff_t>(it - log_alpha_.begin(), 1, static_cast<std::ptrdiff_t>(n - 1)));
    const std::size_t lo = hi - 1;
    const double w = (la - log_alpha_[lo]) / (log_alpha_[hi] - log_alpha_[lo]);
    return t_of_timestep(static_cast<double>(lo) + w);
  }
  double f(double t) const {
    const auto [i, w] = segment(t);
    (void)w;
    return (log_alpha_[i + 1] - log_alpha_[i]) * num_train_timesteps();
  }
  double g2(double t) const { return -2.0 * f(t); }
  double model_time(double t) const {
    return input_ == DiscreteTimeInput::dpm_solver_official ? 1000.0 * (t - t_min())
                                                            : t * num_train_timesteps() - 1.0;
  }
  Node node(double t) const {
    detail::check_time(t, t_min(), t_max(), "DiscreteSchedule::node");
    const double la = log_alpha(t);
    return Node{t, std::exp(la), detail::vp_sigma(la), detail::vp_lambda(la), model_time(t)};
  }
  /// Node exactly at integer timestep k, taken from the table without interpolation error.
  Node timestep_node(int k) const {
    detail::require(k >= 0 && k < num_train_timesteps(), "DiscreteSchedule::timestep_node", "k",
                    "0 <= k < num_train_timesteps", k);
    const double la = log_alpha_[static_cast<std::size_t>(k)];
    const double t = t_of_timestep(k);
    const double a2 = alphas_cumprod_[static_cast<std::size_t>(k)];
    return Node{t, std::sqrt(a2), std::sqrt(1.0 - a2), la - 0.5 * std::log1p(-a2), model_time(t)};
  }

private:
  DiscreteSchedule(std::vector<double> alphas_cumprod, DiscreteTimeInput input)
      : alphas_cumprod_(std::move(alphas_cumprod)), input_(input) {
    detail::require(alphas_cumprod_.size() >= 2, "DiscreteSchedule", "alphas_cumprod",
                    "at least 2 entries", static_cast<double>(alphas_cumprod_.size()));
    log_alpha_.resize(alphas_cumprod_.size());
    for (std::size_t i = 0; i < alphas_cumprod_.size(); ++i) {
      const double a = alphas_cumprod_[i];
      detail::require(a > 0 && a < 1 && (i == 0 || a < alphas_cumprod_[i - 1]), "DiscreteSchedule",
                      "alphas_cumprod", "strictly decreasing values in (0, 1)", a);
      log_alpha_[i] = 0.5 * std::log(a);
    }
  }
  /// Segment index i and weight w with t between nodes i and i+1 (ends extrapolate).
  std::pair<std::size_t, double> segment(double t) const {
    const double pos = t * num_train_timesteps() - 1.0; // fractional timestep
    const double fl = std::floor(pos);
    const auto i =
        static_cast<std::size_t>(std::clamp(fl, 0.0, static_cast<double>(log_alpha_.size() - 2)));
    return {i, pos - static_cast<double>(i)};
  }

  std::vector<double> alphas_cumprod_;
  std::vector<double> log_alpha_;
  DiscreteTimeInput input_;
};

} // namespace diffgrad
