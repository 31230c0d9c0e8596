#pragma once
// Model concepts. A noise model predicts eps(x, t) for a batch; a differentiable one also
// gives vector-Jacobian products w.r.t. the state, the conditioning and a flat parameter
// vector. Optional capabilities are detected, never required (autodiff/Ceres style).
#include <concepts>
#include <cstdint>

#include "diffgrad/schedule/node.hpp"

namespace diffgrad {

/// eps(x, t, out): writes the noise prediction for the batch x (B x d) at model time t.
template <class M, class State>
concept NoiseModel = requires(M& m, const State& x, double t, State& out) {
  m.eps(x, t, out);
};

/// A model that wants the whole Node (alpha, sigma, ...) rather than the model time:
/// prediction-type adapters and thresholding wrappers.
template <class M, class State>
concept NodeAwareNoiseModel = requires(M& m, const State& x, const Node& n, State& out) {
  m.eps(x, n, out);
};

/// vjp(x, t, cotangent, dx, dcond, dparams):
///   dx = (d eps/dx)^T cotangent;  *dcond += (d eps/dcond)^T cotangent;  *dparams += ...
/// dcond / dparams may be null (not wanted). cond_size()/param_size() give their lengths.
/// As for eps, a model may take the whole Node instead of the model time t.
template <class M, class State, class Vector>
concept DifferentiableNoiseModel =
    (NoiseModel<M, State> || NodeAwareNoiseModel<M, State>) &&
    (requires(M& m, const State& x, double t, const State& a, State& dx, Vector* dc, Vector* dp) {
      m.vjp(x, t, a, dx, dc, dp);
    } || requires(M& m, const State& x, const Node& n, const State& a, State& dx, Vector* dc,
                  Vector* dp) { m.vjp(x, n, a, dx, dc, dp); }) &&
    requires(M& m) {
      { m.cond_size() } -> std::convertible_to<std::int64_t>;
      { m.param_size() } -> std::convertible_to<std::int64_t>;
    };

/// velocity(x, t, out): a flow's velocity field, t from 0 (noise) to 1 (data).
template <class M, class State>
concept VelocityModel = requires(M& m, const State& x, double t, State& out) {
  m.velocity(x, t, out);
};

template <class M, class State, class Vector>
concept DifferentiableVelocityModel =
    VelocityModel<M, State> &&
    requires(M& m, const State& x, double t, const State& a, State& dx, Vector* dc, Vector* dp) {
      m.velocity_vjp(x, t, a, dx, dc, dp);
      { m.cond_size() } -> std::convertible_to<std::int64_t>;
      { m.param_size() } -> std::convertible_to<std::int64_t>;
    };

} // namespace diffgrad
