#pragma once
// The common engine of exactly invertible samplers (BDIA-DDIM, EDICT, reversible couplings).
// Each of them is a map between PAIRS of states that can be run both ways:
//
//   BdiaDdim            (x_{k-1}, x_k) -> (x_k, x_{k+1})          (two consecutive states)
//   Edict               (x, y)         -> (x', y')                 (a state and its twin)
//   ReversibleCoupling  (y, z)         -> (y', z')                 (McCallum-Foster)
//
// A method provides a "stepper" that owns the scratch buffers for one state shape and does
// one step forward, one step inverse, or one step inverse while pulling adjoints back (for
// reversible gradients, gradients/reversible.hpp). This header runs steppers: invert (data
// -> latent pair), generate (latent pair -> data) and sample_from_noise (one noise state ->
// data). Indices follow the engine: node 0 is the noise end, node N the data end, step k
// goes from nodes[k] to nodes[k+1].
#include <cmath>
#include <concepts>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>

#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/concepts/model.hpp"
#include "diffgrad/concepts/observer.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/gradients/vjp_call.hpp"
#include "diffgrad/inversion/amplification.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/solvers/model_call.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad {

/// The latent of an exact inversion: two states, because each method carries two.
///   BdiaDdim: (z_N, z_{N-1}) in the BDIA paper's indexing = the states at nodes[0], nodes[1];
///   Edict: (x_T, y_T), both at nodes[0];  ReversibleCoupling: (y_T, z_T), both at nodes[0].
template <class State> struct LatentPair {
  State first;
  State second;
};

struct InversionOptions {
  bool check_finite = true;             ///< check every model output for NaN/Inf
  AmplificationOptions amplification{}; ///< diagnostic threshold and policy
};

struct GenerateOptions {
  bool check_finite = true; ///< check every model output for NaN/Inf
};

struct InversionReport {
  int steps_taken = 0;
  int model_evals = 0;
  bool cancelled = false;
  AmplificationReport amplification{};
};

struct GenerateReport {
  int steps_taken = 0;
  int model_evals = 0;
  bool cancelled = false;
};

/// A method the engine can run both ways (BdiaDdim, Edict, ReversibleCoupling<Scheme>).
template <class M>
concept ReversibleMethod = requires(const M& m, std::span<const Node> nodes, int steps) {
  typename M::reversible_method_tag;
  m.validate(nodes);
  m.validate_inversion();
  { m.amplification(steps, 1e6) } -> std::same_as<AmplificationReport>;
};

namespace detail {

/// Model call with the shape/finite check of the sampling engine; counts evaluations.
template <class Model> struct CountedEps {
  Model& model;
  bool check_finite = true;
  int evals = 0;
  template <Backend B>
  void operator()(const B& backend, const typename B::state_type& x, const Node& n,
                  typename B::state_type& out, int step) {
    EpsField<Model>{model}(x, n, out);
    ++evals;
    check_model_output(backend, x, out, check_finite, step, n);
  }
  /// dx = J_eps(x)^T cot (plus the dcond / dparams accumulation). dx must have x's shape,
  /// checked here for every stepper (O(1), gradient()'s message): each then adds dx into a
  /// state of that shape, which would read out of bounds in Release builds otherwise.
  /// Finiteness of VJPs is checked by reversible_gradient, which wraps the model.
  template <Backend B, class Vector>
  void vjp(const B&, const typename B::state_type& x, const Node& n,
           const typename B::state_type& cot, typename B::state_type& dx, Vector* dcond,
           Vector* dparams, int step) {
    EpsVjp<Model>{model}(x, n, cot, dx, dcond, dparams);
    if (B::batch(dx) != B::batch(x) || B::dim(dx) != B::dim(x))
      throw invalid_argument(concat("model vjp: expected dx of shape ", B::batch(x), " x ",
                                    B::dim(x), ", got ", B::batch(dx), " x ", B::dim(dx),
                                    " at step ", step));
  }
};

/// With check_finite: one read pass over an input state before any step, so a non-finite
/// input is named (instead of being blamed on the model's first output, or passing unseen
/// when the model ignores it).
template <Backend B>
void require_finite_state(const B& backend, const typename B::state_type& s, bool check_finite,
                          const char* where, const char* arg) {
  if (check_finite && !backend.all_finite(s))
    throw_argument(where, arg, "finite values", "NaN or Inf");
}

/// Calls an observer; true when it asked to stop.
template <class Obs, class State>
bool notify_stop(Obs& obs, int step, int num_steps, const Node& n, const State& x) {
  if constexpr (std::is_same_v<decltype(obs(step, num_steps, n, x)), ObserverAction>)
    return obs(step, num_steps, n, x) == ObserverAction::stop;
  else {
    obs(step, num_steps, n, x);
    return false;
  }
}

template <Backend B>
void ensure_state_shape(const B& backend, typename B::state_type& s, std::int64_t batch,
                        std::int64_t dim) {
  if (B::batch(s) != batch || B::dim(s) != dim) s = backend.make_state(batch, dim);
}

template <Backend B>
void require_same_pair_shape(const typename B::state_type& a, const typename B::state_type& b,
                             const char* where, const char* arg) {
  if (B::batch(a) != B::batch(b) || B::dim(a) != B::dim(b))
    throw invalid_argument(concat(where, ": argument '", arg, "' expected shape ", B::batch(b),
                                  " x ", B::dim(b), ", got ", B::batch(a), " x ", B::dim(a)));
}

} // namespace detail

/// Data -> latent: inverts `method` exactly (up to rounding) from x0 at nodes.back() to the
/// latent pair at the noise end. `nodes` are the SAMPLING nodes (noise -> data), the same
/// ones generate() is then run on. The observer sees (i, num_steps, node reached, state).
template <ReversibleMethod M, Backend B, class S, class Model, class Obs = NullObserver>
InversionReport invert(const M& method, const B& backend, const S& schedule,
                       std::span<const Node> nodes, Model& model, const typename B::state_type& x0,
                       LatentPair<typename B::state_type>& latent,
                       const InversionOptions& options = {}, Obs&& observer = {}) {
  method.validate(nodes);
  method.validate_inversion();
  validate_amplification_options(options.amplification, "invert");
  const int num_steps = static_cast<int>(nodes.size()) - 1;
  InversionReport report;
  report.amplification = method.amplification(num_steps, options.amplification.threshold);
  enforce_amplification(report.amplification, options.amplification);

  detail::require_finite_state(backend, x0, options.check_finite, "invert", "x0");
  const auto batch = B::batch(x0), dim = B::dim(x0);
  auto st = method.make_stepper(backend, NodeAtLambda(schedule), nodes, model, batch, dim,
                                options.check_finite);
  detail::ensure_state_shape(backend, latent.first, batch, dim);
  detail::ensure_state_shape(backend, latent.second, batch, dim);
  const int total = num_steps;
  int done = 0;
  if (st.pair_from_data(x0, latent.first, latent.second)) {
    ++done; // BDIA: the DDIM-inversion step to z_1 is a step of its own
    if (detail::notify_stop(observer, done, total, nodes[nodes.size() - 2], latent.first)) {
      report.cancelled = true;
    }
  }
  for (int k = num_steps - 1; k >= st.first_step() && !report.cancelled; --k) {
    st.inverse(k, latent.first, latent.second);
    ++done;
    if (detail::notify_stop(observer, done, total, st.node_after_inverse(k), latent.first))
      report.cancelled = true;
  }
  report.steps_taken = done;
  report.model_evals = st.model_evals();
  return report;
}

/// Latent -> data: runs `method` forward from a latent pair (from invert(), or made by hand);
/// x receives the sample. The observer sees (i, num_steps, node reached, state).
template <ReversibleMethod M, Backend B, class S, class Model, class Obs = NullObserver>
GenerateReport generate(const M& method, const B& backend, const S& schedule,
                        std::span<const Node> nodes, Model& model,
                        const LatentPair<typename B::state_type>& latent, typename B::state_type& x,
                        const GenerateOptions& options = {}, Obs&& observer = {}) {
  using State = typename B::state_type;
  method.validate(nodes);
  detail::require_same_pair_shape<B>(latent.second, latent.first, "generate", "latent.second");
  detail::require_finite_state(backend, latent.first, options.check_finite, "generate",
                               "latent.first");
  detail::require_finite_state(backend, latent.second, options.check_finite, "generate",
                               "latent.second");
  const auto batch = B::batch(latent.first), dim = B::dim(latent.first);
  auto st = method.make_stepper(backend, NodeAtLambda(schedule), nodes, model, batch, dim,
                                options.check_finite);
  State a = latent.first, b = latent.second; // allocated once, before the loop
  GenerateReport report;
  const int num_steps = static_cast<int>(nodes.size()) - 1;
  int done = st.first_step(); // BDIA's latent already holds the first step's result
  for (int k = st.first_step(); k < num_steps; ++k) {
    st.forward(k, a, b);
    ++done;
    const State& out = st.output_index() == 0 ? a : b;
    if (detail::notify_stop(observer, done, num_steps, nodes[static_cast<std::size_t>(k) + 1],
                            out)) {
      report.cancelled = true;
      break;
    }
  }
  report.steps_taken = done - st.first_step();
  report.model_evals = st.model_evals();
  detail::ensure_state_shape(backend, x, batch, dim);
  backend.copy(x, st.output_index() == 0 ? a : b);
  return report;
}

/// Noise -> data: x holds x_T at nodes[0] on entry and the sample on exit. BDIA makes its
/// second state with one plain DDIM step; EDICT and the coupling start from (x_T, x_T).
template <ReversibleMethod M, Backend B, class S, class Model, class Obs = NullObserver>
GenerateReport sample_from_noise(const M& method, const B& backend, const S& schedule,
                                 std::span<const Node> nodes, Model& model,
                                 typename B::state_type& x, const GenerateOptions& options = {},
                                 Obs&& observer = {}) {
  using State = typename B::state_type;
  method.validate(nodes);
  detail::require_finite_state(backend, x, options.check_finite, "sample_from_noise", "x");
  const auto batch = B::batch(x), dim = B::dim(x);
  auto st = method.make_stepper(backend, NodeAtLambda(schedule), nodes, model, batch, dim,
                                options.check_finite);
  State a = backend.make_state(batch, dim), b = backend.make_state(batch, dim);
  GenerateReport report;
  const int num_steps = static_cast<int>(nodes.size()) - 1;
  int done = 0;
  st.pair_from_noise(x, a, b);
  if (st.first_step() == 1) {
    ++done;
    report.cancelled = detail::notify_stop(observer, done, num_steps, nodes[1], b);
  }
  for (int k = st.first_step(); k < num_steps && !report.cancelled; ++k) {
    st.forward(k, a, b);
    ++done;
    const State& out = st.output_index() == 0 ? a : b;
    report.cancelled =
        detail::notify_stop(observer, done, num_steps, nodes[static_cast<std::size_t>(k) + 1], out);
  }
  report.steps_taken = done;
  report.model_evals = st.model_evals();
  backend.copy(x, st.output_index() == 0 ? a : b);
  return report;
}

} // namespace diffgrad
