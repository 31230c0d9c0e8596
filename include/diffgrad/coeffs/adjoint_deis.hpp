#pragma once
// Scalar coefficients of the continuous adjoint solvers (AdjointDEIS-1, AdjointDEIS-2M and
// their SDE twins), derived here rather than copied from the paper (whose eqs. 3.12-3.17 carry
// one power of alpha_s too few; see docs/math.md, "Deviations from papers").
//
// Derivation. The PF-ODE is dx/dt = f x + (g^2/(2 sigma)) eps = f x - sigma lambda'(t) eps
// (g^2 = -2 sigma^2 lambda'). Its adjoint a = dL/dx obeys da/dt = -f a + sigma lambda' V with
// V = (d eps/dx)^T a, so d(alpha a)/dt = alpha sigma lambda' V and, with alpha sigma = alpha^2 e^-lambda,
//
//   alpha_s a_s = alpha_t a_t + int_{lambda_t}^{lambda_s} e^-lambda [alpha^2 V](lambda) dlambda,
//   dL/dz      += int_{lambda_t}^{lambda_s} e^-lambda [alpha  W](lambda) dlambda,  W = (d eps/dz)^T a,
//
// for one adjoint step from a cleaner time t to a noisier time s (h = lambda_s - lambda_t < 0).
// The diffusion SDE has drift f x + (g^2/sigma) eps: every VJP term doubles (vjp_weight = 2).
// AdjointDEIS-k replaces the bracket by its Taylor polynomial in lambda (the exponential weight is
// integrated exactly):
//   I0 = int e^-lambda dlambda               = (sigma_s/alpha_s) (e^h - 1)
//   I1 = int e^-lambda (lambda - lambda_t)   = (sigma_s/alpha_s) (e^h - 1 - h) = (sigma_s/alpha_s) h^2 phi_2(h)
// 1:  bracket frozen at t.           2M: linear through t and the previous (cleaner) point r,
// slope (P_r - P_t)/(lambda_r - lambda_t), i.e. P_t I0 + (P_r - P_t) J with J = I1/(lambda_r - lambda_t).
// The paper's 2M replaces (e^h - 1 - h)/h by (e^h - 1)/2 (J = I0 h / (2 (lambda_r - lambda_t))): also
// second order, offered as AdjointMultistepWeights::paper.
// Re-solving the state backwards uses the same integrals: x_s/alpha_s = x_t/alpha_t - int e^-lambda eps.
#include <cmath>

#include "diffgrad/coeffs/exponential.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad {

/// How AdjointDEIS-2M weights the linear (slope) term.
enum class AdjointMultistepWeights {
  exact_integral, ///< exact integral of the linear interpolant: (e^h - 1 - h)/h (default)
  paper           ///< the paper's eq. 3.15: (e^h - 1)/2, equal to second order
};

namespace coeffs {

/// Coefficients of one adjoint step t -> s (s noisier) with optional previous point r:
///   a_s   = adjoint * a_t + vjp_t * V_t + vjp_r * V_r
///   dL/dz += integral_t * W_t + integral_r * W_r          (the same for theta)
/// with V_u = (d eps/dx (x_u))^T a_u and W_u = (d eps/dz (x_u))^T a_u.
struct AdjointStepCoeffs {
  double adjoint = 0.0;
  double vjp_t = 0.0;
  double vjp_r = 0.0;
  double integral_t = 0.0;
  double integral_r = 0.0;
};

/// Coefficients of the state re-solved backwards alongside the adjoint (DDIM inversion and its
/// multistep twin): x_s = x * x_t + eps_t * eps(x_t) + eps_r * eps(x_r).
struct BackwardStateCoeffs {
  double x = 0.0;
  double eps_t = 0.0;
  double eps_r = 0.0;
};

namespace detail_adjoint {
/// alpha_s * I0 = sigma_s (e^h - 1), finite when t is a sigma = 0 node (h = -inf).
inline double scaled_I0(const Node& t, const Node& s) { return sigma_expm1(t, s); }

/// J * alpha_s: the weight of the slope term, 0 where the previous point is absent or at
/// lambda = +inf (an infinitely long previous step carries no slope information).
inline double scaled_J(const Node& r, const Node& t, const Node& s,
                       AdjointMultistepWeights weights) {
  const double h = s.lambda - t.lambda;  // < 0
  const double h_prev = r.lambda - t.lambda;  // > 0
  if (!std::isfinite(h) || !std::isfinite(h_prev)) return 0.0;
  if (weights == AdjointMultistepWeights::paper) return s.sigma * std::expm1(h) * h / (2.0 * h_prev);
  return s.sigma * h * h * phi2(h) / h_prev;  // sigma_s (e^h - 1 - h) / (lambda_r - lambda_t)
}

inline void check_adjoint_step(const Node& t, const Node& s, const char* where) {
  if (!(s.lambda < t.lambda))
    diffgrad::detail::throw_argument(
        where, "s", diffgrad::detail::concat("a noisier node than t (lambda_s < lambda_t = ", t.lambda, ")"),
        s.lambda);
  if (!(s.alpha > 0.0) || !(s.sigma > 0.0))
    diffgrad::detail::throw_argument(where, "s", "alpha_s > 0 and sigma_s > 0",
                                     diffgrad::detail::concat("alpha ", s.alpha, ", sigma ", s.sigma));
  if (!(t.alpha > 0.0))
    diffgrad::detail::throw_argument(where, "t", "alpha_t > 0", t.alpha);
}

inline AdjointStepCoeffs assemble(const Node& t, const Node& s, double alpha_r, double I0s,
                                  double Js, double vjp_weight) {
  // Everything above was multiplied by alpha_s; divide once here.
  AdjointStepCoeffs c;
  c.adjoint = t.alpha / s.alpha;
  c.vjp_t = vjp_weight * t.alpha * t.alpha * (I0s - Js) / (s.alpha * s.alpha);
  c.vjp_r = vjp_weight * alpha_r * alpha_r * Js / (s.alpha * s.alpha);
  c.integral_t = vjp_weight * t.alpha * (I0s - Js) / s.alpha;
  c.integral_r = vjp_weight * alpha_r * Js / s.alpha;
  return c;
}
} // namespace detail_adjoint

/// AdjointDEIS-1 from t to s (s noisier). vjp_weight = 1 for the PF-ODE, 2 for the diffusion SDE.
///   a_s = (alpha_t/alpha_s) a_t + w (alpha_t^2/alpha_s^2) sigma_s (e^h - 1) V_t
///   dL/dz += w (sigma_t - alpha_t sigma_s/alpha_s) W_t
inline AdjointStepCoeffs adjoint_deis_1(const Node& t, const Node& s, double vjp_weight = 1.0) {
  detail_adjoint::check_adjoint_step(t, s, "coeffs::adjoint_deis_1");
  return detail_adjoint::assemble(t, s, 0.0, detail_adjoint::scaled_I0(t, s), 0.0, vjp_weight);
}

/// AdjointDEIS-2M from t to s with the previous (cleaner) point r: the bracket alpha^2 V is
/// extrapolated linearly in lambda through r and t. Falls back to first order where lambda_r or
/// lambda_t is infinite (sigma = 0 nodes).
inline AdjointStepCoeffs adjoint_deis_2m(const Node& r, const Node& t, const Node& s,
                                         AdjointMultistepWeights weights =
                                             AdjointMultistepWeights::exact_integral,
                                         double vjp_weight = 1.0) {
  detail_adjoint::check_adjoint_step(t, s, "coeffs::adjoint_deis_2m");
  if (!(r.lambda > t.lambda))
    diffgrad::detail::throw_argument(
        "coeffs::adjoint_deis_2m", "r",
        diffgrad::detail::concat("a cleaner node than t (lambda_r > lambda_t = ", t.lambda, ")"), r.lambda);
  return detail_adjoint::assemble(t, s, r.alpha, detail_adjoint::scaled_I0(t, s),
                                  detail_adjoint::scaled_J(r, t, s, weights), vjp_weight);
}

/// DDIM inversion step t -> s: x_s = (alpha_s/alpha_t) x_t - sigma_s (e^h - 1) eps(x_t).
inline BackwardStateCoeffs backward_state_1(const Node& t, const Node& s) {
  detail_adjoint::check_adjoint_step(t, s, "coeffs::backward_state_1");
  return {s.alpha / t.alpha, -detail_adjoint::scaled_I0(t, s), 0.0};
}

/// Its multistep (second-order) twin with eps extrapolated linearly in lambda through r and t.
inline BackwardStateCoeffs backward_state_2m(const Node& r, const Node& t, const Node& s,
                                             AdjointMultistepWeights weights =
                                                 AdjointMultistepWeights::exact_integral) {
  detail_adjoint::check_adjoint_step(t, s, "coeffs::backward_state_2m");
  const double I0s = detail_adjoint::scaled_I0(t, s);
  const double Js = detail_adjoint::scaled_J(r, t, s, weights);
  return {s.alpha / t.alpha, -(I0s - Js), -Js};
}

} // namespace coeffs
} // namespace diffgrad
