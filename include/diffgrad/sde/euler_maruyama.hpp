#pragma once
// Forward-time SDE schemes on the step-plan engine (the "SDE stepping layer", docs/sde.md).
//
//   dx = (-a x + f(x, t; theta)) dt + g(t) dW,   t_0 < t_1 < ... < t_N (forward time)
//
// f is a user drift network (sde/sde.hpp: DriftModel), a >= 0 an optional Ornstein-Uhlenbeck
// rate, g(t) >= 0 a scalar diffusion. One step i -> i + 1 (h = t_{i+1} - t_i) is
//
//   x_{i+1} = D_i x_i + c_i f(x_i, t_i) + s_i xi_i,    xi_i ~ N(0, I) from Philox
//
//   euler_maruyama:  D = 1 - a h,   c = h,                     s = g(t_i) sqrt(h)
//   exponential:     D = e^{-a h},  c = (1 - e^{-a h}) / a,    s = g(t_i) sqrt((1 - e^{-2ah}) / 2a)
//                    (the OU part integrated exactly: exact in law for f = 0 and constant g)
//
// which IS a StepPlan: a term on x_i, a term on the "model output" e_i = f(x_i, t_i) and a
// noise coefficient. The scheme is therefore run by the library's one engine (run_scheme /
// Stepper) and differentiated by its one exact discrete adjoint (gradient.hpp /
// discrete_adjoint.hpp) with every memory mode; the noise is regenerated from Philox (seed,
// step, global element), never stored.
//
// Running costs ride along as extra state columns. With SdeOptions::running_costs the state
// is augmented to width W = d + 2, [x (d) | K | M], and every coefficient is a ColumnCoeff
// (per-column diagonal): D and c act on the x columns, the cost columns get D = 1, c = 1
// and no noise. The drift adapter of sde/sde.hpp returns [f | k_i | m_i] with
//
//   k_i = |c_i f|^2 / (2 s_i^2)           (Euler: |f|^2 h / (2 g^2))
//   m_i = (c_i / s_i) f . xi_i            (Euler: f . xi sqrt(h) / g)
//
// so K_N = sum_i k_i and M_N = sum_i m_i, and  -(K_N + M_N) = log p^0(x_{1:N}) / q^f(x_{1:N})
// EXACTLY for the chain (p^0: the same chain with f = 0), for both methods: the Girsanov
// weight of the discrete chain. A loss on the final augmented state sees the running costs,
// and the adjoint differentiates them exactly (including m_i's dependence on the noise).
//
// Nodes: forward-time chains have no log-SNR. sde_node(t, model_t) = Node{t, alpha = 1,
// sigma = 1, lambda = 0, model_t}; only t and model_t are read, and lambda is never used.
// The scheme is bound to its grid at construction (all coefficients precomputed, as the
// gDDIM schemes); validate(nodes) refuses any other node span; nodes() returns the grid.
//
// API (stable; additions only):
//   SdeScheme<B> scheme(backend, times, g, dim, SdeOptions{...});   // g: double or g(t)
//   scheme.nodes(), scheme.num_steps(), scheme.dim(), scheme.width(), scheme.times()
//   scheme.step_size(i), scheme.diffusion(i), scheme.decay(i), scheme.drift_weight(i),
//   scheme.noise_scale(i), scheme.step_of(node), scheme.node_at_lambda()
//   uniform_times(N, t0, t1), sde_node(t, model_t), sde_nodes(times, model_time_scale)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "diffgrad/backend/coefficient.hpp"
#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/schedule/node.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad::sde {

/// A node of a forward-time SDE grid: only t and model_t are meaningful (no log-SNR).
inline Node sde_node(double t, double model_t) { return Node{t, 1.0, 1.0, 0.0, model_t}; }

/// Checks a forward-time grid: at least 2 finite, strictly increasing times.
inline void validate_times(std::span<const double> times, const char* where) {
  detail::require(times.size() >= 2, where, "times", "at least 2 times (one step)",
                  static_cast<double>(times.size()));
  for (std::size_t i = 0; i < times.size(); ++i) {
    if (!std::isfinite(times[i]))
      detail::throw_argument(where, "times", "finite times",
                             detail::concat("times[", i, "] = ", times[i]));
    if (i > 0 && !(times[i] > times[i - 1]))
      detail::throw_argument(
          where, "times",
          detail::concat("strictly increasing times (forward time) after times[", i - 1,
                         "] = ", times[i - 1]),
          detail::concat("times[", i, "] = ", times[i]));
  }
}

/// Nodes of a forward-time grid; the model is called at model_t = model_time_scale * t.
inline std::vector<Node> sde_nodes(std::span<const double> times, double model_time_scale = 1.0) {
  validate_times(times, "sde_nodes");
  detail::require_finite(model_time_scale, "sde_nodes", "model_time_scale");
  std::vector<Node> nodes;
  nodes.reserve(times.size());
  for (double t : times) nodes.push_back(sde_node(t, model_time_scale * t));
  return nodes;
}

/// num_steps + 1 equally spaced times from t0 to t1 (the last exactly t1).
inline std::vector<double> uniform_times(int num_steps, double t0, double t1) {
  detail::require(num_steps >= 1, "uniform_times", "num_steps", "at least 1 step", num_steps);
  detail::require(std::isfinite(t0) && std::isfinite(t1) && t1 > t0, "uniform_times", "t1",
                  "a finite end time after t0", t1);
  std::vector<double> t(static_cast<std::size_t>(num_steps) + 1);
  for (int i = 0; i <= num_steps; ++i)
    t[static_cast<std::size_t>(i)] = t0 + (t1 - t0) * static_cast<double>(i) / num_steps;
  t.back() = t1;
  return t;
}

enum class SdeMethod {
  euler_maruyama, ///< x + h (-a x + f) + g sqrt(h) xi
  exponential,    ///< the OU part -a x integrated exactly, f frozen over the step
};

struct SdeOptions {
  SdeMethod method = SdeMethod::euler_maruyama;
  double ou_rate = 0.0;          ///< a >= 0 in dx = (-a x + f) dt + g dW
  double model_time_scale = 1.0; ///< the drift model is called at model_t = scale * t
  /// Append the two running-cost columns [K | M] (header comment): state width d + 2.
  bool running_costs = false;
};

namespace detail {
/// Forward-time schemes never ask for a node at a log-SNR.
struct NoLambdaMap {
  double t_of_lambda(double) const {
    throw std::logic_error("diffgrad::sde: a forward-time scheme asked for a node at a lambda");
  }
  Node node(double) const { return Node{}; }
};
inline const NoLambdaMap& no_lambda_map() {
  static const NoLambdaMap map{};
  return map;
}
} // namespace detail

/// Euler-Maruyama / exponential Euler for dx = (-a x + f) dt + g(t) dW on a fixed grid, as a
/// ColumnCoeff step-plan scheme (header comment). B is the backend whose memory holds the
/// per-step coefficient tables (host for EigenBackend, device for CudaBackend).
template <Backend B> class SdeScheme {
public:
  using Diffusion = std::function<double(double)>;
  static constexpr int kCostColumns = 2;

  SdeScheme(const B& backend, std::span<const double> times, Diffusion g, std::int64_t dim,
            SdeOptions options = {})
      : options_(options), dim_(dim), times_(times.begin(), times.end()) {
    const char* where = "SdeScheme";
    validate_times(times, where);
    diffgrad::detail::require(dim >= 1, where, "dim", "a state dimension >= 1",
                              static_cast<double>(dim));
    diffgrad::detail::require(static_cast<bool>(g), where, "g", "a diffusion function g(t)", 0.0);
    diffgrad::detail::require(options.ou_rate >= 0.0 && std::isfinite(options.ou_rate), where,
                              "options.ou_rate", "a finite rate a >= 0", options.ou_rate);
    nodes_ = sde_nodes(times, options.model_time_scale);
    width_ = dim + (options.running_costs ? kCostColumns : 0);
    const int n = num_steps();
    step_.resize(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
      const double t = times_[static_cast<std::size_t>(i)];
      const double h = times_[static_cast<std::size_t>(i) + 1] - t;
      const double gi = g(t);
      if (!(std::isfinite(gi) && gi >= 0.0))
        diffgrad::detail::throw_argument(where, "g", "finite values g(t) >= 0 on the grid",
                                         diffgrad::detail::concat("g(", t, ") = ", gi));
      if (options.running_costs && !(gi > 0.0))
        diffgrad::detail::throw_argument(
            where, "g", "g(t) > 0 on the grid (the running costs divide by the noise scale)",
            diffgrad::detail::concat("g(", t, ") = ", gi));
      Step s;
      s.h = h;
      s.g = gi;
      const double a = options.ou_rate;
      if (options.method == SdeMethod::exponential && a > 0.0) {
        s.decay = std::exp(-a * h);
        s.drift = -std::expm1(-a * h) / a;
        s.noise = gi * std::sqrt(-std::expm1(-2.0 * a * h) / (2.0 * a));
      } else {
        s.decay = 1.0 - a * h;
        s.drift = h;
        s.noise = gi * std::sqrt(h);
      }
      step_[static_cast<std::size_t>(i)] = s;
    }
    if (options.running_costs) {
      // One row of width W per step and coefficient: x columns first, then [K | M].
      const auto w = static_cast<std::size_t>(width_);
      std::vector<double> decay(w * static_cast<std::size_t>(n)), drift(decay.size()),
          noise(decay.size());
      for (int i = 0; i < n; ++i) {
        const Step& s = step_[static_cast<std::size_t>(i)];
        for (std::size_t k = 0; k < w; ++k) {
          const bool x_col = k < static_cast<std::size_t>(dim);
          const std::size_t at = static_cast<std::size_t>(i) * w + k;
          decay[at] = x_col ? s.decay : 1.0;
          drift[at] = x_col ? s.drift : 1.0;
          noise[at] = x_col ? s.noise : 0.0;
        }
      }
      decay_table_ = backend.make_coefficients(decay);
      drift_table_ = backend.make_coefficients(drift);
      noise_table_ = backend.make_coefficients(noise);
    }
  }

  SdeScheme(const B& backend, std::span<const double> times, double g, std::int64_t dim,
            SdeOptions options = {})
      : SdeScheme(backend, times, Diffusion([g](double) { return g; }), dim, options) {}

  // The scheme interface of the engine (solvers/step_plan.hpp).
  int order() const { return 1; }
  int history() const { return 0; }
  int stages() const { return 1; }
  bool stochastic() const { return true; }
  bool accepts_dim(std::int64_t w) const { return w == width_; }
  std::string dim_requirement() const {
    return options_.running_costs
               ? diffgrad::detail::concat(width_, " (d = ", dim_, " plus the 2 cost columns)")
               : diffgrad::detail::concat(width_, " (the SDE's dimension)");
  }

  /// Refuses any node span that is not this scheme's grid (size, every t and model_t).
  void validate(std::span<const Node> nodes) const {
    if (nodes.size() != nodes_.size())
      diffgrad::detail::throw_argument("SdeScheme", "nodes",
                                       diffgrad::detail::concat("the scheme's grid of ",
                                                                nodes_.size(), " nodes"),
                                       nodes.size());
    for (std::size_t i = 0; i < nodes.size(); ++i)
      if (nodes[i].t != nodes_[i].t || nodes[i].model_t != nodes_[i].model_t)
        diffgrad::detail::throw_argument(
            "SdeScheme", "nodes", "the scheme's grid (scheme.nodes())",
            diffgrad::detail::concat("nodes[", i, "] with t = ", nodes[i].t, ", model_t = ",
                                     nodes[i].model_t, " (grid: t = ", nodes_[i].t, ")"));
  }

  BasicStepPlan<ColumnCoeff> plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    const Step& s = step_[static_cast<std::size_t>(i)];
    BasicStepPlan<ColumnCoeff> p;
    p.stage_node[0] = nodes[static_cast<std::size_t>(i)];
    if (options_.running_costs) {
      const std::size_t row = static_cast<std::size_t>(i) * static_cast<std::size_t>(width_);
      p.output.x = ColumnCoeff{B::coefficient_data(decay_table_) + row, 1.0};
      p.output.e[0] = ColumnCoeff{B::coefficient_data(drift_table_) + row, 1.0};
      p.noise = s.noise == 0.0 ? ColumnCoeff{}
                               : ColumnCoeff{B::coefficient_data(noise_table_) + row, 1.0};
    } else {
      p.output.x = ColumnCoeff::scalar(s.decay);
      p.output.e[0] = ColumnCoeff::scalar(s.drift);
      p.noise = ColumnCoeff::scalar(s.noise);
    }
    return p;
  }

  std::span<const Node> nodes() const { return nodes_; }
  std::span<const double> times() const { return times_; }
  int num_steps() const { return static_cast<int>(times_.size()) - 1; }
  std::int64_t dim() const { return dim_; }     ///< d: the SDE's dimension
  std::int64_t width() const { return width_; } ///< the engine's state width (d or d + 2)
  bool running_costs() const { return options_.running_costs; }
  std::int64_t kinetic_column() const { return dim_; }    ///< K (with running costs)
  std::int64_t noise_column() const { return dim_ + 1; }  ///< M (with running costs)
  const SdeOptions& options() const { return options_; }
  double step_size(int i) const { return at(i).h; }
  double diffusion(int i) const { return at(i).g; }     ///< g(t_i)
  double decay(int i) const { return at(i).decay; }     ///< D_i
  double drift_weight(int i) const { return at(i).drift; } ///< c_i
  double noise_scale(int i) const { return at(i).noise; }  ///< s_i
  NodeAtLambda node_at_lambda() const { return NodeAtLambda(detail::no_lambda_map()); }

  /// The step whose start node is `n` (the drift adapters use it to regenerate xi_i).
  int step_of(const Node& n) const {
    const auto it = std::lower_bound(times_.begin(), times_.end() - 1, n.t);
    if (it == times_.end() - 1 || *it != n.t)
      throw std::logic_error(diffgrad::detail::concat(
          "diffgrad::sde: the drift was called at t = ", n.t, ", not a step start of the grid"));
    return static_cast<int>(it - times_.begin());
  }

private:
  struct Step {
    double h = 0, g = 0, decay = 1, drift = 0, noise = 0;
  };
  const Step& at(int i) const {
    diffgrad::detail::require(i >= 0 && i < num_steps(), "SdeScheme", "i",
                              "a step index in [0, num_steps)", i);
    return step_[static_cast<std::size_t>(i)];
  }

  SdeOptions options_;
  std::int64_t dim_ = 0, width_ = 0;
  std::vector<double> times_;
  std::vector<Node> nodes_;
  std::vector<Step> step_;
  typename B::coefficient_table decay_table_{}, drift_table_{}, noise_table_{};
};

} // namespace diffgrad::sde
