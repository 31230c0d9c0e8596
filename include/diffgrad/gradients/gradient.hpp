#pragma once
// The user API for exact gradients through a sampler:
//
//   auto r = diffgrad::gradient(scheme, backend, schedule, nodes, model, x_T, loss,
//                               {.memory = MemoryMode::checkpoint(5), .wrt_cond = true});
//   r.x0, r.loss, r.grad_x (dL/dx_T), r.grad_cond, r.grad_params, r.grad_noise, r.cost
//
// The model is a DifferentiableNoiseModel (eps + vjp) or a DifferentiableVelocityModel
// (velocity + velocity_vjp); flow schemes (FlowEuler, FlowHeun) use gradient_flow, which
// takes flow times like sample_flow and always calls the velocity. The loss is a LossFunction
// (gradients/loss.hpp) or a state, the cotangent dL/dx_0. For repeated calls (optimisation loops)
// build a workspace once with make_gradient_workspace and pass it: nothing is allocated after that.
// Users who own the loop (batched or remote model calls) drive the same engine themselves
// with ReverseStepper (gradients/reverse_stepper.hpp): same workspace, same bits.
#include <span>
#include <type_traits>
#include <utility>

#include "diffgrad/concepts/model.hpp"
#include "diffgrad/flow/sample_flow.hpp"
#include "diffgrad/gradients/discrete_adjoint.hpp"
#include "diffgrad/gradients/loss.hpp"
#include "diffgrad/gradients/reverse_stepper.hpp"
#include "diffgrad/gradients/vjp_call.hpp"
#include "diffgrad/solvers/model_call.hpp"

namespace diffgrad {

namespace detail {
template <class> inline constexpr bool always_false = false;

/// A model's field/VJP adapter pair: noise models first, then velocity models.
template <class Model, Backend B> auto model_adapters(Model& model) {
  using State = typename B::state_type;
  using Vector = typename B::vector_type;
  if constexpr (DifferentiableNoiseModel<Model, State, Vector>) {
    return std::pair{EpsField<Model>{model}, EpsVjp<Model>{model}};
  } else if constexpr (DifferentiableVelocityModel<Model, State, Vector>) {
    return std::pair{VelocityField<Model>{model}, VelocityVjp<Model>{model}};
  } else {
    static_assert(always_false<Model>,
                  "diffgrad::gradient: the model must be a DifferentiableNoiseModel "
                  "(eps(x, t|node, out), vjp(x, t|node, a, dx, dcond*, dparams*), cond_size(), "
                  "param_size()) or a DifferentiableVelocityModel (velocity, velocity_vjp, "
                  "cond_size(), param_size()) for State = Backend::state_type and "
                  "Vector = Backend::vector_type");
  }
}
} // namespace detail

/// A workspace for gradient(scheme, ..., model, x_T, ...) with these options.
template <class Scheme, Backend B, class Model>
GradientWorkspace<B> make_gradient_workspace(const Scheme& scheme, const B& backend,
                                             std::span<const Node> nodes, Model& model,
                                             const typename B::state_type& x_T,
                                             const GradientOptions& options = {}) {
  detail::require(nodes.size() >= 2, "make_gradient_workspace", "nodes", "at least 2 nodes",
                  static_cast<double>(nodes.size()));
  return GradientWorkspace<B>::for_scheme(backend, scheme, static_cast<int>(nodes.size()) - 1, x_T,
                                          static_cast<std::int64_t>(model.cond_size()),
                                          static_cast<std::int64_t>(model.param_size()), options);
}

/// Gradient with a reusable workspace; returns a reference to the workspace's result.
template <class Scheme, Backend B, class S, class Model, class LossOrCotangent>
const GradientResult<B>& gradient(const Scheme& scheme, const B& backend, const S& schedule,
                                  std::span<const Node> nodes, Model& model,
                                  const typename B::state_type& x_T, LossOrCotangent&& loss,
                                  const GradientOptions& options, GradientWorkspace<B>& ws) {
  auto [field, vjp] = detail::model_adapters<Model, B>(model);
  return discrete_adjoint(scheme, backend, nodes, NodeAtLambda(schedule), field, vjp, x_T,
                          std::forward<LossOrCotangent>(loss), options, ws);
}

/// One-shot gradient: builds the workspace, returns the result by value.
template <class Scheme, Backend B, class S, class Model, class LossOrCotangent>
GradientResult<B> gradient(const Scheme& scheme, const B& backend, const S& schedule,
                           std::span<const Node> nodes, Model& model,
                           const typename B::state_type& x_T, LossOrCotangent&& loss,
                           const GradientOptions& options = {}) {
  auto ws = make_gradient_workspace(scheme, backend, nodes, model, x_T, options);
  gradient(scheme, backend, schedule, nodes, model, x_T, std::forward<LossOrCotangent>(loss),
           options, ws);
  return std::move(ws.result);
}

/// Gradient through a flow sampler (flow time 0 = noise -> 1 = data, as sample_flow), with
/// a reusable workspace (make_gradient_workspace(scheme, backend, flow_nodes(times), ...)).
/// The model is read as a velocity field even when it also provides eps (models::Mlp).
template <class Scheme, Backend B, class Model, class LossOrCotangent>
const GradientResult<B>& gradient_flow(const Scheme& scheme, const B& backend,
                                       std::span<const double> times, Model& model,
                                       const typename B::state_type& x_T, LossOrCotangent&& loss,
                                       const GradientOptions& options, GradientWorkspace<B>& ws) {
  using State = typename B::state_type;
  static_assert(DifferentiableVelocityModel<Model, State, typename B::vector_type>,
                "diffgrad::gradient_flow: the model must provide velocity(x, t, out), "
                "velocity_vjp(x, t, a, dx, dcond*, dparams*), cond_size() and param_size()");
  const std::vector<Node> nodes = flow_nodes(times);
  return discrete_adjoint(scheme, backend, std::span<const Node>(nodes),
                          NodeAtLambda(detail::no_lambda_map()), VelocityField<Model>{model},
                          VelocityVjp<Model>{model}, x_T, std::forward<LossOrCotangent>(loss),
                          options, ws);
}

/// One-shot gradient through a flow sampler.
template <class Scheme, Backend B, class Model, class LossOrCotangent>
GradientResult<B> gradient_flow(const Scheme& scheme, const B& backend,
                                std::span<const double> times, Model& model,
                                const typename B::state_type& x_T, LossOrCotangent&& loss,
                                const GradientOptions& options = {}) {
  auto ws = make_gradient_workspace(scheme, backend, flow_nodes(times), model, x_T, options);
  gradient_flow(scheme, backend, times, model, x_T, std::forward<LossOrCotangent>(loss), options,
                ws);
  return std::move(ws.result);
}

} // namespace diffgrad
