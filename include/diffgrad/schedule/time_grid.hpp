#pragma once
// Time grids: N steps = N + 1 times, decreasing from the noise end to the data end.
// Grid choice is independent of schedule and solver (the sampler x scheduler split).
#include <cmath>
#include <span>
#include <string>
#include <vector>

#include "diffgrad/concepts/schedule.hpp"
#include "diffgrad/core/error.hpp"

namespace diffgrad {

enum class GridKind { uniform_t, uniform_lambda, quadratic_t, karras };

namespace detail {
inline void check_steps(int num_steps, const char* where) {
  require(num_steps >= 1, where, "num_steps", "at least 1 step", num_steps);
}
template <class S> void check_span(const S& s, double t_start, double t_end, const char* where) {
  // t_end first: a NaN t_end also fails "t_start > t_end", which must not blame t_start.
  require(t_end >= s.t_min() * (1 - 1e-12), where, "t_end", concat("t_end >= t_min = ", s.t_min()),
          t_end);
  require(t_start <= s.t_max() * (1 + 1e-12) && t_start > t_end, where, "t_start",
          concat("t_end < t_start <= t_max = ", s.t_max()), t_start);
}
} // namespace detail

/// Uniform in t from t_start (noise) to t_end (data).
template <Schedule S>
std::vector<double> uniform_t_grid(const S& s, int num_steps, double t_start, double t_end) {
  detail::check_steps(num_steps, "uniform_t_grid");
  detail::check_span(s, t_start, t_end, "uniform_t_grid");
  std::vector<double> t(static_cast<std::size_t>(num_steps) + 1);
  for (int i = 0; i <= num_steps; ++i)
    t[static_cast<std::size_t>(i)] =
        t_start + (t_end - t_start) * static_cast<double>(i) / num_steps;
  t.back() = t_end;
  return t;
}

/// Uniform in lambda (log-SNR), DPM-Solver's "logSNR" skip type.
template <Schedule S>
std::vector<double> uniform_lambda_grid(const S& s, int num_steps, double t_start, double t_end) {
  detail::check_steps(num_steps, "uniform_lambda_grid");
  detail::check_span(s, t_start, t_end, "uniform_lambda_grid");
  const double l0 = s.lambda(t_start), l1 = s.lambda(t_end);
  std::vector<double> t(static_cast<std::size_t>(num_steps) + 1);
  for (int i = 0; i <= num_steps; ++i)
    t[static_cast<std::size_t>(i)] =
        s.t_of_lambda(l0 + (l1 - l0) * static_cast<double>(i) / num_steps);
  t.front() = t_start;
  t.back() = t_end;
  return t;
}

/// Uniform in sqrt(t), squared (DPM-Solver's "time_quadratic").
template <Schedule S>
std::vector<double> quadratic_t_grid(const S& s, int num_steps, double t_start, double t_end) {
  detail::check_steps(num_steps, "quadratic_t_grid");
  detail::check_span(s, t_start, t_end, "quadratic_t_grid");
  const double r0 = std::sqrt(t_start), r1 = std::sqrt(t_end);
  std::vector<double> t(static_cast<std::size_t>(num_steps) + 1);
  for (int i = 0; i <= num_steps; ++i) {
    const double r = r0 + (r1 - r0) * static_cast<double>(i) / num_steps;
    t[static_cast<std::size_t>(i)] = r * r;
  }
  t.front() = t_start;
  t.back() = t_end;
  return t;
}

/// Karras et al. (2022): uniform in rho_noise^(1/r) where rho_noise = sigma/alpha = e^-lambda,
/// r = 7 by default. For EDM (alpha = 1) this is the EDM sigma grid.
template <Schedule S>
std::vector<double> karras_grid(const S& s, int num_steps, double t_start, double t_end,
                                double rho = 7.0) {
  detail::check_steps(num_steps, "karras_grid");
  detail::check_span(s, t_start, t_end, "karras_grid");
  detail::require(rho > 0, "karras_grid", "rho", "rho > 0", rho);
  const double smax = std::exp(-s.lambda(t_start)), smin = std::exp(-s.lambda(t_end));
  const double a = std::pow(smax, 1.0 / rho), b = std::pow(smin, 1.0 / rho);
  std::vector<double> t(static_cast<std::size_t>(num_steps) + 1);
  for (int i = 0; i <= num_steps; ++i) {
    const double sig = std::pow(a + static_cast<double>(i) / num_steps * (b - a), rho);
    t[i] = s.t_of_lambda(-std::log(sig));
  }
  t.front() = t_start;
  t.back() = t_end;
  return t;
}

template <Schedule S>
std::vector<double> make_grid(const S& s, GridKind kind, int num_steps, double t_start,
                              double t_end) {
  switch (kind) {
  case GridKind::uniform_t: return uniform_t_grid(s, num_steps, t_start, t_end);
  case GridKind::uniform_lambda: return uniform_lambda_grid(s, num_steps, t_start, t_end);
  case GridKind::quadratic_t: return quadratic_t_grid(s, num_steps, t_start, t_end);
  case GridKind::karras: return karras_grid(s, num_steps, t_start, t_end);
  }
  detail::throw_argument("make_grid", "kind", "a GridKind", static_cast<int>(kind));
}
template <Schedule S> std::vector<double> make_grid(const S& s, GridKind kind, int num_steps) {
  return make_grid(s, kind, num_steps, s.t_max(), s.t_min());
}

/// Validates a grid of times (user-supplied or generated) and evaluates the schedule on it.
/// Requirements: at least 2 times, strictly decreasing (noise -> data), inside the domain.
template <Schedule S> std::vector<Node> make_nodes(const S& s, std::span<const double> times) {
  detail::require(times.size() >= 2, "make_nodes", "times", "at least 2 time points",
                  static_cast<double>(times.size()));
  std::vector<Node> nodes;
  nodes.reserve(times.size());
  for (std::size_t i = 0; i < times.size(); ++i) {
    detail::require_finite(times[i], "make_nodes", "times");
    if (i > 0 && !(times[i] < times[i - 1]))
      detail::throw_argument("make_nodes", "times",
                             detail::concat("strictly decreasing times (noise -> data); times[", i,
                                            "] = ", times[i], " follows ", times[i - 1]),
                             times[i]);
    nodes.push_back(s.node(times[i]));
  }
  return nodes;
}

/// Whether validate_nodes accepts a last step of zero length (equal lambda).
enum class ZeroLengthLastStep { refuse, identity };

/// Checks a node sequence built by hand: every node's alpha and sigma are numbers (not NaN) and
/// sigma >= 0, and lambda strictly increases (the sampling direction).
///
/// The one exception, taken only by schemes that pass ZeroLengthLastStep::identity: the LAST
/// step may have zero length (nodes[n].lambda == nodes[n - 1].lambda). Such a step is defined as
/// the exact flow over a zero lambda interval, x_t = (alpha_t/alpha_s) x_s (the identity on a VP
/// schedule), whatever the order: diffusers builds this node pair for use_karras_sigmas /
/// use_lu_lambdas with final_sigmas_type="sigma_min" (docs/compat_diffusers.md). A zero-length
/// step anywhere else would make the next step's finite differences divide by zero.
inline void validate_nodes(std::span<const Node> nodes, const char* where,
                           ZeroLengthLastStep zero_last = ZeroLengthLastStep::refuse) {
  detail::require(nodes.size() >= 2, where, "nodes", "at least 2 nodes",
                  static_cast<double>(nodes.size()));
  for (std::size_t i = 0; i < nodes.size(); ++i) {
    if (std::isnan(nodes[i].alpha))
      detail::throw_argument(
          where, "nodes", detail::concat("node ", i, ": alpha a number (not NaN)"), nodes[i].alpha);
    if (!(nodes[i].sigma >= 0.0))
      detail::throw_argument(where, "nodes",
                             detail::concat("node ", i, ": sigma >= 0 (not NaN, not negative)"),
                             nodes[i].sigma);
  }
  for (std::size_t i = 1; i < nodes.size(); ++i) {
    if (nodes[i].lambda > nodes[i - 1].lambda) continue;
    // (Two sigma = 0 nodes, lambda = +inf twice, are not a zero-length step: refused.)
    if (zero_last == ZeroLengthLastStep::identity && i + 1 == nodes.size() &&
        nodes[i].lambda == nodes[i - 1].lambda && std::isfinite(nodes[i].lambda))
      continue;
    detail::throw_argument(where, "nodes",
                           detail::concat("strictly increasing lambda (noise -> data) at node ", i,
                                          zero_last == ZeroLengthLastStep::identity
                                              ? " (equal lambda only for the last step)"
                                              : ""),
                           nodes[i].lambda);
  }
}

/// True when step i (nodes[i] -> nodes[i + 1]) has zero length (see validate_nodes).
inline bool is_zero_length_step(std::span<const Node> nodes, int i) {
  const auto k = static_cast<std::size_t>(i);
  return nodes[k + 1].lambda == nodes[k].lambda;
}

} // namespace diffgrad
