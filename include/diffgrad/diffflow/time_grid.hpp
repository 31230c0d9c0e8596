#pragma once
// Time grids of DiffFlow (Diffusion Normalizing Flow): N + 1 nodes t_0 < ... < t_N with the
// diffusion g_i = g(t_i) at every node.
//
// The power grid ("ExpTimer" of the reference implementation): with e the exponent,
//   t_i = ( t_s^e + (i / N) (t_e^e - t_s^e) )^(1/e),     i = 0..N,
// uniform in t^e. With e < 1 the steps GROW with i (small steps near the data, larger steps
// toward the noise end); e = 1 is the uniform grid. (The thesis writes t_i = (i/N)^e T with
// e = 0.9, whose steps shrink with i, contradicting its own description; the reference code's
// power 1/e matches the description, and that is what is implemented.)
//
// Random grids (the time-randomised loss): the end points stay fixed and each interior node
// t_i, i = 1..N-1, is drawn uniformly in t^e inside the i-th of N - 1 equal cells of
// [t_s^e, t_e^e] (one uniform per node from Philox keyed by (seed, draw)). Every random grid
// is strictly increasing; the fixed grid is NOT one of its draws (its nodes are at the cell
// boundaries of an N-cell grid).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "diffgrad/core/error.hpp"
#include "diffgrad/detail/philox.hpp"

namespace diffgrad::diffflow {

/// Nodes and per-node diffusion of one discretisation.
struct Grid {
  std::vector<double> t; ///< t_0 < t_1 < ... < t_N
  std::vector<double> g; ///< g_i = g(t_i) > 0, same length

  int steps() const { return static_cast<int>(t.size()) - 1; }
  double dt(int i) const { return t[static_cast<std::size_t>(i) + 1] - t[static_cast<std::size_t>(i)]; }

  /// Throws naming `where` unless t is strictly increasing with N >= 1, finite, and every g_i
  /// is finite and > 0.
  void validate(const char* where) const {
    namespace d = diffgrad::detail;
    if (t.size() < 2) d::throw_argument(where, "grid.t", "at least 2 nodes (N >= 1 steps)", t.size());
    if (g.size() != t.size())
      d::throw_argument(where, "grid.g", d::concat(t.size(), " values (one per node)"), g.size());
    for (std::size_t i = 0; i < t.size(); ++i) {
      d::require_finite(t[i], where, "grid.t");
      if (i > 0 && !(t[i] > t[i - 1]))
        d::throw_argument(where, "grid.t", d::concat("strictly increasing times (t[", i, "] > t[",
                                                     i - 1, "] = ", t[i - 1], ")"),
                          t[i]);
      if (!(g[i] > 0.0) || !std::isfinite(g[i]))
        d::throw_argument(where, "grid.g", d::concat("finite values > 0 (at node ", i, ")"), g[i]);
    }
  }
};

/// g as a function of t (constant for DiffFlow's toys; sqrt(beta(t)) for a VP baseline).
using DiffusionFn = std::function<double(double)>;

inline DiffusionFn constant_diffusion(double g) {
  diffgrad::detail::require(g > 0.0 && std::isfinite(g), "constant_diffusion", "g",
                            "a finite value > 0", g);
  return [g](double) { return g; };
}

/// The power ("exp") grid family on [t_start, t_end] with exponent e.
class PowerTimeGrid {
public:
  PowerTimeGrid(int steps, double t_start, double t_end, double exponent)
      : n_(steps), ts_(t_start), te_(t_end), e_(exponent) {
    namespace d = diffgrad::detail;
    const char* where = "PowerTimeGrid";
    d::require(steps >= 1, where, "steps", "at least 1 step", steps);
    d::require(t_start >= 0.0 && std::isfinite(t_start), where, "t_start", "a finite time >= 0",
               t_start);
    d::require(t_end > t_start && std::isfinite(t_end), where, "t_end",
               d::concat("a finite time > t_start = ", t_start), t_end);
    d::require(exponent > 0.0 && std::isfinite(exponent), where, "exponent", "a finite value > 0",
               exponent);
  }

  int steps() const { return n_; }
  double t_start() const { return ts_; }
  double t_end() const { return te_; }
  double exponent() const { return e_; }

  /// The fixed grid: N + 1 nodes uniform in t^e.
  std::vector<double> fixed() const {
    std::vector<double> t(static_cast<std::size_t>(n_) + 1);
    const double a = std::pow(ts_, e_), b = std::pow(te_, e_);
    for (int i = 0; i <= n_; ++i) t[static_cast<std::size_t>(i)] = power_inverse(a + (b - a) * i / n_);
    t.front() = ts_;
    t.back() = te_;
    return t;
  }

  /// A random grid: end points fixed, t_i (0 < i < N) uniform in t^e in the i-th of N - 1 equal
  /// cells of [t_start^e, t_end^e]. Reproducible: keyed by (seed, draw). For N = 1 it is the
  /// fixed grid.
  std::vector<double> random(std::uint64_t seed, std::uint64_t draw) const {
    std::vector<double> t(static_cast<std::size_t>(n_) + 1);
    t.front() = ts_;
    t.back() = te_;
    const double a = std::pow(ts_, e_), b = std::pow(te_, e_);
    for (int i = 1; i < n_; ++i) {
      const auto r = diffgrad::detail::philox4x32_10(
          diffgrad::detail::Philox4x32{{static_cast<std::uint32_t>(i),
                                        static_cast<std::uint32_t>(draw),
                                        static_cast<std::uint32_t>(draw >> 32),
                                        0x67726964u /* "grid" */}},
          seed);
      const double u = diffgrad::detail::uniform_open0(r.v[0], r.v[1]); // (0, 1]
      const double cell = (b - a) / (n_ - 1);
      // u in (0, 1]: the node lies in (lower, upper] of its cell; 1 - u would put it in
      // [lower, upper). Clamp away from the end points so the grid stays strictly increasing.
      double s = a + cell * ((i - 1) + u);
      if (i == n_ - 1) s = std::min(s, a + (b - a) * (1.0 - 1e-12));
      t[static_cast<std::size_t>(i)] = power_inverse(s);
    }
    return t;
  }

  /// A Grid with g evaluated at the nodes.
  Grid with_diffusion(std::vector<double> t, const DiffusionFn& g) const {
    Grid grid{std::move(t), {}};
    grid.g.reserve(grid.t.size());
    for (double ti : grid.t) grid.g.push_back(g(ti));
    grid.validate("PowerTimeGrid::with_diffusion");
    return grid;
  }

private:
  double power_inverse(double s) const { return std::pow(s, 1.0 / e_); }

  int n_;
  double ts_, te_, e_;
};

/// Each interval of `t` split into `parts` equal sub-intervals (for ODE integration on a grid
/// finer than the chain's).
inline std::vector<double> refine(const std::vector<double>& t, int parts) {
  diffgrad::detail::require(parts >= 1, "refine", "parts", "at least 1", parts);
  diffgrad::detail::require(t.size() >= 2, "refine", "t", "at least 2 times",
                            static_cast<double>(t.size()));
  std::vector<double> out;
  out.reserve((t.size() - 1) * static_cast<std::size_t>(parts) + 1);
  for (std::size_t i = 0; i + 1 < t.size(); ++i)
    for (int k = 0; k < parts; ++k) out.push_back(t[i] + (t[i + 1] - t[i]) * k / parts);
  out.push_back(t.back());
  return out;
}

} // namespace diffgrad::diffflow
