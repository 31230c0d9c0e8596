#pragma once
// Multistep DPM-Solver (noise prediction) and DPM-Solver++ 2M/3M (data prediction), orders
// 1-3, on any (non-uniform) grid: one model call per step, the derivative estimates come
// from the model values of the last one or two steps (official DPM-Solver code and diffusers'
// DPMSolverMultistepScheduler use the same formulas; coeffs/dpm_solver.hpp).
//
// Order schedule of step i of N (0-based), in this precedence:
//   - a step into a sigma = 0 node (diffusers' final_sigmas_type "zero") is first order;
//   - euler_at_final: the last step is first order;
//   - lower_order_final and N < lower_order_final_max_steps: the last step is first order,
//     the one before at most second order (diffusers: 15; the official code: 10);
//   - warm-up: step i uses at most order i + 1 (no history before).
//
// Third order: by default the update is the consistent one (D2 weighted so the update is
// exact for quadratic model values, globally third order). The official code and diffusers
// weight D2 by half (ReferenceQuirks::multistep_half_d2), which is globally second order;
// `diffusers(...)` reproduces that.
#include <algorithm>
#include <span>
#include <string>

#include "diffgrad/coeffs/dpm_solver.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad {

namespace detail {

/// Everything a multistep DPM-Solver plan depends on (shared by DpmSolverMultistep and
/// SdeDpmSolver).
struct DpmMultistepConfig {
  coeffs::dpm::Integrand integrand = coeffs::dpm::Integrand::ode_data;
  int order = 2;
  DpmSolverType solver_type = DpmSolverType::midpoint;
  bool lower_order_final = true;
  int lower_order_final_max_steps = 15;
  bool euler_at_final = false;
  coeffs::dpm::ReferenceQuirks quirks{};
  /// Steps of the full run before nodes[0] (a run started partway, diffusers' set_begin_index):
  /// the warm-up restarts, but lower_order_final counts the full run's steps.
  int steps_before = 0;
};

inline void check_dpm_multistep_config(const DpmMultistepConfig& c, const char* where,
                                       int max_order, const char* order_note = "") {
  require(c.order >= 1 && c.order <= max_order, where, "order",
          concat(max_order == 3 ? "1, 2 or 3" : "1 or 2", order_note), c.order);
  if (c.solver_type != DpmSolverType::midpoint && c.solver_type != DpmSolverType::heun)
    throw_argument(where, "solver_type", "midpoint (dpmsolver) or heun (taylor)",
                   static_cast<int>(c.solver_type));
  require(c.lower_order_final_max_steps >= 0, where, "lower_order_final_max_steps",
          "a step count >= 0 (lower order final steps apply when num_steps is below it)",
          c.lower_order_final_max_steps);
}

inline int dpm_multistep_order(const DpmMultistepConfig& c, std::span<const Node> nodes, int i) {
  if (coeffs::dpm::is_terminal(nodes[static_cast<std::size_t>(i) + 1])) return 1;
  if (is_zero_length_step(nodes, i)) return 1; // the exact flow: no derivative to estimate
  // n, j: the full run's step count and this step's index in it.
  const int n = static_cast<int>(nodes.size()) - 1 + c.steps_before, j = i + c.steps_before;
  const bool few_steps = c.lower_order_final && n < c.lower_order_final_max_steps;
  if (j == n - 1 && (c.euler_at_final || few_steps)) return 1;
  int k = std::min(c.order, i + 1);
  if (j == n - 2 && few_steps) k = std::min(k, 2);
  return k;
}

/// Adds w * m(node), the model value of step i - 1 - hist (hist = -1: the current step).
inline void add_multistep_model_value(const DpmMultistepConfig& c, Combo& combo, int hist,
                                      const Node& node, double w) {
  if (w == 0.0) return;
  const bool data = coeffs::dpm::predicts_data(c.integrand);
  if (hist < 0) {
    if (data)
      add_data_prediction_stage(combo, 0, node, w);
    else
      combo.e[0] += w;
  } else {
    if (data)
      add_data_prediction_history(combo, hist, node, w);
    else
      combo.hist_e[hist] += w;
  }
}

inline StepPlan dpm_multistep_plan(const DpmMultistepConfig& c, std::span<const Node> nodes,
                                   int i) {
  const int k = dpm_multistep_order(c, nodes, i);
  const auto at = [&](int j) -> const Node& { return nodes[static_cast<std::size_t>(j)]; };
  const Node& s0 = at(i);
  const Node& t = at(i + 1);
  // Unused nodes (order < 3) are passed as s0; multistep_update does not read them.
  const Node& s1 = k >= 2 ? at(i - 1) : s0;
  const Node& s2 = k >= 3 ? at(i - 2) : s0;
  const auto u =
      coeffs::dpm::multistep_update(c.integrand, k, c.solver_type, s0, s1, s2, t, c.quirks);
  StepPlan p;
  p.stage_node[0] = s0;
  p.output.x = u.x;
  add_multistep_model_value(c, p.output, -1, s0, u.m[0]);
  if (k >= 2) add_multistep_model_value(c, p.output, 0, s1, u.m[1]);
  if (k >= 3) add_multistep_model_value(c, p.output, 1, s2, u.m[2]);
  p.noise = u.noise;
  return p;
}

} // namespace detail

class DpmSolverMultistep {
public:
  struct Options {
    int order = 2;                                        ///< 1, 2 or 3
    SolverPrediction prediction = SolverPrediction::data; ///< data: DPM-Solver++ (2M/3M)
    DpmSolverType solver_type = DpmSolverType::midpoint;  ///< order 2 only (see file comment)
    bool lower_order_final = true;
    int lower_order_final_max_steps = 15; ///< lower_order_final applies when num_steps < this
    bool euler_at_final = false;
    coeffs::dpm::ReferenceQuirks quirks{}; ///< reproduce reference-code deviations
  };

  /// diffusers' DPMSolverMultistepScheduler options that change numbers (their defaults).
  /// final_sigmas_type is the node choice (last node sigma = 0 <=> "zero"). The SDE
  /// algorithm types are SdeDpmSolver::diffusers.
  struct DiffusersOptions {
    int solver_order = 2;
    DpmAlgorithm algorithm_type = DpmAlgorithm::dpmsolver_pp;
    DpmSolverType solver_type = DpmSolverType::midpoint;
    bool lower_order_final = true;
    bool euler_at_final = false;
  };

  DpmSolverMultistep() : DpmSolverMultistep(Options{}) {}
  explicit DpmSolverMultistep(const Options& o) : config_(to_config(o)) {
    detail::check_dpm_multistep_config(config_, "DpmSolverMultistep", 3);
  }
  DpmSolverMultistep(int order, SolverPrediction prediction,
                     DpmSolverType solver_type = DpmSolverType::midpoint)
      : DpmSolverMultistep(Options{order, prediction, solver_type, true, 15, false, {}}) {}

  static DpmSolverMultistep diffusers(const DiffusersOptions& d) {
    if (coeffs::dpm::is_sde(coeffs::dpm::integrand_of(d.algorithm_type)))
      detail::throw_argument("DpmSolverMultistep::diffusers", "algorithm_type",
                             "dpmsolver or dpmsolver++ (the sde-* types are "
                             "SdeDpmSolver::diffusers)",
                             d.algorithm_type == DpmAlgorithm::sde_dpmsolver ? "sde-dpmsolver"
                                                                             : "sde-dpmsolver++");
    Options o;
    o.order = d.solver_order;
    o.prediction = d.algorithm_type == DpmAlgorithm::dpmsolver ? SolverPrediction::noise
                                                               : SolverPrediction::data;
    o.solver_type = d.solver_type;
    o.lower_order_final = d.lower_order_final;
    o.lower_order_final_max_steps = 15;
    o.euler_at_final = d.euler_at_final;
    o.quirks.multistep_half_d2 = true;
    return DpmSolverMultistep(o);
  }

  const detail::DpmMultistepConfig& config() const { return config_; }
  /// The same scheme for a run that starts at step `start_index` of a longer one (see
  /// DpmMultistepConfig::steps_before).
  DpmSolverMultistep start_at(int start_index) const {
    detail::require(start_index >= 0, "DpmSolverMultistep::start_at", "start_index", ">= 0",
                    start_index);
    DpmSolverMultistep s = *this;
    s.config_.steps_before = start_index;
    return s;
  }
  int history() const { return config_.order - 1; }
  int stages() const { return 1; }
  bool stochastic() const { return false; }
  void validate(std::span<const Node> nodes) const {
    validate_nodes(nodes, "DpmSolverMultistep", ZeroLengthLastStep::identity);
  }
  /// The order step i actually uses.
  int step_order(std::span<const Node> nodes, int i) const {
    return detail::dpm_multistep_order(config_, nodes, i);
  }
  StepPlan plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    return detail::dpm_multistep_plan(config_, nodes, i);
  }

private:
  static detail::DpmMultistepConfig to_config(const Options& o) {
    detail::DpmMultistepConfig c;
    c.integrand = o.prediction == SolverPrediction::data ? coeffs::dpm::Integrand::ode_data
                                                         : coeffs::dpm::Integrand::ode_noise;
    c.order = o.order;
    c.solver_type = o.solver_type;
    c.lower_order_final = o.lower_order_final;
    c.lower_order_final_max_steps = o.lower_order_final_max_steps;
    c.euler_at_final = o.euler_at_final;
    c.quirks = o.quirks;
    return c;
  }
  detail::DpmMultistepConfig config_;
};

} // namespace diffgrad
