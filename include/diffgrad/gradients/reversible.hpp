#pragma once
// Reversible gradients (O(1) memory): the exact discrete gradient of an exactly invertible
// sampler (BdiaDdim, Edict, ReversibleCoupling<Scheme>) without storing the trajectory.
// The forward pass keeps only the current pair of states; the backward pass walks back
// through the method's inverse, re-evaluating the model at each reconstructed state and
// taking one VJP there, so memory is a fixed number of state buffers whatever N is.
// The result equals the store-all discrete adjoint up to the reconstruction error, which is
// measured (the reconstructed start pair against the true one) and returned beside the
// gradients, together with a cost record (model evaluations, VJPs, state buffers).
//
// Costs for N steps (S = stages of the coupled scheme):
//   BdiaDdim            forward N evals; backward N - 1 evals + N VJPs (the first step is
//                       DDIM, whose input comes out of the last inverse step for free)
//   Edict               forward 2N;      backward 2N evals + 2N VJPs
//   ReversibleCoupling  forward 2SN;     backward 2SN evals + 2SN VJPs
#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>

#include "diffgrad/concepts/model.hpp"
#include "diffgrad/gradients/vjp_call.hpp"
#include "diffgrad/inversion/engine.hpp"
#include "diffgrad/solvers/model_call.hpp"

namespace diffgrad {

struct ReversibleGradientOptions {
  bool want_cond = true;   ///< accumulate dL/dcond (model.cond_size() entries)
  bool want_params = true; ///< accumulate dL/dtheta (model.param_size() entries)
  /// Check the start state(s), model outputs, VJPs and the cotangent for NaN/Inf.
  bool check_finite = true;
  AmplificationOptions amplification{}; ///< the backward pass inverts: same diagnostic
};

/// What a reversible gradient cost. All counts are checked by the tests.
struct ReversibleGradientCost {
  int forward_model_evals = 0;
  int backward_model_evals = 0; ///< re-evaluations at reconstructed states
  int vjps = 0;
  int trajectory_states = 2;  ///< states of the trajectory held at once (the pair)
  int peak_state_buffers = 0; ///< every state-sized buffer allocated, scratch included
};

template <Backend B> struct ReversibleGradientResult {
  using State = typename B::state_type;
  using Vector = typename B::vector_type;
  State sample;                  ///< the forward pass's output x_0
  State grad_x;                  ///< dL/dx_T (zero-sized for reversible_gradient_latent)
  LatentPair<State> grad_latent; ///< dL/d(latent pair) at the noise end
  Vector grad_cond;              ///< dL/dcond, summed over the batch (empty unless wanted)
  Vector grad_params;            ///< dL/dtheta (empty unless wanted)
  /// |reconstructed start pair - true start pair| / |true start pair|: how far the walk back
  /// drifted; the gradient is exact up to an error of this relative size.
  double reconstruction_error = 0.0;
  ReversibleGradientCost cost{};
  AmplificationReport amplification{};
};

namespace detail {

/// The model as the steppers see it inside a reversible gradient: eps passes through; every
/// VJP is checked as gradient() checks its VJPs (check_vjp_output), at the step being
/// reversed, so a NaN VJP is refused where it happened instead of returning NaN gradients.
template <class Model, Backend B> struct CheckedVjpModel {
  using State = typename B::state_type;
  using Vector = typename B::vector_type;
  Model& model;
  const B& backend;
  bool check_finite;
  int step = 0; ///< the step whose adjoint is being taken, for messages

  std::int64_t cond_size() const { return static_cast<std::int64_t>(model.cond_size()); }
  std::int64_t param_size() const { return static_cast<std::int64_t>(model.param_size()); }
  void eps(const State& x, const Node& n, State& out) { EpsField<Model>{model}(x, n, out); }
  void vjp(const State& x, const Node& n, const State& a, State& dx, Vector* dcond,
           Vector* dparams) {
    EpsVjp<Model>{model}(x, n, a, dx, dcond, dparams);
    check_vjp_output(backend, x, dx, check_finite, step, n, static_cast<const Vector*>(dcond),
                     static_cast<const Vector*>(dparams));
  }
};

template <ReversibleMethod M, Backend B, class S, class Model, class Cotangent>
ReversibleGradientResult<B> reversible_gradient_impl(
    const M& method, const B& backend, const S& schedule, std::span<const Node> nodes, Model& model,
    const typename B::state_type* x_T, const LatentPair<typename B::state_type>* latent,
    Cotangent&& cotangent, const ReversibleGradientOptions& options, const char* where) {
  using State = typename B::state_type;
  using Vector = typename B::vector_type;
  static_assert(DifferentiableNoiseModel<Model, State, Vector>,
                "diffgrad::reversible_gradient: the model must provide eps(x, t|node, out), "
                "vjp(x, t|node, a, dx, dcond*, dparams*), cond_size() and param_size() "
                "(DifferentiableNoiseModel in concepts/model.hpp)");
  method.validate(nodes);
  method.validate_inversion();
  validate_amplification_options(options.amplification, where);
  const int num_steps = static_cast<int>(nodes.size()) - 1;
  ReversibleGradientResult<B> r;
  r.amplification = method.amplification(num_steps, options.amplification.threshold);
  enforce_amplification(r.amplification, options.amplification);

  const State& shape_ref = x_T ? *x_T : latent->first;
  if (latent) require_same_pair_shape<B>(latent->second, latent->first, where, "latent.second");
  if (x_T) {
    require_finite_input(backend, *x_T, options.check_finite, where, "x_T",
                         "finite values (x_T at nodes[0])");
  } else {
    require_finite_input(backend, latent->first, options.check_finite, where, "latent.first",
                         "finite values");
    require_finite_input(backend, latent->second, options.check_finite, where, "latent.second",
                         "finite values");
  }
  const auto batch = B::batch(shape_ref), dim = B::dim(shape_ref);
  CheckedVjpModel<Model, B> checked{model, backend, options.check_finite};
  auto st = method.make_stepper(backend, NodeAtLambda(schedule), nodes, checked, batch, dim,
                                options.check_finite);
  // Every buffer is allocated here, before either sweep.
  State a = backend.make_state(batch, dim), b = backend.make_state(batch, dim);
  State a0 = backend.make_state(batch, dim), b0 = backend.make_state(batch, dim);
  State abar = backend.make_state(batch, dim), bbar = backend.make_state(batch, dim);
  r.sample = backend.make_state(batch, dim);
  if (x_T) r.grad_x = backend.make_state(batch, dim);
  int buffers = 7 + (x_T ? 1 : 0) + st.state_buffers();
  if (options.want_cond) r.grad_cond = backend.make_vector(model.cond_size());
  if (options.want_params) r.grad_params = backend.make_vector(model.param_size());
  Vector* dcond = options.want_cond ? &r.grad_cond : nullptr;
  Vector* dparams = options.want_params ? &r.grad_params : nullptr;

  // Forward: only the current pair is kept.
  if (x_T) {
    st.pair_from_noise(*x_T, a, b);
  } else {
    backend.copy(a, latent->first);
    backend.copy(b, latent->second);
  }
  backend.copy(a0, a);
  backend.copy(b0, b);
  for (int k = st.first_step(); k < num_steps; ++k) st.forward(k, a, b);
  r.cost.forward_model_evals = st.model_evals();
  backend.copy(r.sample, st.output_index() == 0 ? a : b);

  // dL/dsample from the caller, placed on the pair member that is the sample.
  backend.fill(abar, 0.0);
  backend.fill(bbar, 0.0);
  State& out_bar = st.output_index() == 0 ? abar : bbar;
  cotangent(static_cast<const State&>(r.sample), out_bar);
  check_loss_gradient(backend, out_bar, r.sample, options.check_finite, where, "cotangent");

  // Backward: reconstruct each step's input and pull the adjoint pair through it.
  for (int k = num_steps - 1; k >= st.first_step(); --k) {
    checked.step = k;
    st.inverse_with_adjoint(k, a, b, abar, bbar, dcond, dparams);
  }
  r.grad_latent.first = abar;
  r.grad_latent.second = bbar;
  buffers += 2;
  checked.step = 0;
  if (x_T) st.pair_from_noise_vjp(a, b, abar, bbar, r.grad_x, dcond, dparams);
  r.cost.backward_model_evals = st.model_evals() - r.cost.forward_model_evals;
  r.cost.vjps = st.vjps();
  r.cost.peak_state_buffers = buffers;

  const double ref = backend.squared_norm(a0) + backend.squared_norm(b0);
  backend.lincomb(a0, term(1.0, a), term(-1.0, a0));
  backend.lincomb(b0, term(1.0, b), term(-1.0, b0));
  const double diff = backend.squared_norm(a0) + backend.squared_norm(b0);
  r.reconstruction_error = ref > 0.0 ? std::sqrt(diff / ref) : std::sqrt(diff);
  return r;
}

} // namespace detail

/// Gradient of L(sample) through `method` started from the single noise state x_T (as in
/// sample_from_noise). cotangent(const State& sample, State& out) writes dL/dsample.
/// Returns dL/dx_T, dL/dcond, dL/dtheta, the reconstruction error and the cost.
template <ReversibleMethod M, Backend B, class S, class Model, class Cotangent>
ReversibleGradientResult<B>
reversible_gradient(const M& method, const B& backend, const S& schedule,
                    std::span<const Node> nodes, Model& model, const typename B::state_type& x_T,
                    Cotangent&& cotangent, const ReversibleGradientOptions& options = {}) {
  return detail::reversible_gradient_impl(
      method, backend, schedule, nodes, model, &x_T,
      static_cast<const LatentPair<typename B::state_type>*>(nullptr),
      std::forward<Cotangent>(cotangent), options, "reversible_gradient");
}

/// Same, started from a latent pair (as in generate): returns dL/d(latent) in grad_latent,
/// e.g. to optimise an inverted latent for an edit.
template <ReversibleMethod M, Backend B, class S, class Model, class Cotangent>
ReversibleGradientResult<B>
reversible_gradient_latent(const M& method, const B& backend, const S& schedule,
                           std::span<const Node> nodes, Model& model,
                           const LatentPair<typename B::state_type>& latent, Cotangent&& cotangent,
                           const ReversibleGradientOptions& options = {}) {
  return detail::reversible_gradient_impl(
      method, backend, schedule, nodes, model, static_cast<const typename B::state_type*>(nullptr),
      &latent, std::forward<Cotangent>(cotangent), options, "reversible_gradient_latent");
}

} // namespace diffgrad
