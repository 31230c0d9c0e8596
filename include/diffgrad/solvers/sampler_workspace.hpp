#pragma once
// What the sampling engine (solvers/sampler.hpp, solvers/stepper.hpp) runs on: the options, the
// result counters, the workspace of one scheme and state shape, and the engine's pre-loop
// validation and term gathering. All buffers are sized before the loop, so the loop never
// allocates.
#include <array>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad {

struct SampleOptions {
  std::uint64_t seed = 0; ///< Philox seed for stochastic schemes (step i uses counter i)
  /// Global sample index of x's first row in the noise stream (backend/lincomb_term.hpp): a
  /// shard of a larger batch passes its first row and draws exactly that batch's noise.
  std::uint64_t row_offset = 0;
  /// Check x_T, the given noise and every model output for NaN/Inf (one extra read pass
  /// each; x_T and the noise once, before the first step).
  bool check_finite = true;
};

struct SampleResult {
  int steps_taken = 0;
  int model_evals = 0;
  bool cancelled = false;
};

/// Buffers for one scheme and one state shape. Size is fixed at construction.
template <Backend B> class SamplerWorkspace {
public:
  using state_type = typename B::state_type;
  SamplerWorkspace(const B& backend, int history, int stages, std::int64_t batch, std::int64_t dim)
      : ring_(history + 1) {
    for (int k = 0; k < ring_; ++k) {
      x.push_back(backend.make_state(batch, dim));
      e.push_back(backend.make_state(batch, dim));
    }
    for (int s = 1; s < stages; ++s) {
      u.push_back(backend.make_state(batch, dim));
      ue.push_back(backend.make_state(batch, dim));
    }
  }
  int ring() const { return ring_; }
  std::vector<state_type> x, e;  ///< ring of states / model outputs, slot = step % ring
  std::vector<state_type> u, ue; ///< stage inputs / outputs for s >= 1 (index s - 1)
  /// Noise of stochastic steps. Empty: Philox noise keyed by (options.seed, step, index).
  /// Otherwise step i uses given_noise[i] (Cycle-SDE replays, gradients given the noise);
  /// it must hold one state per step, each of the workspace's shape and (with
  /// SampleOptions::check_finite) finite: run_scheme checks both before the first step.
  /// Not owned.
  std::span<const state_type> given_noise{};

private:
  int ring_;
};

namespace detail {

/// The plan type (and with it the coefficient kind) a scheme produces.
template <class Scheme>
using plan_type_t = std::remove_cvref_t<decltype(std::declval<const Scheme&>().plan(
    std::span<const Node>{}, 0, std::declval<NodeAtLambda>()))>;
template <class Scheme> using coeff_type_t = typename plan_type_t<Scheme>::coeff_type;

/// Collects the nonzero terms of `c` for step i (history j valid while i - 1 - j >= 0).
template <class State, class Coeff>
int gather_terms(const BasicCombo<Coeff>& c, int i, int ring, std::vector<State>& xs,
                 std::vector<State>& es, std::vector<State>& us, std::vector<State>& ues,
                 std::array<LinTerm<State, Coeff>, kMaxLincombTerms>& out) {
  int n = 0;
  auto add = [&](const Coeff& coeff, const State& v) {
    if (is_zero(coeff)) return;
    if (n == kMaxLincombTerms)
      throw std::logic_error("diffgrad: a step plan has more than kMaxLincombTerms terms");
    out[static_cast<std::size_t>(n++)] = LinTerm<State, Coeff>{coeff, &v};
  };
  const auto slot = [ring](int step) { return static_cast<std::size_t>(step % ring); };
  add(c.x, xs[slot(i)]);
  add(c.e[0], es[slot(i)]);
  for (int s = 1; s < kMaxStages; ++s) {
    if (!is_zero(c.u[s]) || !is_zero(c.e[s])) {
      add(c.u[s], us[static_cast<std::size_t>(s - 1)]);
      add(c.e[s], ues[static_cast<std::size_t>(s - 1)]);
    }
  }
  for (int j = 0; j < kMaxHistory; ++j) {
    if (is_zero(c.hist_x[j]) && is_zero(c.hist_e[j])) continue;
    if (i - 1 - j < 0 || j + 1 >= ring)
      throw std::logic_error("diffgrad: a step plan reads history that does not exist yet");
    add(c.hist_x[j], xs[slot(i - 1 - j)]);
    add(c.hist_e[j], es[slot(i - 1 - j)]);
  }
  return n;
}

/// The terms of step i's output lincomb (plan.output) and its noise, for every engine that
/// advances a step (Stepper, the discrete adjoint): Philox noise keyed by (seed, i, global
/// element), or, when the workspace holds caller-given noise states, given_noise[i] as one
/// more term. `ws` is any workspace with the engine's buffers (x, e, u, ue, given_noise).
/// Writes the term count to n and returns the noise term of the lincomb.
template <class Plan, class Ws, class State>
BasicNoiseTerm<typename Plan::coeff_type>
gather_output_terms(const Plan& plan, int i, int ring, Ws& ws, std::uint64_t seed,
                    std::uint64_t row_offset,
                    std::array<LinTerm<State, typename Plan::coeff_type>, kMaxLincombTerms>& terms,
                    int& n) {
  using Coeff = typename Plan::coeff_type;
  n = gather_terms(plan.output, i, ring, ws.x, ws.e, ws.u, ws.ue, terms);
  BasicNoiseTerm<Coeff> noise{plan.noise, seed, static_cast<std::uint64_t>(i), row_offset};
  if (!is_zero(plan.noise) && !ws.given_noise.empty()) {
    if (n == kMaxLincombTerms)
      throw std::logic_error("diffgrad: no room for the given-noise term in a step plan");
    terms[static_cast<std::size_t>(n++)] =
        LinTerm<State, Coeff>{plan.noise, &ws.given_noise[static_cast<std::size_t>(i)]};
    noise.coeff = Coeff{};
  }
  return noise;
}

/// Schemes with structured coefficients constrain the state width (a Block2 plan needs two
/// halves; a ColumnCoeff table has one entry per column): they say so through
/// accepts_dim(dim) and dim_requirement(). Scalar schemes accept any width.
template <class Scheme>
void check_scheme_dim(const char* where, const Scheme& scheme, std::int64_t dim) {
  if constexpr (requires { scheme.accepts_dim(dim); })
    if (!scheme.accepts_dim(dim))
      throw_argument(where, "x", concat("a state width of ", scheme.dim_requirement()),
                     concat("width ", dim));
}

/// The checks of run_scheme / sample, all before the step loop: O(1) shape compares per
/// buffer and noise state, plus (with options.check_finite) one read pass over x_T and over
/// each given noise state, so a non-finite input is named instead of being blamed on the
/// model's output at step 0 (or passing unseen when the model ignores its input).
template <class Scheme, Backend B>
void validate_run_inputs(const char* where, const Scheme& scheme, const B& backend, int num_steps,
                         const typename B::state_type& x, const SamplerWorkspace<B>& ws,
                         const SampleOptions& options) {
  using State = typename B::state_type;
  if (ws.ring() != scheme.history() + 1 || static_cast<int>(ws.u.size()) + 1 < scheme.stages())
    throw invalid_argument(concat(where, ": argument 'ws' expected a workspace built for this "
                                         "scheme's history and stage count"));
  // Every buffer of the workspace must have one shape: its members are public, and a
  // replaced buffer of another shape would be read out of bounds by a fused lincomb.
  const auto batch = B::batch(ws.x[0]), dim = B::dim(ws.x[0]);
  const auto same = [&](const State& s) { return B::batch(s) == batch && B::dim(s) == dim; };
  const auto check_buffers = [&](const std::vector<State>& v, const char* name) {
    for (std::size_t k = 0; k < v.size(); ++k)
      if (!same(v[k]))
        throw invalid_argument(concat(where, ": argument 'ws' expected buffers of one shape (",
                                      batch, " x ", dim, "), got ", name, "[", k, "] of shape ",
                                      B::batch(v[k]), " x ", B::dim(v[k])));
  };
  check_buffers(ws.x, "ws.x");
  check_buffers(ws.e, "ws.e");
  check_buffers(ws.u, "ws.u");
  check_buffers(ws.ue, "ws.ue");
  if (!same(x))
    throw_argument(where, "x",
                   concat("shape ", batch, " x ", dim, " (batch x dim, as the workspace)"),
                   concat(B::batch(x), " x ", B::dim(x)));
  check_scheme_dim(where, scheme, dim);
  if (!ws.given_noise.empty()) {
    if (static_cast<int>(ws.given_noise.size()) < num_steps)
      throw_argument(where, "ws.given_noise", concat("one noise state per step (", num_steps, ")"),
                     ws.given_noise.size());
    for (int i = 0; i < num_steps; ++i) {
      const State& xi = ws.given_noise[static_cast<std::size_t>(i)];
      if (!same(xi))
        throw invalid_argument(concat(where, ": argument 'ws.given_noise[", i, "]' expected shape ",
                                      batch, " x ", dim, " (batch x dim, as x), got ", B::batch(xi),
                                      " x ", B::dim(xi)));
      if (options.check_finite && !backend.all_finite(xi))
        throw invalid_argument(concat(where, ": argument 'ws.given_noise[", i,
                                      "]' expected finite values, got NaN or Inf"));
    }
  }
  if (options.check_finite && !backend.all_finite(x))
    throw_argument(where, "x", "finite values (x_T at nodes[0])", "NaN or Inf");
}

} // namespace detail

} // namespace diffgrad
