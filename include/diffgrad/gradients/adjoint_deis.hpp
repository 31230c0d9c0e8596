#pragma once
// AdjointDEIS (Blasingame & Liu 2024): the continuous adjoint of the PF-ODE, solved with an
// exponential integrator from the data end back to the noise end. Gives dL/dx_T and, as
// integrals along the trajectory, dL/dz (conditioning) and dL/dtheta (parameters).
// Optimize-then-discretize: the result approximates the gradient of the EXACT flow with a
// measured order (1 for AdjointDEIS-1, 2 for AdjointDEIS-2M); it is not the gradient of the
// numbers a sampler produced (for that use the exact discrete adjoint, gradients/gradient.hpp).
//
// Each adjoint step is: scalar coefficients (coeffs/adjoint_deis.hpp) + one VJP + one fused
// lincomb. The states the VJPs need come either from a cached forward trajectory (recorded by
// TrajectoryCache during sampling) or are re-solved backwards alongside the adjoint (DDIM
// inversion / its 2M twin: one extra model evaluation and one extra lincomb per step).
//
// Scaled adjoint. The model's vjp ADDS (d eps/dz)^T cotangent to dL/dz, and the z-integral wants
// omega_m (d eps/dz)^T a_m with a node weight omega_m known in advance (the grid is fixed). So the
// loop carries b_m = kappa_m a_m (kappa_m = omega_m, or 1 where no z/theta gradient is wanted or
// omega_m = 0) and feeds b_m as the cotangent: dx = kappa_m V_m, dz += omega_m W_m, and the
// adjoint update absorbs 1/kappa into its coefficients. One VJP, one lincomb, no extra pass.
//
// Step-size stability. The adjoint runs from data to noise, where the exponential weight e^-lambda
// of the integrals grows, so its explicit steps have a stability bound in h = lambda_s - lambda_t.
// Test problem: a collapsed posterior (near the data of a memorising or low-dimensional model,
// eps = (x - alpha y)/sigma, sigma d eps/dx = I), where V = a/sigma and u = alpha a obeys
// du/dlambda = w u (w = vjp_weight: 1 for the PF-ODE, 2 for the SDE). One exact step multiplies u
// by e^{-w|h|} in (0, 1); AdjointDEIS-1 multiplies it by R = 1 + w (1 - e^{|h|}), which
// agrees to first order only, turns negative at |h| = ln(1 + 1/w) and falls below -1 at
//   |h| = ln(1 + 2/w):   ln 3 = 1.0986 for AdjointDEIS-1,   ln 2 = 0.6931 for SDE-AdjointDEIS-1.
// Past it every such step amplifies the adjoint and flips its sign, so dL/dx_T can point away
// from the true gradient (a uniform-t grid over VP-linear to t = 1e-3 has |h| = 2.6 in its last
// step at N = 25). For -2M the two-step recurrence u_s = A u_t + B u_r on uniform steps has a
// root of modulus > 1 beyond a smaller bound (0.58 for the PF-ODE, 0.36 for the SDE, exact
// integral weights), computed below from the same closed forms. With 0 <= sigma d eps/dx <= I
// (eigenvalues c in [0, 1]: w becomes w c) the bound only grows, so c = 1 is the worst case.
// Every solve reports its grid against the bound (AdjointCost::stability) and, by option,
// calls back or refuses before any model call (AdjointDeisOptions::stability).
#include <algorithm>
#include <array>
#include <cmath>
#include <complex>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
#include <vector>

#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/coeffs/adjoint_deis.hpp"
#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/concepts/model.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/gradients/vjp_call.hpp"
#include "diffgrad/inversion/amplification.hpp"
#include "diffgrad/schedule/node.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/solvers/model_call.hpp"

namespace diffgrad {

/// How a continuous-adjoint grid compares with the method's step-size stability bound (see
/// the header note). Steps are numbered as sampling steps: step i goes from nodes[i] to
/// nodes[i+1] (i = 0 at the noise end); |h| = lambda_{i+1} - lambda_i.
struct AdjointStabilityReport {
  const char* method = "";        ///< "AdjointDEIS-1", "AdjointDEIS-2M", "SDE-AdjointDEIS-1", ...
  double bound = 0.0;             ///< largest stable |h| of the method's multistep steps (of its
                                  ///< first-order steps for order 1): ln 3 for AdjointDEIS-1
  double bound_first_order = 0.0; ///< the bound of its first-order step (-2M's first adjoint step)
  double max_abs_h = 0.0;         ///< largest finite |h| of the grid
  int max_step = -1;              ///< the step where it occurs
  double factor_at_max = 1.0;     ///< test-problem growth of that step relative to alpha_t/alpha_s
                                  ///< (exact: e^{-w|h|} in (0, 1); unstable: below -1 or, for -2M,
                                  ///< the recurrence's largest root modulus above 1)
  int steps_beyond = 0;           ///< steps with |h| above their bound
  int first_beyond = -1;          ///< the first of them from the noise end (-1: none)
  std::vector<int> beyond{};      ///< all of them, increasing
  bool warned = false;            ///< exceeded under AmplificationPolicy::warn
  bool exceeded() const { return steps_beyond > 0; }
};

/// What to do when a step exceeds the bound: ignore (report only), warn (the default: set
/// report.warned and call on_warning if set) or refuse (throw diffgrad::numerical_error before
/// any model call).
struct AdjointStabilityOptions {
  AmplificationPolicy policy = AmplificationPolicy::warn;
  std::function<void(const AdjointStabilityReport&)> on_warning{};
};

struct AdjointDeisOptions {
  int order = 1; ///< 1: AdjointDEIS-1; 2: AdjointDEIS-2M (first step first order)
  AdjointMultistepWeights weights = AdjointMultistepWeights::exact_integral; ///< 2M slope weights
  bool check_finite = true;            ///< check every VJP / model output for NaN/Inf
  AdjointStabilityOptions stability{}; ///< step-size stability check of the grid
};

/// Cost record of one continuous-adjoint solve.
struct AdjointCost {
  int steps = 0;       ///< adjoint steps taken (= nodes.size() - 1)
  int model_evals = 0; ///< eps evaluations (0 with a cached trajectory, N when re-solving)
  int vjps = 0;        ///< vector-Jacobian products (N)
  AdjointStabilityReport stability{}; ///< the grid against the method's stability bound
};

/// Growth per step of the adjoint on the collapsed-posterior test problem (header note),
/// relative to alpha_t/alpha_s, for a step of |h| = abs_h on a uniform grid:
/// order 1: R = 1 + w (1 - e^{|h|}) (signed); order 2 (-2M): the largest root modulus of
/// z^2 = A z + B, u_s = A u_t + B u_r. The exact value is e^{-w|h|}.
inline double
adjoint_test_factor(int order, double vjp_weight, double abs_h,
                    AdjointMultistepWeights weights = AdjointMultistepWeights::exact_integral) {
  const double w = vjp_weight, k = abs_h;
  const double first = 1.0 + w * (1.0 - std::exp(k));
  if (order == 1 || !(k > 0.0)) return first;
  // Slope term of the linear interpolant through r (lambda_t + k) and t, integrated against
  // e^-lambda from lambda_t to lambda_t - k, in units of e^-lambda_t: the exact integral gives
  // (1 - e^k (1 - k))/k, the paper's weights (e^k - 1)/2 (both k/2 + O(k^2)).
  const double j = weights == AdjointMultistepWeights::paper ? 0.5 * std::expm1(k)
                                                             : (1.0 - std::exp(k) * (1.0 - k)) / k;
  const double A = first - w * j;
  const double B = w * std::exp(k) * j;
  const std::complex<double> d = std::sqrt(std::complex<double>(A * A + 4.0 * B, 0.0));
  return std::max(std::abs(0.5 * (A + d)), std::abs(0.5 * (A - d)));
}

/// Largest |h| for which adjoint_test_factor stays within [-1, 1]: ln(1 + 2/w) for order 1
/// (ln 3 for AdjointDEIS-1, ln 2 for SDE-AdjointDEIS-1); for order 2 found by a scan from 0
/// and bisection (0.5825 for AdjointDEIS-2M, 0.3621 for SDE-AdjointDEIS-2M).
inline double
adjoint_stability_bound(int order, double vjp_weight,
                        AdjointMultistepWeights weights = AdjointMultistepWeights::exact_integral) {
  detail::require(order == 1 || order == 2, "adjoint_stability_bound", "order", "1 or 2", order);
  detail::require(vjp_weight > 0.0 && std::isfinite(vjp_weight), "adjoint_stability_bound",
                  "vjp_weight", "a finite weight > 0", vjp_weight);
  const double first = std::log1p(2.0 / vjp_weight);
  if (order == 1) return first;
  const auto stable = [&](double k) {
    return std::abs(adjoint_test_factor(2, vjp_weight, k, weights)) <= 1.0;
  };
  double lo = 0.0, hi = first;
  for (double k = 1e-3; k < first; k += 1e-3)
    if (!stable(k)) {
      hi = k;
      break;
    } else {
      lo = k;
    }
  if (hi == first && stable(first)) return first;
  for (int it = 0; it < 60; ++it) {
    const double mid = 0.5 * (lo + hi);
    (stable(mid) ? lo : hi) = mid;
  }
  return lo;
}

namespace detail {
inline AdjointStabilityReport adjoint_stability_report(std::span<const Node> nodes, int order,
                                                       double vjp_weight,
                                                       AdjointMultistepWeights weights,
                                                       const char* method) {
  AdjointStabilityReport r;
  r.method = method;
  r.bound_first_order = adjoint_stability_bound(1, vjp_weight, weights);
  r.bound = adjoint_stability_bound(order, vjp_weight, weights);
  const int N = static_cast<int>(nodes.size()) - 1;
  for (int i = 0; i < N; ++i) {
    const double abs_h =
        nodes[static_cast<std::size_t>(i) + 1].lambda - nodes[static_cast<std::size_t>(i)].lambda;
    // A step to a sigma = 0 node (lambda = +inf) has no finite test factor (eps's Jacobian
    // is unbounded there); it is not counted.
    if (!std::isfinite(abs_h)) continue;
    // The adjoint's first step (sampling step N - 1, at the data end) is first order in -2M.
    const bool multistep = order == 2 && i < N - 1;
    const double bound = multistep ? r.bound : r.bound_first_order;
    if (abs_h > r.max_abs_h || r.max_step < 0) {
      r.max_abs_h = abs_h;
      r.max_step = i;
      r.factor_at_max = adjoint_test_factor(multistep ? 2 : 1, vjp_weight, abs_h, weights);
    }
    if (abs_h > bound) {
      if (r.first_beyond < 0) r.first_beyond = i;
      r.beyond.push_back(i);
      ++r.steps_beyond;
    }
  }
  return r;
}

inline void enforce_adjoint_stability(AdjointStabilityReport& r, const AdjointStabilityOptions& o) {
  if (!r.exceeded()) return;
  apply_amplification_policy(o.policy, r, o.on_warning, [&] {
    return concat(r.method, ": ", r.steps_beyond,
                  " step(s) exceed the step-size stability bound |h| <= ", r.bound,
                  " (log-SNR step; first at sampling step ", r.first_beyond,
                  ", largest |h| = ", r.max_abs_h, " at step ", r.max_step,
                  ", where the adjoint grows by ", r.factor_at_max,
                  " per step instead of shrinking); refused by options.stability.policy. "
                  "Use a grid uniform in lambda (uniform_lambda_grid) or more steps, or the "
                  "exact discrete gradient");
  });
}
} // namespace detail

/// The stability report of AdjointDEIS (order and weights from `options`) on `nodes`, without
/// running it: check a grid before sampling.
inline AdjointStabilityReport adjoint_deis_stability(std::span<const Node> nodes,
                                                     const AdjointDeisOptions& options = {}) {
  validate_nodes(nodes, "adjoint_deis_stability");
  detail::require(options.order == 1 || options.order == 2, "adjoint_deis_stability",
                  "options.order", "1 (AdjointDEIS-1) or 2 (AdjointDEIS-2M)", options.order);
  return detail::adjoint_stability_report(nodes, options.order, 1.0, options.weights,
                                          options.order == 1 ? "AdjointDEIS-1" : "AdjointDEIS-2M");
}

/// Observer that stores every state of a sampling run (x_T first), for the adjoint's cached
/// mode. Storage is allocated up front (reset), so recording never allocates.
template <Backend B> class TrajectoryCache {
public:
  using state_type = typename B::state_type;
  TrajectoryCache(const B& backend, int num_steps, std::int64_t batch, std::int64_t dim)
      : backend_(&backend) {
    detail::require(num_steps >= 1, "TrajectoryCache", "num_steps", "at least 1 step", num_steps);
    states_.reserve(static_cast<std::size_t>(num_steps) + 1);
    for (int i = 0; i <= num_steps; ++i) states_.push_back(backend.make_state(batch, dim));
  }
  /// Stores x_T (the state at nodes[0]); call before sampling.
  void reset(const state_type& x_T) {
    backend_->copy(states_[0], x_T);
    recorded_ = 1;
  }
  /// Observer call: state reached after `step` steps.
  void operator()(int step, int num_steps, const Node&, const state_type& x) {
    if (num_steps + 1 != static_cast<int>(states_.size()) || step < 1 || step > num_steps)
      detail::throw_argument("TrajectoryCache", "num_steps",
                             detail::concat(static_cast<int>(states_.size()) - 1,
                                            " steps (the size it was built for)"),
                             num_steps);
    backend_->copy(states_[static_cast<std::size_t>(step)], x);
    recorded_ = step + 1;
  }
  /// States at nodes[0..recorded-1].
  std::span<const state_type> states() const {
    return {states_.data(), static_cast<std::size_t>(recorded_)};
  }
  std::span<state_type> mutable_states() { return {states_.data(), states_.size()}; }
  int recorded() const { return recorded_; }

private:
  const B* backend_;
  std::vector<state_type> states_;
  int recorded_ = 0;
};

namespace detail {

template <class Vector, class Model>
void check_gradient_vector(const Vector* v, std::int64_t expected, const char* where,
                           const char* arg, const Model&) {
  if (v == nullptr) return;
  if constexpr (requires { v->size(); }) {
    if (static_cast<std::int64_t>(v->size()) != expected)
      throw_argument(where, arg, concat("a vector of the model's size ", expected),
                     concat("size ", v->size()));
  }
}

/// The shared engine of AdjointDEIS (vjp_weight = 1) and SDE-AdjointDEIS (vjp_weight = 2).
/// `trajectory` non-empty: cached states; empty: re-solve the state backwards from x_state
/// (in: x at nodes.back(), out: the re-solved x at nodes[0]).
template <Backend B, class Model>
AdjointCost
continuous_adjoint(const B& backend, Model& model, std::span<const Node> nodes,
                   std::span<const typename B::state_type> trajectory,
                   typename B::state_type* x_state, const typename B::state_type& grad_x0,
                   typename B::state_type& grad_xT, typename B::vector_type* grad_cond,
                   typename B::vector_type* grad_params, const AdjointDeisOptions& options,
                   double vjp_weight, const char* where) {
  using State = typename B::state_type;
  using Vector = typename B::vector_type;
  static_assert(DifferentiableNoiseModel<Model, State, Vector>,
                "diffgrad continuous adjoint: the model must provide vjp(x, t or Node, cotangent, "
                "dx, Vector* dcond, Vector* dparams), cond_size() and param_size(), with "
                "State = Backend::state_type and Vector = Backend::vector_type");
  validate_nodes(nodes, where);
  require(options.order == 1 || options.order == 2, where, "options.order",
          "1 (AdjointDEIS-1) or 2 (AdjointDEIS-2M)", options.order);
  // Checked first, so that refusing costs no model call.
  AdjointCost cost;
  cost.stability = adjoint_stability_report(
      nodes, options.order, vjp_weight, options.weights,
      vjp_weight == 1.0 ? (options.order == 1 ? "AdjointDEIS-1" : "AdjointDEIS-2M")
                        : (options.order == 1 ? "SDE-AdjointDEIS-1" : "SDE-AdjointDEIS-2M"));
  enforce_adjoint_stability(cost.stability, options.stability);
  const bool cached = x_state == nullptr;
  const int N = static_cast<int>(nodes.size()) - 1;
  if (cached && trajectory.size() != nodes.size())
    throw_argument(where, "trajectory", concat("one state per node (", nodes.size(), ")"),
                   trajectory.size());
  const State& shape = cached ? trajectory.back() : *x_state;
  const auto batch = B::batch(shape), dim = B::dim(shape);
  auto check_shape = [&](const State& s, const char* arg) {
    if (B::batch(s) != batch || B::dim(s) != dim)
      throw_argument(where, arg, concat("shape ", batch, " x ", dim, " (the state's)"),
                     concat(B::batch(s), " x ", B::dim(s)));
  };
  check_shape(grad_x0, "grad_x0");
  if (cached)
    for (const State& s : trajectory) check_shape(s, "trajectory");
  check_gradient_vector(grad_cond, static_cast<std::int64_t>(model.cond_size()), where, "grad_cond",
                        model);
  check_gradient_vector(grad_params, static_cast<std::int64_t>(model.param_size()), where,
                        "grad_params", model);

  // Per-step coefficients, indexed by the adjoint step's clean node m (t = nodes[m],
  // s = nodes[m-1], r = nodes[m+1]). Computed before the loop: the grid is fixed.
  const auto idx = [](int m) { return static_cast<std::size_t>(m); };
  std::vector<coeffs::AdjointStepCoeffs> step(idx(N) + 1);
  std::vector<coeffs::BackwardStateCoeffs> state_step(idx(N) + 1);
  for (int m = N; m >= 1; --m) {
    const bool multistep = options.order == 2 && m < N;
    step[idx(m)] = multistep
                       ? coeffs::adjoint_deis_2m(nodes[idx(m + 1)], nodes[idx(m)],
                                                 nodes[idx(m - 1)], options.weights, vjp_weight)
                       : coeffs::adjoint_deis_1(nodes[idx(m)], nodes[idx(m - 1)], vjp_weight);
    if (!cached)
      state_step[idx(m)] = multistep ? coeffs::backward_state_2m(nodes[idx(m + 1)], nodes[idx(m)],
                                                                 nodes[idx(m - 1)], options.weights)
                                     : coeffs::backward_state_1(nodes[idx(m)], nodes[idx(m - 1)]);
  }
  // Node weights of the z/theta integrals and the adjoint scale kappa_m (see the header note).
  const bool want_integrals = grad_cond != nullptr || grad_params != nullptr;
  std::vector<double> kappa(idx(N) + 2, 1.0);
  std::vector<char> weighted(idx(N) + 2, 0);
  for (int m = 1; m <= N; ++m) {
    const double omega = step[idx(m)].integral_t + (m >= 2 ? step[idx(m - 1)].integral_r : 0.0);
    if (want_integrals && omega != 0.0 && std::isfinite(omega)) {
      kappa[idx(m)] = omega;
      weighted[idx(m)] = 1;
    }
  }

  // Buffers, all allocated before the loop.
  State b = backend.make_state(batch, dim); // scaled adjoint b_m = kappa_m a_m (in place)
  std::array<State, 2> dx{backend.make_state(batch, dim), backend.make_state(batch, dim)};
  std::array<State, 2> eps{};
  State x_buf{};
  if (!cached) {
    eps = {backend.make_state(batch, dim), backend.make_state(batch, dim)};
    x_buf = backend.make_state(batch, dim);
    backend.copy(x_buf, *x_state);
  }
  {
    const LinTerm<State> init[1] = {{kappa[idx(N)], &grad_x0}};
    backend.lincomb(b, std::span<const LinTerm<State>>(init, 1));
  }
  // grad_x0 is not read again, so grad_xT may be the same object.
  if (B::batch(grad_xT) != batch || B::dim(grad_xT) != dim)
    grad_xT = backend.make_state(batch, dim);

  std::array<LinTerm<State>, 3> terms{};
  for (int m = N; m >= 1; --m) {
    const Node& node = nodes[idx(m)];
    State& dx_t = dx[idx(m % 2)];
    const State& dx_r = dx[idx((m + 1) % 2)];
    const State& x_t = cached ? trajectory[idx(m)] : x_buf;
    if (!cached) {
      EpsField<Model>{model}(x_t, node, eps[idx(m % 2)]);
      ++cost.model_evals;
      check_model_output(backend, x_t, eps[idx(m % 2)], options.check_finite, N - m, node);
    }
    const bool w = weighted[idx(m)] != 0;
    EpsVjp<Model>{model}(x_t, node, static_cast<const State&>(b), dx_t, w ? grad_cond : nullptr,
                         w ? grad_params : nullptr);
    ++cost.vjps;
    if (B::batch(dx_t) != batch || B::dim(dx_t) != dim)
      throw invalid_argument(concat(where, ": model vjp: expected dx of shape ", batch, " x ", dim,
                                    ", got ", B::batch(dx_t), " x ", B::dim(dx_t)));
    if (options.check_finite && !backend.all_finite(dx_t))
      throw numerical_error(concat(where,
                                   ": model vjp: expected finite values, got NaN or Inf at "
                                   "adjoint step ",
                                   N - m, " (t = ", node.t, ")"));

    // b_{m-1} = kappa_{m-1} [ c.adjoint a_m + c.vjp_t V_m + c.vjp_r V_{m+1} ].
    const auto& c = step[idx(m)];
    const double k_out = m - 1 >= 1 ? kappa[idx(m - 1)] : 1.0; // a_T itself at the end
    int n = 0;
    terms[idx(n++)] = {k_out * c.adjoint / kappa[idx(m)], &b};
    terms[idx(n++)] = {k_out * c.vjp_t / kappa[idx(m)], &dx_t};
    if (c.vjp_r != 0.0) terms[idx(n++)] = {k_out * c.vjp_r / kappa[idx(m + 1)], &dx_r};
    State& out = m == 1 ? grad_xT : b;
    backend.lincomb(out, std::span<const LinTerm<State>>(terms.data(), idx(n)));

    if (!cached) {
      const auto& sc = state_step[idx(m)];
      int k = 0;
      std::array<LinTerm<State>, 3> xs{};
      xs[idx(k++)] = {sc.x, &x_buf};
      xs[idx(k++)] = {sc.eps_t, &eps[idx(m % 2)]};
      if (sc.eps_r != 0.0) xs[idx(k++)] = {sc.eps_r, &eps[idx((m + 1) % 2)]};
      backend.lincomb(x_buf, std::span<const LinTerm<State>>(xs.data(), idx(k)));
    }
    ++cost.steps;
  }
  if (!cached) backend.copy(*x_state, x_buf);
  return cost;
}

} // namespace detail

/// AdjointDEIS from a cached forward trajectory.
///   nodes:       the sampling grid, noise -> data (lambda strictly increasing)
///   trajectory:  the states at every node (trajectory[0] = x_T, back() = the sample x_0),
///                e.g. TrajectoryCache::states() recorded while sampling
///   grad_x0:     dL/dx_0 at nodes.back()
///   grad_xT:     out, dL/dx_T at nodes[0] (resized to the state's shape if needed)
///   grad_cond / grad_params: if non-null, dL/dz and dL/dtheta are ADDED to them (zero them
///                first), as the model's vjp does
/// Cost: N VJPs, no model evaluations.
template <Backend B, class Model>
AdjointCost adjoint_deis(const B& backend, Model& model, std::span<const Node> nodes,
                         std::span<const typename B::state_type> trajectory,
                         const typename B::state_type& grad_x0, typename B::state_type& grad_xT,
                         typename B::vector_type* grad_cond = nullptr,
                         typename B::vector_type* grad_params = nullptr,
                         const AdjointDeisOptions& options = {}) {
  if (trajectory.empty())
    detail::throw_argument("adjoint_deis", "trajectory",
                           detail::concat("one state per node (", nodes.size(), ")"), 0);
  return detail::continuous_adjoint(backend, model, nodes, trajectory, nullptr, grad_x0, grad_xT,
                                    grad_cond, grad_params, options, 1.0, "adjoint_deis");
}

/// AdjointDEIS re-solving the state backwards alongside the adjoint (DDIM inversion for order
/// 1, its multistep twin for order 2), so no trajectory is stored.
///   x: in, the sample x_0 at nodes.back(); out, the re-solved state at nodes[0] (compare it with
///      the true x_T to see the reconstruction error)
/// Other arguments as adjoint_deis. Cost: N model evaluations + N VJPs.
template <Backend B, class Model>
AdjointCost adjoint_deis_resolve(const B& backend, Model& model, std::span<const Node> nodes,
                                 typename B::state_type& x, const typename B::state_type& grad_x0,
                                 typename B::state_type& grad_xT,
                                 typename B::vector_type* grad_cond = nullptr,
                                 typename B::vector_type* grad_params = nullptr,
                                 const AdjointDeisOptions& options = {}) {
  static_assert(NoiseModel<Model, typename B::state_type> ||
                    NodeAwareNoiseModel<Model, typename B::state_type>,
                "adjoint_deis_resolve: the model must provide eps(x, t or Node, out)");
  return detail::continuous_adjoint(backend, model, nodes, {}, &x, grad_x0, grad_xT, grad_cond,
                                    grad_params, options, 1.0, "adjoint_deis_resolve");
}

} // namespace diffgrad
