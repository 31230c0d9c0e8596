#pragma once
// Stochastic DPM-Solvers: discretizations of the reverse diffusion SDE with the same
// exponential-integrator structure as the ODE solvers, plus fresh Gaussian noise each step
// (drawn by the engine: Philox keyed by (seed, step i, element index)).
//
//   SDE-DPM-Solver++ (data prediction), orders 1, 2 (2M), 3 (3M), multistep:
//     x_t = (sigma_t/sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) x0_s + ...
//           + sigma_t sqrt(1 - e^{-2h}) xi
//   SDE-DPM-Solver (noise prediction), orders 1, 2 (diffusers' "sde-dpmsolver"); order 1 is
//     x_t = (alpha_t/alpha_s) x_s - 2 sigma_t (e^h - 1) eps_s + sigma_t sqrt(e^{2h} - 1) xi
//     exactly (coeffs::dpm::sde_dpm_solver_1; Cycle-SDE recovers xi from it).
// The second-order types and the warm-up / final-step order rules are DpmSolverMultistep's.
// Into a sigma = 0 node the step is first order; the data form lands on x0 exactly, the noise
// form stays finite (its noise coefficient tends to alpha_t sigma_s / alpha_s, not 0).
#include <span>

#include "diffgrad/coeffs/dpm_solver.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad {

class SdeDpmSolver {
public:
  struct Options {
    int order = 2; ///< data prediction: 1, 2 or 3; noise prediction: 1 or 2
    SolverPrediction prediction = SolverPrediction::data; ///< data: SDE-DPM-Solver++
    DpmSolverType solver_type = DpmSolverType::midpoint;
    bool lower_order_final = true;
    int lower_order_final_max_steps = 15;
    bool euler_at_final = false;
    coeffs::dpm::ReferenceQuirks quirks{};
  };

  SdeDpmSolver() : SdeDpmSolver(Options{}) {}
  explicit SdeDpmSolver(const Options& o) : config_(to_config(o)) {
    const bool data = o.prediction == SolverPrediction::data;
    detail::check_dpm_multistep_config(
        config_, "SdeDpmSolver", data ? 3 : 2,
        data ? "" : " for noise prediction (as diffusers' sde-dpmsolver)");
  }
  SdeDpmSolver(int order, SolverPrediction prediction,
               DpmSolverType solver_type = DpmSolverType::midpoint)
      : SdeDpmSolver(Options{order, prediction, solver_type, true, 15, false, {}}) {}

  /// diffusers' DPMSolverMultistepScheduler with algorithm_type sde-dpmsolver(++), number for
  /// number given the same noise (its third-order sde-dpmsolver++ D2 weight and halved D2
  /// included, see ReferenceQuirks; diffusers has no third-order sde-dpmsolver).
  static SdeDpmSolver diffusers(const DpmSolverMultistep::DiffusersOptions& d) {
    if (!coeffs::dpm::is_sde(coeffs::dpm::integrand_of(d.algorithm_type)))
      detail::throw_argument("SdeDpmSolver::diffusers", "algorithm_type",
                             "sde-dpmsolver or sde-dpmsolver++ (the ODE types are "
                             "DpmSolverMultistep::diffusers)",
                             d.algorithm_type == DpmAlgorithm::dpmsolver ? "dpmsolver"
                                                                         : "dpmsolver++");
    Options o;
    o.order = d.solver_order;
    o.prediction = d.algorithm_type == DpmAlgorithm::sde_dpmsolver ? SolverPrediction::noise
                                                                   : SolverPrediction::data;
    o.solver_type = d.solver_type;
    o.lower_order_final = d.lower_order_final;
    o.lower_order_final_max_steps = 15;
    o.euler_at_final = d.euler_at_final;
    o.quirks.multistep_half_d2 = true;
    o.quirks.sde_d2_minus_alpha = true;
    return SdeDpmSolver(o);
  }

  const detail::DpmMultistepConfig& config() const { return config_; }
  /// The same scheme for a run that starts at step `start_index` of a longer one.
  SdeDpmSolver start_at(int start_index) const {
    detail::require(start_index >= 0, "SdeDpmSolver::start_at", "start_index", ">= 0", start_index);
    SdeDpmSolver s = *this;
    s.config_.steps_before = start_index;
    return s;
  }
  int history() const { return config_.order - 1; }
  int stages() const { return 1; }
  bool stochastic() const { return true; }
  void validate(std::span<const Node> nodes) const {
    validate_nodes(nodes, "SdeDpmSolver", ZeroLengthLastStep::identity);
  }
  int step_order(std::span<const Node> nodes, int i) const {
    return detail::dpm_multistep_order(config_, nodes, i);
  }
  StepPlan plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    return detail::dpm_multistep_plan(config_, nodes, i);
  }

private:
  static detail::DpmMultistepConfig to_config(const Options& o) {
    detail::DpmMultistepConfig c;
    c.integrand = o.prediction == SolverPrediction::data ? coeffs::dpm::Integrand::sde_data
                                                         : coeffs::dpm::Integrand::sde_noise;
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
