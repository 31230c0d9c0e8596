#pragma once
// BDIA-DDIM (Zhang et al., "Exact diffusion inversion via bi-directional integration
// approximation", ECCV 2024, eqs. 24 and 28).
//
// In the paper's indexing (i = N noise .. 0 data), with eps_i = eps(z_i, t_i):
//   z_{N-1} = plain DDIM step from z_N
//   z_{i-1} = gamma z_{i+1} + cz_i z_i + ce_i eps_i,                        i = N-1 .. 1
//   cz_i = (alpha_{i-1} - gamma alpha_{i+1}) / alpha_i
//   ce_i = (sigma_{i-1} - gamma sigma_{i+1}) - sigma_i cz_i
// i.e. the DDIM step i -> i-1 plus gamma times (z_{i+1} minus the backward DDIM step
// i -> i+1), both taken from the middle state z_i. Solving for z_{i+1} gives the exact
// inverse (the model is evaluated at the middle state z_i, which both directions know):
//   z_{i+1} = (z_{i-1} - cz_i z_i - ce_i eps_i) / gamma.
// gamma = 0 is DDIM; gamma = 1 is time-symmetric. Inversion grows the (-1)^i mode by 1/gamma
// per step (amplification.hpp), so invert with gamma >= 0.9. Data -> noise inversion starts
// with one DDIM-inversion step z_1 from z_0 and returns the pair (z_N, z_{N-1}).
//
// In this library's indexing the state at nodes[k] is x_k = z_{N-k}; step k >= 1 maps the
// pair (x_{k-1}, x_k) to (x_k, x_{k+1}) with one model call and ONE fused lincomb.
#include <cstdint>
#include <span>
#include <utility>

#include "diffgrad/inversion/engine.hpp"
#include "diffgrad/solvers/ddim.hpp"

namespace diffgrad {

namespace coeffs {
/// z_next = prev * z_prev + x * z_cur + eps * eps(z_cur, cur) for the nodes prev (noisier),
/// cur, next (cleaner). prev = gamma, x = cz, eps = ce of the file comment, computed as
/// (forward DDIM cur->next) - gamma (backward DDIM cur->prev), so the eps coefficient keeps
/// the expm1 accuracy of coeffs::ddim (no sigma_{i-1} - sigma_i cz cancellation).
struct BdiaCoeffs {
  double prev, x, eps;
};
inline BdiaCoeffs bdia(const Node& prev, const Node& cur, const Node& next, double gamma) {
  const auto fwd = ddim(cur, next, 0.0);
  const auto bwd = ddim(cur, prev, 0.0);
  return {gamma, fwd.x - gamma * bwd.x, fwd.eps - gamma * bwd.eps};
}
} // namespace coeffs

template <Backend B, class Model> class BdiaStepper;

/// BDIA-DDIM with mixing gamma in [0, 1] (default 1: time-symmetric, exactly invertible,
/// no growth of rounding errors under inversion). Inversion needs gamma > 0.
class BdiaDdim {
public:
  using reversible_method_tag = void;
  explicit BdiaDdim(double gamma = 1.0) : gamma_(gamma) {
    detail::require(gamma >= 0.0 && gamma <= 1.0, "BdiaDdim", "gamma", "0 <= gamma <= 1", gamma);
  }
  double gamma() const { return gamma_; }
  static constexpr const char* name() { return "BDIA-DDIM"; }

  void validate(std::span<const Node> nodes) const { validate_nodes(nodes, "BdiaDdim"); }
  void validate_inversion() const {
    detail::require(gamma_ > 0.0, "BdiaDdim inversion", "gamma",
                    "gamma > 0 (gamma = 0 is plain DDIM, which has no exact inverse)", gamma_);
  }
  /// Growth 1/gamma per step over the N - 1 BDIA inverse steps (the first step is DDIM).
  AmplificationReport amplification(int num_steps, double threshold = 1e6) const {
    return make_amplification_report(name(), coeffs::bdia_amplification_per_step(gamma_),
                                     num_steps - 1, threshold);
  }

  template <Backend B, class Model>
  BdiaStepper<B, Model> make_stepper(const B& backend, NodeAtLambda, std::span<const Node> nodes,
                                     Model& model, std::int64_t batch, std::int64_t dim,
                                     bool check_finite) const {
    return BdiaStepper<B, Model>(gamma_, backend, nodes, model, batch, dim, check_finite);
  }

private:
  double gamma_;
};

/// Scratch and steps of BdiaDdim for one state shape: three state buffers, whatever N.
template <Backend B, class Model> class BdiaStepper {
public:
  using State = typename B::state_type;
  using Vector = typename B::vector_type;

  BdiaStepper(double gamma, const B& backend, std::span<const Node> nodes, Model& model,
              std::int64_t batch, std::int64_t dim, bool check_finite)
      : gamma_(gamma), backend_(backend), nodes_(nodes), eps_fn_{model, check_finite},
        eps_(backend.make_state(batch, dim)), cot_(backend.make_state(batch, dim)),
        dx_(backend.make_state(batch, dim)) {}

  int first_step() const { return 1; }
  int output_index() const { return 1; } ///< the newest state of the pair is the sample
  int model_evals() const { return eps_fn_.evals; }
  int vjps() const { return vjps_; }
  int state_buffers() const { return 3; }
  Node node_after_inverse(int k) const { return node(k - 1); }

  /// (x_0, x_1) from x_T: x_1 is one plain DDIM step.
  void pair_from_noise(const State& x_T, State& a, State& b) {
    backend_.copy(a, x_T);
    const auto c = coeffs::ddim(node(0), node(1), 0.0);
    eps_fn_(backend_, a, node(0), eps_, 0);
    backend_.lincomb(b, term(c.x, a), term(c.eps, eps_));
  }
  /// (x_{N-1}, x_N) from data x_N: x_{N-1} is one DDIM-inversion step (the model at x_N).
  /// Returns true: this is a model-evaluating step of its own.
  bool pair_from_data(const State& x0, State& a, State& b) {
    const int n = num_steps();
    backend_.copy(b, x0);
    const auto c = coeffs::ddim(node(n), node(n - 1), 0.0);
    eps_fn_(backend_, b, node(n), eps_, n);
    backend_.lincomb(a, term(c.x, b), term(c.eps, eps_));
    return true;
  }

  /// (a, b) = (x_{k-1}, x_k) -> (x_k, x_{k+1}).
  void forward(int k, State& a, State& b) {
    const auto c = coeffs::bdia(node(k - 1), node(k), node(k + 1), gamma_);
    eps_fn_(backend_, b, node(k), eps_, k);
    if (gamma_ == 0.0) // plain DDIM: skip the zero term (bitwise equal to Ddim)
      backend_.lincomb(a, term(c.x, b), term(c.eps, eps_));
    else
      backend_.lincomb(a, term(c.prev, a), term(c.x, b), term(c.eps, eps_));
    using std::swap;
    swap(a, b);
  }

  /// (a, b) = (x_k, x_{k+1}) -> (x_{k-1}, x_k); the model runs at the middle state x_k.
  void inverse(int k, State& a, State& b) {
    const auto c = coeffs::bdia(node(k - 1), node(k), node(k + 1), gamma_);
    eps_fn_(backend_, a, node(k), eps_, k);
    reconstruct(c, a, b);
  }

  /// inverse() plus the adjoint of step k: on entry (abar, bbar) = dL/d(x_k, x_{k+1}), on
  /// exit dL/d(x_{k-1}, x_k). x_{k+1} = gamma x_{k-1} + cz x_k + ce eps(x_k) gives
  ///   dL/dx_{k-1} = gamma bbar,   dL/dx_k = abar + cz bbar + J_eps(x_k)^T (ce bbar).
  void inverse_with_adjoint(int k, State& a, State& b, State& abar, State& bbar, Vector* dcond,
                            Vector* dparams) {
    const auto c = coeffs::bdia(node(k - 1), node(k), node(k + 1), gamma_);
    eps_fn_(backend_, a, node(k), eps_, k);
    backend_.lincomb(cot_, term(c.eps, bbar));
    eps_fn_.vjp(backend_, a, node(k), cot_, dx_, dcond, dparams, k);
    ++vjps_;
    backend_.lincomb(abar, term(1.0, abar), term(c.x, bbar), term(1.0, dx_));
    backend_.lincomb(bbar, term(c.prev, bbar));
    using std::swap;
    swap(abar, bbar);
    reconstruct(c, a, b);
  }

  /// dL/dx_T from dL/d(x_0, x_1), x_1 = DDIM(x_0): abar + a0 bbar + J_eps(x_0)^T (b0 bbar).
  void pair_from_noise_vjp(const State& a, const State&, const State& abar, const State& bbar,
                           State& xbar, Vector* dcond, Vector* dparams) {
    const auto c = coeffs::ddim(node(0), node(1), 0.0);
    backend_.lincomb(cot_, term(c.eps, bbar));
    eps_fn_.vjp(backend_, a, node(0), cot_, dx_, dcond, dparams, 0);
    ++vjps_;
    backend_.lincomb(xbar, term(1.0, abar), term(c.x, bbar), term(1.0, dx_));
  }

private:
  int num_steps() const { return static_cast<int>(nodes_.size()) - 1; }
  const Node& node(int k) const { return nodes_[static_cast<std::size_t>(k)]; }
  /// b <- (b - cz a - ce eps)/gamma, then swap: (x_k, x_{k+1}) -> (x_{k-1}, x_k).
  void reconstruct(const coeffs::BdiaCoeffs& c, State& a, State& b) {
    const double g = 1.0 / gamma_;
    backend_.lincomb(b, term(g, b), term(-c.x * g, a), term(-c.eps * g, eps_));
    using std::swap;
    swap(a, b);
  }

  double gamma_;
  const B& backend_;
  std::span<const Node> nodes_;
  detail::CountedEps<Model> eps_fn_;
  State eps_, cot_, dx_;
  int vjps_ = 0;
};

} // namespace diffgrad
