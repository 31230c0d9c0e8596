#pragma once
// The schemes and grid shared by the CPU and GPU halves of bench_cuda_lincomb.
#include <span>
#include <vector>

#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "diffgrad/solvers/sde_dpm_solver.hpp"

namespace diffgrad::bench {

inline const char* scheme_name(int scheme) {
  return scheme == 0 ? "DDIM" : scheme == 1 ? "DPM-Solver++ 2M" : "SDE-DPM-Solver++ 2M";
}

/// A model that costs nothing: only the engine's per-step work (plan, fused lincomb, finite
/// check) is timed. Its output buffer keeps whatever it holds.
struct NullModel {
  template <class State> void eps(const State&, double, State&) const {}
};

/// Runs `steps` steps of scheme 0/1/2 on (backend, x); returns the SampleResult.
template <class B>
SampleResult run_scheme_by_index(int scheme, const B& backend, typename B::state_type& x, int steps,
                                 bool check_finite) {
  static const VPLinearSchedule schedule;
  const std::vector<Node> nodes = make_nodes(schedule, uniform_t_grid(schedule, steps, 1.0, 1e-3));
  NullModel model;
  const SampleOptions options{.seed = 1, .check_finite = check_finite};
  const std::span<const Node> ns(nodes);
  if (scheme == 0) return sample(Ddim(), backend, schedule, ns, model, x, options);
  if (scheme == 1)
    return sample(DpmSolverMultistep(2, SolverPrediction::data), backend, schedule, ns, model, x,
                  options);
  return sample(SdeDpmSolver(2, SolverPrediction::data), backend, schedule, ns, model, x, options);
}

} // namespace diffgrad::bench
