#pragma once
// DiffFlow's log-likelihood through its probability-flow ODE
//   dx/dt = f(x, t) - g(t)^2 s(x, t) / 2,
//   log p_{t_0}(x) = log N(x_{t_N}; 0, I) + int_{t_0}^{t_N} tr d/dx [f - g^2 s / 2] dt,
// integrated in t by RK4 (time_ode.hpp) on `times` (data end first; e.g. refine(grid.t, m)).
// The trace provider is JacobianTrace (exact, d VJPs per evaluation) or HutchinsonTrace.
#include <Eigen/Core>
#include <vector>

#include "diffgrad/diffflow/networks.hpp"
#include "diffgrad/diffflow/time_grid.hpp"
#include "diffgrad/diffflow/time_ode.hpp"

namespace diffgrad::diffflow {

/// log p_{t_0}(x) per row of x under the model's probability flow with a N(0, I) prior at the
/// last time.
template <TimeField Drift, TimeField Score, class Trace>
TimeLikelihood<typename Drift::state_type>
pf_ode_log_likelihood(const Drift& drift, const Score& score, const DiffusionFn& g, Trace& trace,
                      const typename Drift::state_type& x, const std::vector<double>& times) {
  const ProbabilityFlow<Drift, Score, DiffusionFn> flow(drift, score, g);
  return log_likelihood_in_t(flow, trace, x, times, [](const typename Drift::state_type& y) {
    return gaussian_log_density(y, 1.0);
  });
}

} // namespace diffgrad::diffflow
