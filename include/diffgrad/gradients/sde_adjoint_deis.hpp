#pragma once
// SDE-AdjointDEIS: the adjoint of the diffusion SDE dx = [f x + (g^2/sigma) eps] dt + g dw along
// one realised path. g does not depend on x, so the adjoint has no noise term: given the path,
// it is the ODE da/dt = -f a - (g^2/sigma) (d eps/dx)^T a, the PF-ODE adjoint with every VJP
// term doubled (g^2/sigma instead of g^2/(2 sigma)). The exponential-integrator steps are those
// of AdjointDEIS with vjp_weight = 2 (coeffs/adjoint_deis.hpp):
//   a_s = (alpha_t/alpha_s) a_t + 2 (alpha_t^2/alpha_s^2) sigma_s (e^h - 1) V_t
//   dL/dz += 2 (sigma_t - alpha_t sigma_s/alpha_s) W_t
//
// The path must be known: pass the states the SDE sampler visited (TrajectoryCache while
// sampling, or a replay from Cycle-SDE noises / the Philox seed, gradients/cycle_sde.hpp).
// The state cannot be re-solved backwards without the noise and an implicit solve, so only the
// cached mode exists. AdjointDEIS-2M is offered, but along a Brownian path V_t is only
// Hoelder-1/2 in t: expect order 2 only where d eps/dx does not depend on the state.
//
// Stability: the doubled VJP weight halves the room. On the collapsed-posterior test problem
// (adjoint_deis.hpp, header note) one step multiplies alpha a by 1 + 2 (1 - e^{|h|}) where the
// exact path Jacobian gives e^{-2|h|}: the factor is negative past |h| = ln(3/2) and below -1
// past |h| = ln 2 = 0.693 (-2M: 0.362). AdjointCost::stability reports the grid against it.
#include <span>

#include "diffgrad/gradients/adjoint_deis.hpp"

namespace diffgrad {

/// The stability report of SDE-AdjointDEIS (order and weights from `options`) on `nodes`,
/// without running it.
inline AdjointStabilityReport sde_adjoint_deis_stability(std::span<const Node> nodes,
                                                         const AdjointDeisOptions& options = {}) {
  validate_nodes(nodes, "sde_adjoint_deis_stability");
  detail::require(options.order == 1 || options.order == 2, "sde_adjoint_deis_stability",
                  "options.order", "1 (SDE-AdjointDEIS-1) or 2 (SDE-AdjointDEIS-2M)",
                  options.order);
  return detail::adjoint_stability_report(nodes, options.order, 2.0, options.weights,
                                          options.order == 1 ? "SDE-AdjointDEIS-1"
                                                             : "SDE-AdjointDEIS-2M");
}

/// SDE-AdjointDEIS-1 / -2M from the sampled path. Arguments as adjoint_deis():
///   trajectory[i] = the SDE state at nodes[i] (trajectory[0] = x_T, back() = x_0);
///   grad_cond / grad_params are accumulated into. Cost: N VJPs, no model evaluations.
template <Backend B, class Model>
AdjointCost sde_adjoint_deis(const B& backend, Model& model, std::span<const Node> nodes,
                             std::span<const typename B::state_type> trajectory,
                             const typename B::state_type& grad_x0, typename B::state_type& grad_xT,
                             typename B::vector_type* grad_cond = nullptr,
                             typename B::vector_type* grad_params = nullptr,
                             const AdjointDeisOptions& options = {}) {
  if (trajectory.empty())
    detail::throw_argument("sde_adjoint_deis", "trajectory",
                           detail::concat("one state per node (", nodes.size(), ")"), 0);
  return detail::continuous_adjoint(backend, model, nodes, trajectory, nullptr, grad_x0, grad_xT,
                                    grad_cond, grad_params, options, 2.0, "sde_adjoint_deis");
}

} // namespace diffgrad
