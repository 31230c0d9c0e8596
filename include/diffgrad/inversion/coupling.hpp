#pragma once
// Reversible coupling of a one-step sampler (McCallum & Foster, "Efficient, accurate and
// stable gradients for neural ODEs", 2024). With Phi_{s->t} the sampler's one-step map and
// Psi_h(z) = Phi_{s->t}(z) - z its increment, one step from node s to node t is
//   y' = c y + (1 - c) z + Psi_h(z)       = c (y - z) + Phi_{s->t}(z)
//   z' = z - Psi_{-h}(y')                 = z + y' - Phi_{t->s}(y')
// and its exact inverse is
//   z  = z' + Phi_{t->s}(y') - y'
//   y  = (y' - Phi_{s->t}(z)) / c + z.
// Any deterministic one-step scheme of this library works (history() == 0): Phi_{s->t} is
// the scheme's own StepPlan for step k of the grid, Phi_{t->s} its StepPlan for the
// one-interval grid {t, s} (the same formulas with h < 0; a scheme whose plan depends on the
// step's position, like a per-step order list, sees step 0 of that one-interval grid). A
// small stage engine here runs the plans, so DDIM, DPM-Solver(++)-2/3 singlestep and RK-type
// schemes all become exactly invertible at 2 x stages model calls per step. Exactness never
// depends on Phi_{t->s} inverting Phi_{s->t}: any pair of maps gives an exact inverse. The coupling
// damps y - z by c per step; inversion grows it by 1/c (amplification.hpp). The sample is y.
#include <array>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "diffgrad/inversion/engine.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad {

namespace detail {

/// Runs one StepPlan without history on an input state and keeps its stage states, so the
/// same map's VJP can be taken afterwards (reverse-mode through the stages).
template <Backend B> class OneStepMap {
public:
  using State = typename B::state_type;
  using Vector = typename B::vector_type;

  OneStepMap(const B& backend, int stages, std::int64_t batch, std::int64_t dim) {
    for (int s = 0; s < stages; ++s) {
      e_.push_back(backend.make_state(batch, dim));
      ebar_.push_back(backend.make_state(batch, dim));
      if (s > 0) {
        u_.push_back(backend.make_state(batch, dim));
        ubar_.push_back(backend.make_state(batch, dim));
      }
    }
  }
  int state_buffers() const { return static_cast<int>(2 * e_.size() + 2 * u_.size()); }

  /// out = Phi(x). `x` must stay unchanged until vjp() has been called.
  template <class Model>
  void evaluate(const B& backend, const StepPlan& plan, CountedEps<Model>& eps_fn, const State& x,
                State& out, int step) {
    check_plan(plan);
    plan_ = plan;
    std::array<LinTerm<State>, kMaxLincombTerms> terms{};
    for (int s = 0; s < plan.num_stages; ++s) {
      if (s > 0) {
        const int n = gather(plan.stage_input[s], x, terms);
        backend.lincomb(u_[idx(s - 1)], std::span<const LinTerm<State>>(terms.data(), idx(n)));
      }
      eps_fn(backend, stage_input(s, x), plan.stage_node[s], e_[idx(s)], step);
    }
    const int n = gather(plan.output, x, terms);
    backend.lincomb(out, std::span<const LinTerm<State>>(terms.data(), idx(n)));
  }

  /// xbar = (dPhi/dx)^T w at the x of the last evaluate(); *dcond/*dparams accumulate the
  /// model's conditioning/parameter VJPs (checked by eps_fn.vjp). dx is scratch. One model
  /// VJP per stage.
  template <class Model>
  int vjp(const B& backend, CountedEps<Model>& eps_fn, const State& x, const State& w, State& xbar,
          State& dx, Vector* dcond, Vector* dparams, int step) {
    const StepPlan& p = plan_;
    const int S = p.num_stages;
    backend.lincomb(xbar, term(p.output.x, w));
    for (int s = 0; s < S; ++s) {
      backend.lincomb(ebar_[idx(s)], term(p.output.e[s], w));
      if (s > 0) backend.lincomb(ubar_[idx(s - 1)], term(p.output.u[s], w));
    }
    for (int s = S - 1; s >= 0; --s) {
      eps_fn.vjp(backend, stage_input(s, x), p.stage_node[s], ebar_[idx(s)], dx, dcond, dparams,
                 step);
      if (s == 0) {
        backend.lincomb(xbar, term(1.0, xbar), term(1.0, dx));
        break;
      }
      State& ub = ubar_[idx(s - 1)];
      backend.lincomb(ub, term(1.0, ub), term(1.0, dx));
      // u_s = Combo(x, u_<s, e_<s): pull ub back into its inputs.
      const Combo& c = p.stage_input[s];
      if (c.x != 0.0) backend.lincomb(xbar, term(1.0, xbar), term(c.x, ub));
      for (int r = 0; r < s; ++r) {
        if (c.e[r] != 0.0)
          backend.lincomb(ebar_[idx(r)], term(1.0, ebar_[idx(r)]), term(c.e[r], ub));
        if (r > 0 && c.u[r] != 0.0)
          backend.lincomb(ubar_[idx(r - 1)], term(1.0, ubar_[idx(r - 1)]), term(c.u[r], ub));
      }
    }
    return S;
  }

private:
  static std::size_t idx(int i) { return static_cast<std::size_t>(i); }
  const State& stage_input(int s, const State& x) const { return s == 0 ? x : u_[idx(s - 1)]; }

  static void check_plan(const StepPlan& p) {
    if (p.noise != 0.0)
      throw invalid_argument("ReversibleCoupling: argument 'scheme' expected a deterministic "
                             "scheme (its step plan has a noise term)");
    auto no_history = [](const Combo& c) {
      for (int j = 0; j < kMaxHistory; ++j)
        if (c.hist_x[j] != 0.0 || c.hist_e[j] != 0.0) return false;
      return true;
    };
    bool ok = no_history(p.output);
    for (int s = 1; s < p.num_stages; ++s) ok = ok && no_history(p.stage_input[s]);
    if (!ok)
      throw invalid_argument("ReversibleCoupling: argument 'scheme' expected a one-step scheme "
                             "(its step plan reads earlier steps)");
  }

  int gather(const Combo& c, const State& x,
             std::array<LinTerm<State>, kMaxLincombTerms>& out) const {
    int n = 0;
    auto add = [&](double coeff, const State& v) {
      if (coeff != 0.0) out[idx(n++)] = LinTerm<State>{coeff, &v};
    };
    add(c.x, x);
    for (int s = 0; s < plan_.num_stages; ++s) {
      if (s > 0) add(c.u[s], u_[idx(s - 1)]);
      add(c.e[s], e_[idx(s)]);
    }
    if (n == 0) out[idx(n++)] = LinTerm<State>{0.0, &x}; // an all-zero combination
    return n;
  }

  StepPlan plan_{};
  std::vector<State> e_, u_, ebar_, ubar_;
};

} // namespace detail

template <class Scheme, Backend B, class Model> class CouplingStepper;

/// McCallum-Foster coupling of a deterministic one-step scheme (default DDIM) with coupling
/// parameter c in (0, 1] (default 0.999).
template <class Scheme = Ddim> class ReversibleCoupling {
public:
  using reversible_method_tag = void;
  explicit ReversibleCoupling(Scheme scheme = Scheme{}, double c = 0.999)
      : scheme_(std::move(scheme)), c_(c) {
    detail::require(c > 0.0 && c <= 1.0, "ReversibleCoupling", "c", "coupling parameter 0 < c <= 1",
                    c);
    detail::require(scheme_.history() == 0, "ReversibleCoupling", "scheme",
                    "a one-step scheme (history() == 0)", scheme_.history());
    detail::require(!scheme_.stochastic(), "ReversibleCoupling", "scheme",
                    "a deterministic scheme (stochastic() == false)", 1.0);
    detail::require(scheme_.stages() >= 1 && scheme_.stages() <= kMaxStages, "ReversibleCoupling",
                    "scheme", detail::concat("1..", kMaxStages, " stages"), scheme_.stages());
  }
  const Scheme& scheme() const { return scheme_; }
  double c() const { return c_; }
  static constexpr const char* name() { return "reversible coupling"; }

  void validate(std::span<const Node> nodes) const { scheme_.validate(nodes); }
  void validate_inversion() const {}
  /// Growth 1/c per inverse step, over N steps.
  AmplificationReport amplification(int num_steps, double threshold = 1e6) const {
    return make_amplification_report(name(), coeffs::coupling_amplification_per_step(c_), num_steps,
                                     threshold);
  }

  template <Backend B, class Model>
  CouplingStepper<Scheme, B, Model>
  make_stepper(const B& backend, NodeAtLambda node_at_lambda, std::span<const Node> nodes,
               Model& model, std::int64_t batch, std::int64_t dim, bool check_finite) const {
    return CouplingStepper<Scheme, B, Model>(scheme_, c_, backend, node_at_lambda, nodes, model,
                                             batch, dim, check_finite);
  }

private:
  Scheme scheme_;
  double c_;
};

template <class Scheme> ReversibleCoupling(Scheme, double) -> ReversibleCoupling<Scheme>;

/// Scratch and steps of ReversibleCoupling for one state shape. The pair (a, b) is (y, z).
template <class Scheme, Backend B, class Model> class CouplingStepper {
public:
  using State = typename B::state_type;
  using Vector = typename B::vector_type;

  CouplingStepper(const Scheme& scheme, double c, const B& backend, NodeAtLambda node_at_lambda,
                  std::span<const Node> nodes, Model& model, std::int64_t batch, std::int64_t dim,
                  bool check_finite)
      : scheme_(scheme), c_(c), backend_(backend), node_at_lambda_(node_at_lambda),
        nodes_(nodes), eps_fn_{model, check_finite},
        forward_map_(backend, scheme.stages(), batch, dim),
        backward_map_(backend, scheme.stages(), batch, dim), phi_(backend.make_state(batch, dim)),
        w_(backend.make_state(batch, dim)), g_(backend.make_state(batch, dim)),
        dx_(backend.make_state(batch, dim)) {}

  int first_step() const { return 0; }
  int output_index() const { return 0; } ///< the sample is y
  int model_evals() const { return eps_fn_.evals; }
  int vjps() const { return vjps_; }
  int state_buffers() const {
    return 4 + forward_map_.state_buffers() + backward_map_.state_buffers();
  }
  Node node_after_inverse(int k) const { return node(k); }

  void pair_from_noise(const State& x_T, State& y, State& z) {
    backend_.copy(y, x_T);
    backend_.copy(z, x_T);
  }
  bool pair_from_data(const State& x0, State& y, State& z) {
    backend_.copy(y, x0);
    backend_.copy(z, x0);
    return false;
  }
  void pair_from_noise_vjp(const State&, const State&, const State& ybar, const State& zbar,
                           State& out, Vector*, Vector*) {
    backend_.lincomb(out, term(1.0, ybar), term(1.0, zbar));
  }

  void forward(int k, State& y, State& z) {
    forward_map_.evaluate(backend_, plan(k, false), eps_fn_, z, phi_, k);
    backend_.lincomb(y, term(c_, y), term(-c_, z), term(1.0, phi_));
    backward_map_.evaluate(backend_, plan(k, true), eps_fn_, y, phi_, k);
    backend_.lincomb(z, term(1.0, z), term(1.0, y), term(-1.0, phi_));
  }

  void inverse(int k, State& y, State& z) {
    backward_map_.evaluate(backend_, plan(k, true), eps_fn_, y, phi_, k);
    backend_.lincomb(z, term(1.0, z), term(-1.0, y), term(1.0, phi_));
    forward_map_.evaluate(backend_, plan(k, false), eps_fn_, z, phi_, k);
    backend_.lincomb(y, term(1.0 / c_, y), term(-1.0 / c_, phi_), term(1.0, z));
  }

  /// inverse() plus the adjoint of step k; (ybar, zbar) = dL/d(y', z') in, dL/d(y, z) out:
  ///   Y  = ybar + zbar - J_{t->s}(y')^T zbar     (total dL/dy', as z' reads y')
  ///   dL/dy = c Y,   dL/dz = zbar - c Y + J_{s->t}(z)^T Y.
  void inverse_with_adjoint(int k, State& y, State& z, State& ybar, State& zbar, Vector* dcond,
                            Vector* dparams) {
    backward_map_.evaluate(backend_, plan(k, true), eps_fn_, y, phi_, k);
    backend_.lincomb(z, term(1.0, z), term(-1.0, y), term(1.0, phi_));
    backend_.lincomb(w_, term(-1.0, zbar));
    vjps_ += backward_map_.vjp(backend_, eps_fn_, y, w_, g_, dx_, dcond, dparams, k);
    backend_.lincomb(ybar, term(1.0, ybar), term(1.0, zbar), term(1.0, g_));
    forward_map_.evaluate(backend_, plan(k, false), eps_fn_, z, phi_, k);
    backend_.lincomb(y, term(1.0 / c_, y), term(-1.0 / c_, phi_), term(1.0, z));
    vjps_ += forward_map_.vjp(backend_, eps_fn_, z, ybar, g_, dx_, dcond, dparams, k);
    backend_.lincomb(zbar, term(1.0, zbar), term(-c_, ybar), term(1.0, g_));
    backend_.lincomb(ybar, term(c_, ybar));
  }

private:
  const Node& node(int k) const { return nodes_[static_cast<std::size_t>(k)]; }
  /// Forward: the scheme's own plan for step k of the grid (its per-step rules apply).
  /// Backward: its plan for the one-interval grid {t, s}, i.e. the same scheme run with h < 0.
  StepPlan plan(int k, bool backward) const {
    if (!backward) return scheme_.plan(nodes_, k, node_at_lambda_);
    const std::array<Node, 2> reversed{node(k + 1), node(k)};
    return scheme_.plan(std::span<const Node>(reversed.data(), 2), 0, node_at_lambda_);
  }

  const Scheme& scheme_;
  double c_;
  const B& backend_;
  NodeAtLambda node_at_lambda_;
  std::span<const Node> nodes_;
  detail::CountedEps<Model> eps_fn_;
  detail::OneStepMap<B> forward_map_, backward_map_;
  State phi_, w_, g_, dx_;
  int vjps_ = 0;
};

} // namespace diffgrad
