#pragma once
// Eigen-free helpers shared by the CUDA tests (.cu) and their CPU reference (cpu_reference.cpp):
// the test problems as plain host data, the catalog of every scheme of the library, and the
// error measures. The .cu side runs a case on CudaBackend, the .cpp side runs the SAME case
// (same catalog index, same host data) on EigenBackend; the two meet as std::vector<double>.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "diffgrad/flow/euler.hpp"
#include "diffgrad/flow/heun.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/deis.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/dpm_solver_singlestep.hpp"
#include "diffgrad/solvers/sde_dpm_solver.hpp"

namespace diffgrad::testing {

enum class Precision { f32, f64 };

/// Shape and grid of a CPU-vs-GPU case.
struct Problem {
  int batch = 6;
  int dim = 5;
  int steps = 9;          ///< diffusion steps (a multiple of 3: mixed-order lists cycle 3, 2, 1)
  double t_end = 1e-3;    ///< VP-linear grid uniform in t from 1 to t_end
  std::uint64_t seed = 7; ///< Philox seed of stochastic schemes
};

/// The problem of the structured-coefficient cases (structured_cases.hpp): an even width
/// (two halves [x | v]), a few steps.
inline Problem structured_problem() {
  Problem p;
  p.batch = 5;
  p.dim = 6;
  p.steps = 6;
  return p;
}

/// A fixed, non-symmetric batch of "noise" states (row-major batch x dim).
inline std::vector<double> problem_x_T(int batch, int dim) {
  std::vector<double> x(static_cast<std::size_t>(batch) * static_cast<std::size_t>(dim));
  for (std::size_t i = 0; i < x.size(); ++i)
    x[i] = std::sin(1.3 * static_cast<double>(i) + 0.7) * 1.5;
  return x;
}

/// The Gaussian data mean, repeated on every row (the backend models take it as a state).
inline std::vector<double> problem_mu_rows(int batch, int dim) {
  std::vector<double> mu(static_cast<std::size_t>(batch) * static_cast<std::size_t>(dim));
  for (int b = 0; b < batch; ++b)
    for (int j = 0; j < dim; ++j)
      mu[static_cast<std::size_t>(b * dim + j)] = 0.5 - 0.3 * static_cast<double>(j);
  return mu;
}
inline constexpr double kGaussianStd = 0.2;

/// K points of dimension d for the Dirac mixture (row-major), and their weights.
inline std::vector<double> problem_points(int k, int dim) {
  std::vector<double> y(static_cast<std::size_t>(k) * static_cast<std::size_t>(dim));
  for (std::size_t i = 0; i < y.size(); ++i) y[i] = std::cos(0.9 * static_cast<double>(i) + 0.3);
  return y;
}
inline std::vector<double> problem_weights(int k) {
  std::vector<double> w(static_cast<std::size_t>(k));
  for (int i = 0; i < k; ++i)
    w[static_cast<std::size_t>(i)] = 1.0 + 0.25 * static_cast<double>(i % 3);
  return w;
}

inline const VPLinearSchedule& vp_schedule() {
  static const VPLinearSchedule schedule;
  return schedule;
}
inline std::vector<Node> diffusion_nodes(const Problem& p) {
  return make_nodes(vp_schedule(), uniform_t_grid(vp_schedule(), p.steps, 1.0, p.t_end));
}
/// Flow times 0 -> 0.95 (the exact Gaussian flow is smooth there).
inline std::vector<double> flow_times(const Problem& p) {
  return uniform_flow_grid(p.steps, 0.0, 0.95);
}

/// Every scheme of the library: f(name, scheme, is_flow). Stochastic schemes use Philox
/// noise keyed by Problem::seed (so the engine's noise path is compared too).
template <class F> void for_each_scheme(int steps, F&& f) {
  using P = SolverPrediction;
  std::vector<int> mixed_orders;
  for (int i = 0; i < steps; ++i) mixed_orders.push_back(3 - i % 3);
  f(std::string("DDIM"), Ddim(), false);
  f(std::string("DDIM eta=1"), Ddim(1.0), false);
  for (int k = 1; k <= 3; ++k) {
    f("DpmSolverSinglestep-" + std::to_string(k) + " data", DpmSolverSinglestep(k, P::data), false);
    f("DpmSolverSinglestep-" + std::to_string(k) + " noise", DpmSolverSinglestep(k, P::noise),
      false);
  }
  f(std::string("DpmSolverSinglestep mixed orders"),
    DpmSolverSinglestep(DpmSolverSinglestep::Options{.order = 3, .orders = mixed_orders}), false);
  f(std::string("DpmSolverSinglestep::diffusers 3"),
    DpmSolverSinglestep::diffusers({.solver_order = 3}), false);
  for (int k = 2; k <= 3; ++k) {
    f("DpmSolverMultistep-" + std::to_string(k) + " data", DpmSolverMultistep(k, P::data), false);
    f("DpmSolverMultistep-" + std::to_string(k) + " noise", DpmSolverMultistep(k, P::noise), false);
  }
  for (int k = 1; k <= 3; ++k)
    f("SdeDpmSolver-" + std::to_string(k) + " data", SdeDpmSolver(k, P::data), false);
  f(std::string("SdeDpmSolver-2 noise"), SdeDpmSolver(2, P::noise), false);
  for (int r = 1; r <= 3; ++r) {
    f("DeisTab-" + std::to_string(r), DeisTab(r), false);
    f("DeisRhoAb-" + std::to_string(r), DeisRhoAb(r), false);
  }
  f(std::string("DeisLogRho-3"), DeisLogRho(3), false);
  for (int k = 2; k <= 4; ++k) f("IPndm-" + std::to_string(k), IPndm(k), false);
  f(std::string("DeisRhoRk heun2"), DeisRhoRk(DeisRkMethod::heun2), false);
  f(std::string("DeisRhoRk kutta3"), DeisRhoRk(DeisRkMethod::kutta3), false);
  f(std::string("DeisRhoRk rk4"), DeisRhoRk(DeisRkMethod::rk4), false);
  f(std::string("FlowEuler"), FlowEuler(), true);
  f(std::string("FlowHeun"), FlowHeun(), true);
  f(std::string("FlowHeun final Euler"), FlowHeun(true), true);
}

inline int scheme_count(int steps) {
  int n = 0;
  for_each_scheme(steps, [&](const std::string&, const auto&, bool) { ++n; });
  return n;
}

/// Calls f(name, scheme, is_flow) for catalog entry `index`.
template <class F> void with_scheme(int index, int steps, F&& f) {
  int i = 0;
  for_each_scheme(steps, [&](const std::string& name, const auto& scheme, bool flow) {
    if (i++ == index) f(name, scheme, flow);
  });
}

/// max_i |a_i - b_i| / max_i |b_i| (b: the CPU reference).
inline double max_relative_error(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return INFINITY;
  double diff = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::fabs(a[i] - b[i]));
    scale = std::max(scale, std::fabs(b[i]));
  }
  return scale > 0.0 ? diff / scale : diff;
}

/// Number of elements that differ in any bit.
inline std::size_t bitwise_mismatches(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return std::max(a.size(), b.size());
  std::size_t n = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!(a[i] == b[i] || (std::isnan(a[i]) && std::isnan(b[i])))) ++n;
  return n;
}

/// CPU-vs-GPU tolerance of the issue: 1e-12 relative in float64, 1e-5 in float32.
inline double agreement_tolerance(Precision p) { return p == Precision::f64 ? 1e-12 : 1e-5; }

} // namespace diffgrad::testing
