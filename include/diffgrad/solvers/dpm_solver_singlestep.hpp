#pragma once
// Singlestep DPM-Solver (noise prediction, Lu et al. 2022) and DPM-Solver++ (data
// prediction), orders 1-3, in two structures:
//
// 1. Official (LuChengTHU/dpm-solver): every grid interval s -> t is one update of order k
//    with k - 1 intermediate model evaluations at lambda_s + r h (r1 = 1/2 for order 2;
//    r1 = 1/3, r2 = 2/3 for order 3), placed by the schedule (NodeAtLambda). Optional per-step
//    orders give the official "DPM-Solver-fast" mix (official_fast_orders).
// 2. diffusers (DPMSolverSinglestepScheduler): the intermediate points are grid nodes. An
//    order list [1, 2, 3, 1, 2, 3, ...] decides: a step with order 1 starts a group at its
//    node a; the step with order k (k >= 2) in the group updates x_a -> x_{i+1} with the model
//    values at nodes a..i. In plan form this reads x_a from the history (coefficient 0 on x_i
//    for noise prediction), so every step costs one model call and needs no extra nodes.
//
// Formulas: coeffs/dpm_solver.hpp. A step into a sigma = 0 node is always first order.
#include <algorithm>
#include <cmath>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "diffgrad/coeffs/dpm_solver.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad {

class DpmSolverSinglestep {
public:
  struct Options {
    int order = 2;                                        ///< 1, 2 or 3
    SolverPrediction prediction = SolverPrediction::data; ///< data: DPM-Solver++
    DpmSolverType solver_type = DpmSolverType::midpoint;  ///< midpoint = official "dpmsolver"
    std::optional<double> r1{}; ///< first intermediate point; default 1/2 (order 2), 1/3 (order 3)
    std::optional<double> r2{}; ///< second intermediate point (order 3); default 2/3
    /// Per-step orders (one per grid interval), e.g. official_fast_orders(nfe, 3). Empty: every
    /// step has `order`. Steps of order 2 use r1 (default 1/2), order 3 use r1, r2.
    std::vector<int> orders{};
  };

  /// diffusers' DPMSolverSinglestepScheduler options that change numbers (their defaults).
  /// final_sigmas_type is the node choice: a last node with sigma = 0 (terminal_data_node) is
  /// "zero", anything else is "sigma_min"; "zero" forces lower_order_final and a first-order
  /// last step, as diffusers does.
  struct DiffusersOptions {
    int solver_order = 2;
    DpmAlgorithm algorithm_type = DpmAlgorithm::dpmsolver_pp; ///< no sde_dpmsolver in diffusers
    DpmSolverType solver_type = DpmSolverType::midpoint;
    bool lower_order_final = false; ///< forced on when num_steps % solver_order != 0
  };

  DpmSolverSinglestep() : DpmSolverSinglestep(Options{}) {}
  explicit DpmSolverSinglestep(Options options) : options_(std::move(options)) {
    const char* where = "DpmSolverSinglestep";
    check_order(options_.order, where, "order");
    for (int k : options_.orders) check_order(k, where, "orders[i]");
    check_type(options_.solver_type, where);
    stages_ = options_.orders.empty()
                  ? options_.order
                  : *std::max_element(options_.orders.begin(), options_.orders.end());
    r2_order3_ = options_.r2.value_or(2.0 / 3.0);
    r1_order3_ = options_.r1.value_or(1.0 / 3.0);
    r1_order2_ = options_.r1.value_or(0.5);
    if (uses_order(2))
      detail::require(r1_order2_ > 0.0 && r1_order2_ <= 1.0, where, "r1",
                      "0 < r1 <= 1 for a second-order step", r1_order2_);
    if (uses_order(3)) {
      detail::require(r1_order3_ > 0.0 && r1_order3_ < r2_order3_, where, "r1",
                      detail::concat("0 < r1 < r2 = ", r2_order3_, " for a third-order step"),
                      r1_order3_);
      detail::require(r2_order3_ <= 1.0, where, "r2", "r1 < r2 <= 1 for a third-order step",
                      r2_order3_);
    }
    if (options_.r2 && !uses_order(3))
      detail::throw_argument(where, "r2", "no value unless a step has order 3", *options_.r2);
  }
  DpmSolverSinglestep(int order, SolverPrediction prediction,
                      DpmSolverType solver_type = DpmSolverType::midpoint)
      : DpmSolverSinglestep(Options{order, prediction, solver_type, {}, {}, {}}) {}

  /// The diffusers structure (see the file comment), number for number.
  static DpmSolverSinglestep diffusers(const DiffusersOptions& d) {
    const char* where = "DpmSolverSinglestep::diffusers";
    check_order(d.solver_order, where, "solver_order");
    check_type(d.solver_type, where);
    if (d.algorithm_type == DpmAlgorithm::sde_dpmsolver)
      detail::throw_argument(where, "algorithm_type",
                             "dpmsolver, dpmsolver++ or sde-dpmsolver++ (diffusers' singlestep "
                             "scheduler has no sde-dpmsolver)",
                             "sde-dpmsolver");
    DpmSolverSinglestep s(
        Options{d.solver_order,
                coeffs::dpm::predicts_data(coeffs::dpm::integrand_of(d.algorithm_type))
                    ? SolverPrediction::data
                    : SolverPrediction::noise,
                d.solver_type,
                {},
                {},
                {}});
    s.diffusers_ = true;
    s.diffusers_lower_order_final_ = d.lower_order_final;
    s.integrand_ = coeffs::dpm::integrand_of(d.algorithm_type);
    // diffusers reproduces its own 3rd-order sde-dpmsolver++ D2 weight (ReferenceQuirks).
    s.quirks_.sde_d2_minus_alpha = true;
    s.stages_ = 1;
    return s;
  }

  /// The official code's "DPM-Solver-fast" order mix for a budget of `nfe` model calls
  /// (get_orders_and_timesteps_for_singlestep_solver): order 3 -> [3, ..., 3, 2, 1] /
  /// [3, ..., 1] / [3, ..., 2] for nfe % 3 = 0 / 1 / 2; order 2 -> [2, ..., 2(, 1)]. Use a grid
  /// with orders.size() intervals (the official code: uniform in lambda for skip_type logSNR).
  static std::vector<int> official_fast_orders(int nfe, int order) {
    const char* where = "DpmSolverSinglestep::official_fast_orders";
    check_order(order, where, "order");
    detail::require(nfe >= order, where, "nfe", detail::concat("nfe >= order = ", order), nfe);
    std::vector<int> orders;
    if (order == 1) return std::vector<int>(static_cast<std::size_t>(nfe), 1);
    if (order == 2) {
      orders.assign(static_cast<std::size_t>(nfe / 2), 2);
      if (nfe % 2 == 1) orders.push_back(1);
      return orders;
    }
    const int k = nfe / 3 + 1;
    if (nfe % 3 == 0) {
      orders.assign(static_cast<std::size_t>(k - 2), 3);
      orders.push_back(2);
      orders.push_back(1);
    } else {
      orders.assign(static_cast<std::size_t>(k - 1), 3);
      orders.push_back(nfe % 3 == 1 ? 1 : 2);
    }
    return orders;
  }

  const Options& options() const { return options_; }
  bool is_diffusers() const { return diffusers_; }
  int history() const { return diffusers_ ? options_.order - 1 : 0; }
  int stages() const { return stages_; }
  bool stochastic() const { return coeffs::dpm::is_sde(integrand_); }

  void validate(std::span<const Node> nodes) const {
    validate_nodes(nodes, "DpmSolverSinglestep", ZeroLengthLastStep::identity);
    const auto num_steps = nodes.size() - 1;
    if (!diffusers_ && !options_.orders.empty() && options_.orders.size() != num_steps)
      detail::throw_argument("DpmSolverSinglestep", "nodes",
                             detail::concat("one grid interval per entry of options.orders (",
                                            options_.orders.size(), ")"),
                             num_steps);
  }

  /// The same scheme (diffusers structure) for a run that starts at step `start_index` of a
  /// longer run (diffusers' set_begin_index): step i uses the FULL run's order list entry
  /// start_index + i, capped at i + 1 because no model value precedes the start (diffusers
  /// lowers the order while model_outputs[-order] is None; a group then starts at the start).
  DpmSolverSinglestep start_at(int start_index) const {
    detail::require(start_index >= 0, "DpmSolverSinglestep::start_at", "start_index", ">= 0",
                    start_index);
    if (!diffusers_ && start_index > 0)
      detail::throw_argument("DpmSolverSinglestep::start_at", "start_index",
                             "0 for the official structure (slice options.orders and the grid "
                             "instead)",
                             start_index);
    DpmSolverSinglestep s = *this;
    s.steps_before_ = start_index;
    return s;
  }

  /// The order step i actually uses (lower-order rules and the sigma = 0 final node applied).
  int step_order(std::span<const Node> nodes, int i) const {
    const int num_steps = static_cast<int>(nodes.size()) - 1;
    if (coeffs::dpm::is_terminal(nodes[static_cast<std::size_t>(i) + 1])) return 1;
    if (!diffusers_) {
      // A zero-length last step: the exact flow, no intermediate points to evaluate. (In the
      // diffusers structure a group's last step starts at the group's first node instead.)
      if (is_zero_length_step(nodes, i)) return 1;
      return options_.orders.empty() ? options_.order
                                     : options_.orders[static_cast<std::size_t>(i)];
    }
    return std::min(diffusers_order(num_steps + steps_before_, i + steps_before_,
                                    coeffs::dpm::is_terminal(nodes.back())),
                    i + 1);
  }

  StepPlan plan(std::span<const Node> nodes, int i, NodeAtLambda node_at_lambda) const {
    const int k = step_order(nodes, i);
    return diffusers_ ? diffusers_plan(nodes, i, k) : official_plan(nodes, i, k, node_at_lambda);
  }

private:
  static void check_order(int order, const char* where, const char* arg) {
    detail::require(order >= 1 && order <= 3, where, arg, "1, 2 or 3", order);
  }
  static void check_type(DpmSolverType type, const char* where) {
    if (type != DpmSolverType::midpoint && type != DpmSolverType::heun)
      detail::throw_argument(where, "solver_type", "midpoint (dpmsolver) or heun (taylor)",
                             static_cast<int>(type));
  }
  bool uses_order(int k) const {
    if (options_.orders.empty()) return options_.order == k;
    for (int o : options_.orders)
      if (o == k) return true;
    return false;
  }

  /// diffusers' get_order_list(num_steps)[i], with set_timesteps' forcing of
  /// lower_order_final (uneven step count or final sigma zero) and orders[-1] = 1 for "zero".
  int diffusers_order(int n, int i, bool final_zero) const {
    const int order = options_.order;
    const bool lower_final = diffusers_lower_order_final_ || n % order != 0 || final_zero;
    int k = i % order + 1; // the repeating [1, 2, .., order]
    if (lower_final) {
      if (order == 3 && n % 3 == 0) {
        if (i == n - 3) k = 1;
        if (i == n - 2) k = 2;
        if (i == n - 1) k = 1;
      } else if (order == 3 && n % 3 == 1) {
        if (i == n - 1) k = 1;
      } else if (order == 2 && n % 2 == 0) {
        if (i >= n - 2) k = 1;
      }
    }
    if (final_zero && i == n - 1) k = 1;
    return k;
  }

  /// Adds w * m(node) to c, where the model value of `node` sits at stage `stage` (>= 0) or
  /// history slot `hist` (>= 0): eps directly, or x0 = (u - sigma e)/alpha expanded.
  void add_model_value(Combo& c, int stage, int hist, const Node& node, double w) const {
    if (w == 0.0) return;
    const bool data = coeffs::dpm::predicts_data(integrand_);
    if (stage >= 0) {
      if (data)
        add_data_prediction_stage(c, stage, node, w);
      else
        c.e[stage] += w;
    } else {
      if (data)
        add_data_prediction_history(c, hist, node, w);
      else
        c.hist_e[hist] += w;
    }
  }

  StepPlan official_plan(std::span<const Node> nodes, int i, int k,
                         NodeAtLambda node_at_lambda) const {
    const Node& s = nodes[static_cast<std::size_t>(i)];
    const Node& t = nodes[static_cast<std::size_t>(i) + 1];
    StepPlan p;
    p.num_stages = k;
    p.stage_node[0] = s;
    coeffs::dpm::UpdateWeights out;
    if (k == 1) {
      out = coeffs::dpm::first_order_update(integrand_, s, t);
    } else {
      const double r1 = k == 2 ? r1_order2_ : r1_order3_;
      const double r2 = k == 3 ? r2_order3_ : 0.0;
      const double h = coeffs::step_h(s, t);
      p.stage_node[1] = node_at_lambda(s.lambda + r1 * h);
      const auto u1 = coeffs::dpm::first_order_update(integrand_, s, p.stage_node[1]);
      p.stage_input[1].x = u1.x;
      add_model_value(p.stage_input[1], 0, -1, s, u1.m[0]);
      if (k == 3) {
        p.stage_node[2] = node_at_lambda(s.lambda + r2 * h);
        const auto u2 =
            coeffs::dpm::singlestep_third_order_stage2(integrand_, s, p.stage_node[2], r1, r2);
        p.stage_input[2].x = u2.x;
        add_model_value(p.stage_input[2], 0, -1, s, u2.m[0]);
        add_model_value(p.stage_input[2], 1, -1, p.stage_node[1], u2.m[1]);
      }
      out = coeffs::dpm::singlestep_update(integrand_, k, options_.solver_type, s, t, r1, r2,
                                           quirks_);
    }
    p.output.x += out.x;
    for (int j = 0; j < k; ++j) add_model_value(p.output, j, -1, p.stage_node[j], out.m[j]);
    p.noise = out.noise;
    return p;
  }

  StepPlan diffusers_plan(std::span<const Node> nodes, int i, int k) const {
    // Group start a = i - k + 1; model value at node a + j sits at stage 0 if a + j == i,
    // else in history slot i - 1 - (a + j).
    const int a = i - k + 1;
    const Node& start = nodes[static_cast<std::size_t>(a)];
    const Node& t = nodes[static_cast<std::size_t>(i) + 1];
    StepPlan p;
    p.stage_node[0] = nodes[static_cast<std::size_t>(i)];
    coeffs::dpm::UpdateWeights out;
    if (k == 1) {
      out = coeffs::dpm::first_order_update(integrand_, start, t);
    } else {
      const double h = coeffs::step_h(start, t);
      const double r1 = (nodes[static_cast<std::size_t>(a) + 1].lambda - start.lambda) / h;
      const double r2 =
          k == 3 ? (nodes[static_cast<std::size_t>(a) + 2].lambda - start.lambda) / h : 0.0;
      out = coeffs::dpm::singlestep_update(integrand_, k, options_.solver_type, start, t, r1, r2,
                                           quirks_);
    }
    if (a == i)
      p.output.x += out.x;
    else
      p.output.hist_x[i - 1 - a] += out.x;
    for (int j = 0; j < k; ++j) {
      const int n = a + j;
      add_model_value(p.output, n == i ? 0 : -1, n == i ? -1 : i - 1 - n,
                      nodes[static_cast<std::size_t>(n)], out.m[j]);
    }
    p.noise = out.noise;
    return p;
  }

  Options options_;
  coeffs::dpm::Integrand integrand_ = options_.prediction == SolverPrediction::data
                                          ? coeffs::dpm::Integrand::ode_data
                                          : coeffs::dpm::Integrand::ode_noise;
  coeffs::dpm::ReferenceQuirks quirks_{};
  bool diffusers_ = false;
  bool diffusers_lower_order_final_ = false;
  int steps_before_ = 0;
  int stages_ = 1;
  double r1_order2_ = 0.5, r1_order3_ = 1.0 / 3.0, r2_order3_ = 2.0 / 3.0;
};

} // namespace diffgrad
