#pragma once
// EDICT (Wallace et al., "EDICT: Exact diffusion inversion via coupled transformations",
// CVPR 2023; BDIA paper eqs. 9-16). Two coupled copies (x, y) of the state; one step
// from node s to node t with the DDIM coefficients a = alpha_t/alpha_s, b = -sigma_t(e^h - 1):
//   x_int = a x + b eps(y, s)
//   y_int = a y + b eps(x_int, s)
//   x'    = p x_int + (1 - p) y_int
//   y'    = p y_int + (1 - p) x'
// Every line is solvable for its left-hand side's old value, so the inverse runs the lines
// backwards (2 model calls per step either way). The mixing layer has eigenvalues 1 and
// p^2: it damps x - y by p^2 forward and grows it by 1/p^2 under inversion (p = 0.93, the
// authors' value, grows it ~1400x over 50 steps).
//
// leapfrog (off by default; on in diffusers' EDICTPipeline): on odd steps the two half-steps
// swap roles (y is updated first from eps(x), then x from eps(y_int)); the mixing layer is
// unchanged. The sample is x.
#include <cstdint>
#include <span>

#include "diffgrad/inversion/engine.hpp"
#include "diffgrad/solvers/ddim.hpp"

namespace diffgrad {

template <Backend B, class Model> class EdictStepper;

class Edict {
public:
  using reversible_method_tag = void;
  explicit Edict(double p = 0.93, bool leapfrog = false) : p_(p), leapfrog_(leapfrog) {
    detail::require(p > 0.0 && p <= 1.0, "Edict", "p", "mixing weight 0 < p <= 1", p);
  }
  double p() const { return p_; }
  bool leapfrog() const { return leapfrog_; }
  static constexpr const char* name() { return "EDICT"; }

  void validate(std::span<const Node> nodes) const { validate_nodes(nodes, "Edict"); }
  void validate_inversion() const {}
  /// Growth 1/p^2 per inverse step, over N steps.
  AmplificationReport amplification(int num_steps, double threshold = 1e6) const {
    return make_amplification_report(name(), coeffs::edict_amplification_per_step(p_), num_steps,
                                     threshold);
  }

  template <Backend B, class Model>
  EdictStepper<B, Model> make_stepper(const B& backend, NodeAtLambda, std::span<const Node> nodes,
                                      Model& model, std::int64_t batch, std::int64_t dim,
                                      bool check_finite) const {
    return EdictStepper<B, Model>(p_, leapfrog_, backend, nodes, model, batch, dim, check_finite);
  }

private:
  double p_;
  bool leapfrog_;
};

/// Scratch and steps of Edict for one state shape: three state buffers, whatever N.
/// The pair (a, b) is (x, y).
template <Backend B, class Model> class EdictStepper {
public:
  using State = typename B::state_type;
  using Vector = typename B::vector_type;

  EdictStepper(double p, bool leapfrog, const B& backend, std::span<const Node> nodes, Model& model,
               std::int64_t batch, std::int64_t dim, bool check_finite)
      : p_(p), leapfrog_(leapfrog), backend_(backend), nodes_(nodes), eps_fn_{model, check_finite},
        eps_(backend.make_state(batch, dim)), cot_(backend.make_state(batch, dim)),
        dx_(backend.make_state(batch, dim)) {}

  int first_step() const { return 0; }
  int output_index() const { return 0; } ///< the sample is x
  int model_evals() const { return eps_fn_.evals; }
  int vjps() const { return vjps_; }
  int state_buffers() const { return 3; }
  Node node_after_inverse(int k) const { return node(k); }

  void pair_from_noise(const State& x_T, State& x, State& y) {
    backend_.copy(x, x_T);
    backend_.copy(y, x_T);
  }
  bool pair_from_data(const State& x0, State& x, State& y) {
    backend_.copy(x, x0);
    backend_.copy(y, x0);
    return false; // no model call: not a step of its own
  }
  void pair_from_noise_vjp(const State&, const State&, const State& xbar, const State& ybar,
                           State& out, Vector*, Vector*) {
    backend_.lincomb(out, term(1.0, xbar), term(1.0, ybar));
  }

  void forward(int k, State& x, State& y) {
    const auto c = coeffs::ddim(node(k), node(k + 1), 0.0);
    State& first = swapped(k) ? y : x;  // updated first, from eps(second)
    State& second = swapped(k) ? x : y; // updated second, from eps(first_int)
    eps_fn_(backend_, second, node(k), eps_, k);
    backend_.lincomb(first, term(c.x, first), term(c.eps, eps_));
    eps_fn_(backend_, first, node(k), eps_, k);
    backend_.lincomb(second, term(c.x, second), term(c.eps, eps_));
    backend_.lincomb(x, term(p_, x), term(1.0 - p_, y));
    backend_.lincomb(y, term(p_, y), term(1.0 - p_, x));
  }

  void inverse(int k, State& x, State& y) {
    const auto c = coeffs::ddim(node(k), node(k + 1), 0.0);
    unmix(x, y);
    State& first = swapped(k) ? y : x;
    State& second = swapped(k) ? x : y;
    eps_fn_(backend_, first, node(k), eps_, k);
    backend_.lincomb(second, term(1.0 / c.x, second), term(-c.eps / c.x, eps_));
    eps_fn_(backend_, second, node(k), eps_, k);
    backend_.lincomb(first, term(1.0 / c.x, first), term(-c.eps / c.x, eps_));
  }

  /// inverse() plus the adjoint of step k; (xbar, ybar) = dL/d(x', y') in, dL/d(x, y) out.
  void inverse_with_adjoint(int k, State& x, State& y, State& xbar, State& ybar, Vector* dcond,
                            Vector* dparams) {
    const auto c = coeffs::ddim(node(k), node(k + 1), 0.0);
    unmix(x, y);
    // Mixing adjoint: y' = p y_int + (1-p) x', x' = p x_int + (1-p) y_int.
    backend_.lincomb(xbar, term(1.0, xbar), term(1.0 - p_, ybar)); // total dL/dx'
    backend_.lincomb(ybar, term(p_, ybar), term(1.0 - p_, xbar));  // dL/dy_int
    backend_.lincomb(xbar, term(p_, xbar));                        // dL/dx_int
    State& first = swapped(k) ? y : x;
    State& second = swapped(k) ? x : y;
    State& first_bar = swapped(k) ? ybar : xbar;
    State& second_bar = swapped(k) ? xbar : ybar;
    // second_int = a second + b eps(first_int): the VJP at first_int, before it moves.
    eps_fn_(backend_, first, node(k), eps_, k);
    vjp_into(first, node(k), c.eps, second_bar, first_bar, dcond, dparams, k);
    backend_.lincomb(second_bar, term(c.x, second_bar));
    backend_.lincomb(second, term(1.0 / c.x, second), term(-c.eps / c.x, eps_));
    // first_int = a first + b eps(second): the VJP at the reconstructed second.
    eps_fn_(backend_, second, node(k), eps_, k);
    vjp_into(second, node(k), c.eps, first_bar, second_bar, dcond, dparams, k);
    backend_.lincomb(first_bar, term(c.x, first_bar));
    backend_.lincomb(first, term(1.0 / c.x, first), term(-c.eps / c.x, eps_));
  }

private:
  const Node& node(int k) const { return nodes_[static_cast<std::size_t>(k)]; }
  bool swapped(int k) const { return leapfrog_ && (k % 2 == 1); }
  /// (x', y') -> (x_int, y_int): y_int = (y' - (1-p) x')/p, then x_int = (x' - (1-p) y_int)/p.
  void unmix(State& x, State& y) {
    const double q = (1.0 - p_) / p_;
    backend_.lincomb(y, term(1.0 / p_, y), term(-q, x));
    backend_.lincomb(x, term(1.0 / p_, x), term(-q, y));
  }
  /// acc += J_eps(at)^T (b * cot).
  void vjp_into(const State& at, const Node& n, double b, const State& cot, State& acc,
                Vector* dcond, Vector* dparams, int step) {
    backend_.lincomb(cot_, term(b, cot));
    eps_fn_.vjp(backend_, at, n, cot_, dx_, dcond, dparams, step);
    ++vjps_;
    backend_.lincomb(acc, term(1.0, acc), term(1.0, dx_));
  }

  double p_;
  bool leapfrog_;
  const B& backend_;
  std::span<const Node> nodes_;
  detail::CountedEps<Model> eps_fn_;
  State eps_, cot_, dx_;
  int vjps_ = 0;
};

} // namespace diffgrad
