#pragma once
// How the reverse pass calls a model's vector-Jacobian product, mirroring how the engine
// calls the model forward (solvers/model_call.hpp): noise models get the node's model time
// (or the whole Node when their vjp takes one), velocity models get the flow time node.t.
//   vjp(u, node, cotangent, dx, dcond, dparams):
//     dx = (d out/du)^T cotangent;  *dcond += (d out/dcond)^T cotangent;  *dparams += ...
// dcond / dparams are null when not wanted.
//
// The checks below are shared by every exact-gradient entry point (gradient(), the
// reversible gradients), so a broken loss or VJP is refused the same way, with the same
// message, whichever entry point met it.
#include <concepts>

#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/concepts/model.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/gradients/loss.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad {

/// VJP of a noise model's eps (DifferentiableNoiseModel).
template <class Model> struct EpsVjp {
  Model& model;
  template <class State, class Vector>
  void operator()(const State& u, const Node& n, const State& cotangent, State& dx, Vector* dcond,
                  Vector* dparams) const {
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
  void operator()(const State& u, const Node& n, const State& cotangent, State& dx, Vector* dcond,
                  Vector* dparams) const {
    model.velocity_vjp(u, n.t, cotangent, dx, dcond, dparams);
  }
};

namespace detail {

/// The cotangent dL/dx0 that seeds a reverse pass (from a loss, or given): x0's shape and,
/// with check_finite, finite. `arg` names what produced it in the caller's terms.
template <Backend B>
void check_loss_gradient(const B& backend, const typename B::state_type& grad,
                         const typename B::state_type& x0, bool check_finite, const char* where,
                         const char* arg) {
  require_same_shape<B>(grad, x0, where, arg);
  if (check_finite && !backend.all_finite(grad))
    throw numerical_error(concat(where, ": the loss gradient dL/dx0 is not finite"));
}

/// True unless `v` is a host vector holding NaN/Inf. Vectors without a host-side check
/// (device vectors) pass: the backend concept offers no reduction over them.
template <class Vector> bool vector_all_finite(const Vector* v) {
  if (v == nullptr) return true;
  if constexpr (requires {
                  { v->allFinite() } -> std::convertible_to<bool>;
                })
    return v->allFinite();
  else
    return true;
}

/// What one model VJP at state `at` (step `step`, node `n`) returned: dx of at's shape and,
/// with check_finite, finite dx and finite accumulated dcond / dparams (a NaN written there
/// would otherwise surface only as a NaN gradient after the whole pass).
template <Backend B, class Vector>
void check_vjp_output(const B& backend, const typename B::state_type& at,
                      const typename B::state_type& dx, bool check_finite, int step, const Node& n,
                      const Vector* dcond, const Vector* dparams) {
  if (B::batch(dx) != B::batch(at) || B::dim(dx) != B::dim(at))
    throw invalid_argument(concat("model vjp: expected dx of shape ", B::batch(at), " x ",
                                  B::dim(at), ", got ", B::batch(dx), " x ", B::dim(dx),
                                  " at step ", step));
  if (!check_finite) return;
  if (!backend.all_finite(dx))
    throw numerical_error(concat("model vjp: expected finite values, got NaN or Inf at step ", step,
                                 " (t = ", n.t, ")"));
  if (!vector_all_finite(dcond))
    throw numerical_error(concat("model vjp: expected finite values in dcond, got NaN or Inf "
                                 "at step ",
                                 step, " (t = ", n.t, ")"));
  if (!vector_all_finite(dparams))
    throw numerical_error(concat("model vjp: expected finite values in dparams, got NaN or "
                                 "Inf at step ",
                                 step, " (t = ", n.t, ")"));
}

} // namespace detail

} // namespace diffgrad
