#pragma once
// Exact discrete adjoint (discretize-then-optimize) of ANY scheme written as StepPlans
// (solvers/step_plan.hpp): the true gradient of the numbers the sampler produced, to rounding.
//
// The engine is the reverse stepper (gradients/reverse_stepper.hpp): discrete_adjoint below
// is its request loop with the model's eps and VJP in place, so gradient() and a caller-driven
// ReverseStepper give the same bits. What is stored and recomputed is described there.
//
// Cost, with S_i the stage count of step i, A_i how often step i is advanced (the output
// step included) and R the set of reversed steps whose stage inputs are recomputed:
//   model evaluations = sum_i S_i A_i + sum_{i in R} (S_i - 1),   VJPs = sum_i S_i,
// R = every step, unless GradientOptions::keep_stages (then R excludes the steps reversed
// from reverse-only snapshots and the last step: under store_all R is empty). For a fixed
// stage count S without keep_stages: S (t(N, s) + 1) + (S - 1) N evaluations and S N VJPs.
// Stored vectors (GradientCost::peak_stored_states) under store_all: N - 1 (x_0 .. x_{N-2};
// x_{N-1} is the working state), plus (S - 1)(N - 1) stage inputs with keep_stages, plus,
// for multi-stage schemes whose stage inputs read history, that history (shared).
#include <span>
#include <type_traits>
#include <utility>

#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/gradients/loss.hpp"
#include "diffgrad/gradients/reverse_stepper.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad {

namespace detail {

/// Treats a given cotangent w as the linear loss <w, x0>.
template <Backend B> struct CotangentLoss {
  const typename B::state_type& cotangent;
  double operator()(const B& backend, const typename B::state_type& x0,
                    typename B::state_type& grad) const {
    require_same_shape<B>(cotangent, x0, "gradient", "cotangent");
    backend.copy(grad, cotangent);
    return backend.dot(cotangent, x0);
  }
};

} // namespace detail

/// The exact discrete gradient of loss(x_0) for x_0 = scheme run from x_T over `nodes`,
/// with explicit model adapters: `field(u, node, out)` as for run_scheme (EpsField,
/// VelocityField) and `vjp(u, node, cotangent, dx, dcond, dparams)` (EpsVjp, VelocityVjp).
/// `loss` is a LossFunction or a state (the cotangent dL/dx_0). Writes ws's result and
/// returns it; allocates nothing when ws was built for this problem.
template <class Scheme, Backend B, class Field, class VjpField, class LossOrCotangent>
const GradientResult<B>&
discrete_adjoint(const Scheme& scheme, const B& backend, std::span<const Node> nodes,
                 NodeAtLambda node_at_lambda, Field&& field, VjpField&& vjp,
                 const typename B::state_type& x_T, LossOrCotangent&& loss,
                 const GradientOptions& options, GradientWorkspace<B>& ws) {
  using State = typename B::state_type;
  ReverseStepper<Scheme, B> rs(scheme, backend, nodes, node_at_lambda, ws, options, "gradient");
  rs.begin(x_T); // every argument check, before the first model call
  const auto run = [&](auto& loss_fn) {
    for (;;) {
      switch (rs.request()) {
      case AdjointRequest::model_eval:
        field(rs.model_input(), rs.model_node(), rs.model_output());
        break;
      case AdjointRequest::loss_gradient:
        rs.set_loss(static_cast<double>(loss_fn(backend, rs.sample(), rs.sample_cotangent())));
        break;
      case AdjointRequest::vjp:
        vjp(rs.vjp_input(), rs.vjp_node(), rs.vjp_cotangent(), rs.vjp_output(), rs.vjp_grad_cond(),
            rs.vjp_grad_params());
        break;
      case AdjointRequest::done: return;
      }
      rs.advance();
    }
  };
  if constexpr (std::is_same_v<std::remove_cvref_t<LossOrCotangent>, State>) {
    detail::CotangentLoss<B> as_loss{loss};
    run(as_loss);
  } else {
    static_assert(LossFunction<std::remove_reference_t<LossOrCotangent>, B>,
                  "diffgrad::gradient: the loss must be callable as "
                  "double loss(const Backend&, const State& x0, State& grad), or be a State "
                  "(the cotangent dL/dx0)");
    run(loss);
  }
  return ws.result;
}

} // namespace diffgrad
