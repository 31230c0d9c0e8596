#pragma once
// How the reverse pass calls a model's vector-Jacobian product, mirroring how the engine
// calls the model forward (solvers/model_call.hpp): noise models get the node's model time
// (or the whole Node when their vjp takes one), velocity models get the flow time node.t.
//   vjp(u, node, cotangent, dx, dcond, dparams):
//     dx = (d out/du)^T cotangent;  *dcond += (d out/dcond)^T cotangent;  *dparams += ...
// dcond / dparams are null when not wanted.
#include "diffgrad/concepts/model.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad {

/// VJP of a noise model's eps (DifferentiableNoiseModel).
template <class Model> struct EpsVjp {
  Model& model;
  template <class State, class Vector>
  void operator()(const State& u, const Node& n, const State& cotangent, State& dx,
                  Vector* dcond, Vector* dparams) const {
    if constexpr (requires { model.vjp(u, n, cotangent, dx, dcond, dparams); })
      model.vjp(u, n, cotangent, dx, dcond, dparams);
    else
      model.vjp(u, n.model_t, cotangent, dx, dcond, dparams);
  }
};

/// VJP of a velocity model (DifferentiableVelocityModel): node.t is the flow time.
template <class Model> struct VelocityVjp {
  Model& model;
  template <class State, class Vector>
  void operator()(const State& u, const Node& n, const State& cotangent, State& dx,
                  Vector* dcond, Vector* dparams) const {
    model.velocity_vjp(u, n.t, cotangent, dx, dcond, dparams);
  }
};

} // namespace diffgrad
