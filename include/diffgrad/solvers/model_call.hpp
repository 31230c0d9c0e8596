#pragma once
// How the engine calls a model: noise models get the node's model time (or the whole node
// when they ask for it), velocity models get t. Every call is checked for shape and, by
// default, for NaN/Inf, so a broken model is reported at the step where it broke.
#include <cstdint>
#include <type_traits>

#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/concepts/model.hpp"
#include "diffgrad/core/error.hpp"

namespace diffgrad {

/// Adapts a noise model to the engine's field(u, node, out) call.
template <class Model> struct EpsField {
  Model& model;
  template <class State> void operator()(const State& u, const Node& n, State& out) const {
    if constexpr (NodeAwareNoiseModel<Model, State>)
      model.eps(u, n, out);
    else
      model.eps(u, n.model_t, out);
  }
};

/// Adapts a velocity model: node.t is the flow time in [0, 1].
template <class Model> struct VelocityField {
  Model& model;
  template <class State> void operator()(const State& u, const Node& n, State& out) const {
    model.velocity(u, n.t, out);
  }
};

namespace detail {
template <Backend B>
void check_model_output(const B& backend, const typename B::state_type& in,
                        const typename B::state_type& out, bool check_finite, int step,
                        const Node& n) {
  if (B::batch(out) != B::batch(in) || B::dim(out) != B::dim(in))
    throw invalid_argument(concat("model output: expected shape ", B::batch(in), " x ",
                                  B::dim(in), " (batch x dim, the state's shape), got ",
                                  B::batch(out), " x ", B::dim(out), " at step ", step));
  if (check_finite && !backend.all_finite(out))
    throw numerical_error(concat("model output: expected finite values, got NaN or Inf at step ",
                                 step, " (t = ", n.t, ", model time ", n.model_t, ")"));
}
} // namespace detail

} // namespace diffgrad
