#pragma once
// The sampling engine: runs any scheme's StepPlans over a node sequence. Per step it does
// the model call(s) and one fused lincomb per stage; all buffers live in a workspace sized
// before the loop (solvers/sampler_workspace.hpp), so the loop never allocates. The loop is the
// Stepper (solvers/stepper.hpp) with the model call in the caller's place.
#include <array>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/concepts/observer.hpp"
#include "diffgrad/solvers/model_call.hpp"
#include "diffgrad/solvers/sampler_workspace.hpp"
#include "diffgrad/solvers/step_plan.hpp"
#include "diffgrad/solvers/stepper.hpp"

namespace diffgrad {

namespace detail {

template <class Scheme, Backend B, class Field, class Obs>
SampleResult run_scheme_impl(const char* where, const Scheme& scheme, const B& backend,
                             std::span<const Node> nodes, NodeAtLambda node_at_lambda, Field& field,
                             typename B::state_type& x, SamplerWorkspace<B>& ws,
                             const SampleOptions& options, Obs& observer) {
  using State = typename B::state_type;
  Stepper<Scheme, B> stepper(scheme, backend, nodes, node_at_lambda, ws, options, where);
  stepper.begin(x);
  SampleResult result;
  while (!stepper.done()) {
    field(stepper.model_input(), stepper.model_node(), stepper.model_output());
    if (!stepper.advance()) continue;
    ++result.steps_taken;
    const int reached_step = stepper.step();
    const Node& reached = nodes[static_cast<std::size_t>(reached_step)];
    const State& state = stepper.state();
    if constexpr (std::is_same_v<decltype(observer(reached_step, stepper.num_steps(), reached,
                                                   state)),
                                 ObserverAction>) {
      if (observer(reached_step, stepper.num_steps(), reached, state) == ObserverAction::stop) {
        result.cancelled = true;
        break;
      }
    } else {
      observer(reached_step, stepper.num_steps(), reached, state);
    }
  }
  result.model_evals = stepper.model_evals();
  stepper.result(x);
  return result;
}

} // namespace detail

/// Runs `scheme` from nodes[0] to nodes.back() on the batch `x` (in: x at nodes[0], out: the
/// sample). `field(u, node, out)` is the model call (see EpsField / VelocityField). `x` must
/// have the workspace's shape; with options.check_finite it must be finite (as must the
/// given noise), checked once before the first step.
template <class Scheme, Backend B, class Field, class Obs = NullObserver>
SampleResult run_scheme(const Scheme& scheme, const B& backend, std::span<const Node> nodes,
                        NodeAtLambda node_at_lambda, Field&& field, typename B::state_type& x,
                        SamplerWorkspace<B>& ws, const SampleOptions& options = {},
                        Obs&& observer = {}) {
  return detail::run_scheme_impl("run_scheme", scheme, backend, nodes, node_at_lambda, field, x, ws,
                                 options, observer);
}

/// Sample with a noise model: x holds x_T at nodes[0] on entry and the sample on exit.
template <class Scheme, Backend B, class Model, class S, class Obs = NullObserver>
SampleResult sample(const Scheme& scheme, const B& backend, const S& schedule,
                    std::span<const Node> nodes, Model& model, typename B::state_type& x,
                    const SampleOptions& options = {}, Obs&& observer = {}) {
  using State = typename B::state_type;
  static_assert(NoiseModel<Model, State> || NodeAwareNoiseModel<Model, State>,
                "diffgrad::sample: the model must provide "
                "eps(const State& x, double t, State& out) or eps(const State& x, const Node& n, "
                "State& out), with State = Backend::state_type");
  SamplerWorkspace<B> ws(backend, scheme.history(), scheme.stages(), B::batch(x), B::dim(x));
  EpsField<Model> field{model};
  return detail::run_scheme_impl("sample", scheme, backend, nodes, NodeAtLambda(schedule), field, x,
                                 ws, options, observer);
}

} // namespace diffgrad
