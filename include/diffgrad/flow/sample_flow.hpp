#pragma once
// Flow-matching / rectified-flow sampling on the step-plan engine. Flow time t runs from
// 0 (noise) to 1 (data); a flow node is Node{t, alpha = t, sigma = 1 - t, lambda =
// log(t / (1 - t)), model_t = t}. Flow schemes read only t (the alpha/sigma/lambda fields
// carry the rectified-flow interpretation X_t = (1 - t) x0 + t x1 for observers and never
// enter a flow step). The engine calls the model through VelocityField: velocity(x, t, out).
#include <cmath>
#include <limits>
#include <span>
#include <stdexcept>
#include <utility>
#include <vector>

#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/concepts/model.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/solvers/model_call.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad {

/// Node of flow time t in [0, 1] (see the header comment for the unused fields).
inline Node flow_node(double t) {
  const double lambda = t <= 0.0   ? -std::numeric_limits<double>::infinity()
                        : t >= 1.0 ? std::numeric_limits<double>::infinity()
                                   : std::log(t) - std::log1p(-t);
  return Node{t, t, 1.0 - t, lambda, t};
}

/// Checks a flow node sequence: at least 2 nodes, t finite, inside [0, 1] and strictly
/// increasing (noise -> data).
inline void validate_flow_nodes(std::span<const Node> nodes, const char* where) {
  detail::require(nodes.size() >= 2, where, "nodes", "at least 2 flow nodes",
                  static_cast<double>(nodes.size()));
  for (std::size_t i = 0; i < nodes.size(); ++i) {
    const double t = nodes[i].t;
    if (!(t >= 0.0 && t <= 1.0))
      detail::throw_argument(where, "nodes", "flow times t in [0, 1]",
                             detail::concat("nodes[", i, "].t = ", t));
    if (i > 0 && !(t > nodes[i - 1].t))
      detail::throw_argument(
          where, "nodes",
          detail::concat("strictly increasing flow times (0 = noise -> 1 = data) after nodes[",
                         i - 1, "].t = ", nodes[i - 1].t),
          detail::concat("nodes[", i, "].t = ", t));
  }
}

/// Flow nodes from flow times; the times must be finite, in [0, 1] and strictly increasing.
inline std::vector<Node> flow_nodes(std::span<const double> times) {
  detail::require(times.size() >= 2, "flow_nodes", "times", "at least 2 flow times",
                  static_cast<double>(times.size()));
  std::vector<Node> nodes;
  nodes.reserve(times.size());
  for (std::size_t i = 0; i < times.size(); ++i) {
    const double t = times[i];
    if (!(t >= 0.0 && t <= 1.0))
      detail::throw_argument("flow_nodes", "times", "flow times in [0, 1]",
                             detail::concat("times[", i, "] = ", t));
    if (i > 0 && !(t > times[i - 1]))
      detail::throw_argument(
          "flow_nodes", "times",
          detail::concat("strictly increasing flow times (0 = noise -> 1 = data) after times[",
                         i - 1, "] = ", times[i - 1]),
          detail::concat("times[", i, "] = ", t));
    nodes.push_back(flow_node(t));
  }
  return nodes;
}

/// num_steps + 1 flow times uniform in [t_start, t_end] (default: the whole [0, 1]).
inline std::vector<double> uniform_flow_grid(int num_steps, double t_start = 0.0,
                                             double t_end = 1.0) {
  detail::require(num_steps >= 1, "uniform_flow_grid", "num_steps", "at least 1 step",
                  num_steps);
  detail::require(t_start >= 0.0 && t_start < 1.0, "uniform_flow_grid", "t_start",
                  "0 <= t_start < 1", t_start);
  detail::require(t_end > t_start && t_end <= 1.0, "uniform_flow_grid", "t_end",
                  "t_start < t_end <= 1", t_end);
  std::vector<double> t(static_cast<std::size_t>(num_steps) + 1);
  for (int i = 0; i <= num_steps; ++i)
    t[static_cast<std::size_t>(i)] =
        t_start + (t_end - t_start) * static_cast<double>(i) / num_steps;
  t.back() = t_end;
  return t;
}

namespace detail {
/// Flows have no lambda -> node map; a flow scheme that asked for one is a library bug.
struct NoLambdaMap {
  double t_of_lambda(double) const {
    throw std::logic_error("diffgrad: a flow scheme asked for a node at a lambda");
  }
  Node node(double) const { return Node{}; }
};
inline const NoLambdaMap& no_lambda_map() {
  static const NoLambdaMap map{};
  return map;
}
} // namespace detail

/// Samples a velocity model: x holds the state at times.front() (noise end) on entry and
/// the result at times.back() on exit. `scheme` is a flow scheme (FlowEuler, FlowHeun).
template <class Scheme, Backend B, class Model, class Obs = NullObserver>
SampleResult sample_flow(const Scheme& scheme, const B& backend, std::span<const double> times,
                         Model& model, typename B::state_type& x,
                         const SampleOptions& options = {}, Obs&& observer = {}) {
  using State = typename B::state_type;
  static_assert(VelocityModel<Model, State>,
                "diffgrad::sample_flow: the model must provide "
                "velocity(const State& x, double t, State& out), with State = "
                "Backend::state_type");
  const std::vector<Node> nodes = flow_nodes(times);
  SamplerWorkspace<B> ws(backend, scheme.history(), scheme.stages(), B::batch(x), B::dim(x));
  return run_scheme(scheme, backend, std::span<const Node>(nodes),
                    NodeAtLambda(detail::no_lambda_map()), VelocityField<Model>{model}, x, ws,
                    options, std::forward<Obs>(observer));
}

} // namespace diffgrad
