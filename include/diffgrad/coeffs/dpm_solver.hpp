#pragma once
// Scalar coefficients of the DPM-Solver family (Lu et al. 2022: DPM-Solver, DPM-Solver++,
// SDE-DPM-Solver(++)), in double, as pure functions of the nodes.
//
// Every update of the family has the same shape. With m the quantity the solver
// extrapolates (eps for noise prediction, x0 for data prediction), s the expansion node,
// t the target and h = lambda_t - lambda_s:
//
//   x_t = X x_s + sum_k W_k D_k + noise * xi,          D_k ~ h^k m^(k)(lambda_s)
//
// where the Taylor weights W_k are the exact integrals of the k-th Taylor term:
//   ODE, noise  (DPM-Solver):      X = alpha_t/alpha_s,              W_k = -sigma_t h phi_{k+1}(h)
//   ODE, data   (DPM-Solver++):    X = sigma_t/sigma_s,              W_k =  alpha_t h phi_{k+1}(-h)
//   SDE, noise  (SDE-DPM-Solver):  X = alpha_t/alpha_s,              W_k = -2 sigma_t h
//   phi_{k+1}(h),
//                                  noise = sigma_t sqrt(e^{2h} - 1)
//   SDE, data   (SDE-DPM-Solver++): X = (sigma_t/sigma_s) e^{-h},    W_k =  2 alpha_t h
//   phi_{k+1}(-2h),
//                                  noise = sigma_t sqrt(1 - e^{-2h})
// (phi_k as in exponential.hpp; phi_1(h) h = e^h - 1). The solvers differ only in how they
// estimate D_k from model values (finite differences in lambda), and the "midpoint"
// (official: "dpmsolver") second-order type replaces W_1 by W_0 / 2.
//
// The result of every update function is a set of weights on the start state and on up to
// three model values; the schemes expand those into StepPlan coefficients.
//
// Hazards handled here on purpose: h -> 0 (phi series, never e^h - 1 by subtraction), and
// a final node with sigma_t = 0 (lambda_t = +inf), where every weight takes its limit.
#include <cmath>

#include "diffgrad/coeffs/exponential.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad {

/// Second-order formula type. `midpoint` (the official code's "dpmsolver") uses W_0/2 for the
/// first-derivative term; `heun` (the official "taylor") uses the exact Taylor weight W_1.
/// For third order, singlestep `midpoint` uses only the last intermediate value with W_1
/// (DPM-Solver-3, third order for r2 = 2/3), `heun` uses D_1 and D_2.
enum class DpmSolverType { midpoint, heun, dpmsolver = midpoint, taylor = heun };

/// diffusers' `algorithm_type`: which integrand, ODE or SDE.
enum class DpmAlgorithm { dpmsolver, dpmsolver_pp, sde_dpmsolver, sde_dpmsolver_pp };

} // namespace diffgrad

namespace diffgrad::coeffs::dpm {

/// Which integral an update discretizes.
enum class Integrand { ode_noise, ode_data, sde_noise, sde_data };

constexpr bool predicts_data(Integrand f) {
  return f == Integrand::ode_data || f == Integrand::sde_data;
}
constexpr bool is_sde(Integrand f) { return f == Integrand::sde_noise || f == Integrand::sde_data; }
constexpr Integrand integrand_of(DpmAlgorithm a) {
  switch (a) {
  case DpmAlgorithm::dpmsolver: return Integrand::ode_noise;
  case DpmAlgorithm::dpmsolver_pp: return Integrand::ode_data;
  case DpmAlgorithm::sde_dpmsolver: return Integrand::sde_noise;
  case DpmAlgorithm::sde_dpmsolver_pp: return Integrand::sde_data;
  }
  return Integrand::ode_data;
}

/// A node at the data end with sigma = 0 (lambda = +inf): only first-order updates are
/// defined into it (a data-prediction extrapolation over an infinite lambda interval diverges).
inline bool is_terminal(const Node& n) { return n.sigma == 0.0 || !std::isfinite(n.lambda); }

/// x_t = x * x_s + sum_k w[k] * D_k + noise * xi (see the header comment).
struct TaylorWeights {
  double x = 0.0;
  double w[3] = {};
  double noise = 0.0;
};

/// The Taylor weights W_0, W_1, W_2 of the step s -> t, with their limits at sigma_t = 0.
inline TaylorWeights taylor_weights(Integrand f, const Node& s, const Node& t) {
  const double h = step_h(s, t);
  const bool terminal = is_terminal(t);
  TaylorWeights c;
  switch (f) {
  case Integrand::ode_noise:
  case Integrand::sde_noise: {
    // sigma_t h phi_{k+1}(h): at sigma_t = 0 the k = 0 term tends to alpha_t sigma_s/alpha_s
    // (sigma_expm1) and the k >= 1 terms to 0 (they decay like sigma_t e^h / h^k).
    const double scale = f == Integrand::sde_noise ? 2.0 : 1.0;
    c.x = t.alpha / s.alpha;
    c.w[0] = -scale * sigma_expm1(s, t);
    c.w[1] = terminal ? 0.0 : -scale * t.sigma * h * phi2(h);
    c.w[2] = terminal ? 0.0 : -scale * t.sigma * h * phi3(h);
    if (f == Integrand::sde_noise) // sigma_t sqrt(e^{2h} - 1) -> alpha_t sigma_s / alpha_s
      c.noise = terminal ? t.alpha * s.sigma / s.alpha : t.sigma * std::sqrt(std::expm1(2.0 * h));
    break;
  }
  case Integrand::ode_data:
    // alpha_t h phi_{k+1}(-h) -> alpha_t {1, 1, 1/2} as h -> +inf.
    c.x = terminal ? 0.0 : t.sigma / s.sigma;
    c.w[0] = -alpha_expm1_neg(s, t);
    c.w[1] = terminal ? t.alpha : t.alpha * h * phi2(-h);
    c.w[2] = terminal ? 0.5 * t.alpha : t.alpha * h * phi3(-h);
    break;
  case Integrand::sde_data:
    // 2 alpha_t h phi_{k+1}(-2h) -> alpha_t {1, 1, 1/2}; X = (sigma_t/sigma_s) e^{-h} -> 0.
    c.x = terminal ? 0.0 : t.sigma / s.sigma * std::exp(-h);
    c.w[0] = terminal ? t.alpha : -t.alpha * std::expm1(-2.0 * h);
    c.w[1] = terminal ? t.alpha : 2.0 * t.alpha * h * phi2(-2.0 * h);
    c.w[2] = terminal ? 0.5 * t.alpha : 2.0 * t.alpha * h * phi3(-2.0 * h);
    c.noise = terminal ? 0.0 : t.sigma * std::sqrt(-std::expm1(-2.0 * h));
    break;
  }
  return c;
}

/// Deliberate deviations of the reference implementations, reproduced on request only.
struct ReferenceQuirks {
  /// Official DPM-Solver code and diffusers, multistep third order: D2 = (D1_0 - D1_1)/(r0 + r1)
  /// estimates h^2 m''/2, yet gets the weight W_2 meant for h^2 m''. The update's local error
  /// is then O(h^3) and the method is globally second order (tests/test_dpm_solver_multistep).
  bool multistep_half_d2 = false;
  /// diffusers, sde-dpmsolver++ third order (single- and multistep): the D2 weight is written
  /// alpha_t ((1 - e^{-2h} - 2h)/(2h)^2 - 0.5) = W_2 - alpha_t, an O(1) weight on an O(h^2)
  /// term instead of O(h).
  bool sde_d2_minus_alpha = false;
  /// diffusers, timestep_spacing="trailing" (DDIM, DPM-Solver multistep, DEIS): for 62 step
  /// counts n in 1..1000 (61, 103, 121, 122, 201, ...) numpy's arange(N, 0, -N/n) has n + 1
  /// entries, the last ~1e-13, so diffusers' timesteps end in -1 and it runs n + 1 steps: DDIM
  /// reads alphas_cumprod[-1] (timestep N - 1, pure noise) there, DPM-Solver / DEIS take the
  /// sigma of timestep 0 (np.interp clamps). By default compat:: drops the invalid -1 and runs
  /// the n valid steps; with this flag it reproduces diffusers, wrap included. Read by
  /// compat::ddim_timesteps / multistep_timesteps and the compat setups, not by any update.
  bool trailing_wrap = false;
};

/// x_t = x * x_start + sum_j m[j] * m_j + noise * xi, m_j the model values the update uses.
struct UpdateWeights {
  double x = 0.0;
  double m[3] = {};
  double noise = 0.0;
};

namespace detail {
inline void check_order(int order, const char* where) {
  diffgrad::detail::require(order >= 1 && order <= 3, where, "order", "1, 2 or 3", order);
}
inline double d2_weight(Integrand f, const TaylorWeights& tw, const Node& t,
                        const ReferenceQuirks& q) {
  return q.sde_d2_minus_alpha && f == Integrand::sde_data ? tw.w[2] - t.alpha : tw.w[2];
}
} // namespace detail

/// DPM-Solver-1 / DDIM / SDE-DPM-Solver(++)-1: m[0] is the model value at s.
inline UpdateWeights first_order_update(Integrand f, const Node& s, const Node& t) {
  const auto tw = taylor_weights(f, s, t);
  UpdateWeights u;
  u.x = tw.x;
  u.m[0] = tw.w[0];
  u.noise = tw.noise;
  return u;
}

/// Final combination of a singlestep update s -> t from model values m_0 (at s), m_1 (at
/// lambda_s + r1 h) and m_2 (at lambda_s + r2 h); order 2 uses m_0, m_1 only.
/// Order 2: D1 = (m_1 - m_0)/r1. Order 3 midpoint: D1 = (m_2 - m_0)/r2 with W_1;
/// order 3 heun: D1 = (r2 D1_0 - r1 D1_1)/(r2 - r1), D2 = 2 (D1_1 - D1_0)/(r2 - r1),
/// D1_0 = (m_1 - m_0)/r1, D1_1 = (m_2 - m_0)/r2 (official DPM-Solver and diffusers alike).
/// Requires 0 < r1 <= 1 (order 2) or 0 < r1 < r2 <= 1 (order 3).
inline UpdateWeights singlestep_update(Integrand f, int order, DpmSolverType type, const Node& s,
                                       const Node& t, double r1, double r2 = 0.0,
                                       const ReferenceQuirks& q = {}) {
  detail::check_order(order, "coeffs::dpm::singlestep_update");
  // A zero-length step (h = 0, only ever the last one) is the exact flow x_t = X x_s: every
  // Taylor weight vanishes, and r1 = r_j h / h would be 0/0.
  if (order == 1 || step_h(s, t) == 0.0) return first_order_update(f, s, t);
  const auto tw = taylor_weights(f, s, t);
  UpdateWeights u;
  u.x = tw.x;
  u.noise = tw.noise;
  u.m[0] = tw.w[0];
  if (order == 2) {
    diffgrad::detail::require(r1 > 0.0 && r1 <= 1.0, "coeffs::dpm::singlestep_update", "r1",
                              "0 < r1 <= 1", r1);
    const double w1 = type == DpmSolverType::midpoint ? 0.5 * tw.w[0] : tw.w[1];
    u.m[1] += w1 / r1;
    u.m[0] -= w1 / r1;
    return u;
  }
  diffgrad::detail::require(r1 > 0.0 && r1 < r2, "coeffs::dpm::singlestep_update", "r1",
                            "0 < r1 < r2", r1);
  diffgrad::detail::require(r2 <= 1.0, "coeffs::dpm::singlestep_update", "r2", "r1 < r2 <= 1", r2);
  if (type == DpmSolverType::midpoint) {
    u.m[2] += tw.w[1] / r2;
    u.m[0] -= tw.w[1] / r2;
    return u;
  }
  // D1 = a1 m_1 + a2 m_2 - (a1 + a2) m_0, D2 = b1 m_1 + b2 m_2 - (b1 + b2) m_0.
  const double dr = r2 - r1;
  const double a1 = r2 / (r1 * dr), a2 = -r1 / (r2 * dr);
  const double b1 = -2.0 / (r1 * dr), b2 = 2.0 / (r2 * dr);
  const double w1 = tw.w[1], w2 = detail::d2_weight(f, tw, t, q);
  u.m[1] += w1 * a1 + w2 * b1;
  u.m[2] += w1 * a2 + w2 * b2;
  u.m[0] -= w1 * (a1 + a2) + w2 * (b1 + b2);
  return u;
}

/// The official DPM-Solver-3's second intermediate state (both solver types): from s to the
/// node s2 at lambda_s + r2 h, with D1 = (m_1 - m_0) r2/r1 scaled to the sub-step r2 h.
inline UpdateWeights singlestep_third_order_stage2(Integrand f, const Node& s, const Node& s2,
                                                   double r1, double r2) {
  diffgrad::detail::require(r1 > 0.0 && r1 < r2, "coeffs::dpm::singlestep_third_order_stage2", "r1",
                            "0 < r1 < r2", r1);
  const auto tw = taylor_weights(f, s, s2);
  UpdateWeights u;
  u.x = tw.x;
  u.noise = tw.noise;
  u.m[0] = tw.w[0] - r2 / r1 * tw.w[1];
  u.m[1] = r2 / r1 * tw.w[1];
  return u;
}

/// Multistep update from s0 (the current node) to t, with m_0 at s0, m_1 at the previous node
/// s1 and m_2 at s2 (order 3 only). r0 = (lambda_s0 - lambda_s1)/h, r1 = (lambda_s1 -
/// lambda_s2)/h. Order 2: D1 = (m_0 - m_1)/r0. Order 3 (solver type ignored, as in the
/// references): D1 = D1_0 + r0 (D1_0 - D1_1)/(r0 + r1) and D2 = 2 (D1_0 - D1_1)/(r0 + r1)
/// (the factor 2 is 1 with quirks.multistep_half_d2), D1_0 = (m_0 - m_1)/r0,
/// D1_1 = (m_1 - m_2)/r1.
inline UpdateWeights multistep_update(Integrand f, int order, DpmSolverType type, const Node& s0,
                                      const Node& s1, const Node& s2, const Node& t,
                                      const ReferenceQuirks& q = {}) {
  detail::check_order(order, "coeffs::dpm::multistep_update");
  // A zero-length step (h = 0, only ever the last one): the exact flow x_t = X x_s. The
  // ratios r0 = h_0/h, r1 = h_1/h are infinite there; diffusers divides by h anyway and gets
  // NaN for 2M-heun and 3M (docs/compat_diffusers.md).
  if (order == 1 || step_h(s0, t) == 0.0) return first_order_update(f, s0, t);
  const auto tw = taylor_weights(f, s0, t);
  const double h = step_h(s0, t);
  const double r0 = (s0.lambda - s1.lambda) / h;
  UpdateWeights u;
  u.x = tw.x;
  u.noise = tw.noise;
  u.m[0] = tw.w[0];
  if (order == 2) {
    const double w1 = type == DpmSolverType::midpoint ? 0.5 * tw.w[0] : tw.w[1];
    u.m[0] += w1 / r0;
    u.m[1] -= w1 / r0;
    return u;
  }
  const double r1 = (s1.lambda - s2.lambda) / h;
  // D1_0 - D1_1 = m_0/r0 - m_1 (1/r0 + 1/r1) + m_2/r1 =: delta.
  const double g = 1.0 / (r0 + r1);
  const double d2_scale = q.multistep_half_d2 ? g : 2.0 * g;
  const double w1 = tw.w[1], w2 = detail::d2_weight(f, tw, t, q);
  const double c_delta = w1 * r0 * g + w2 * d2_scale; // weight of delta in the update
  u.m[0] += w1 / r0 + c_delta / r0;                   // D1_0's own m_0 term
  u.m[1] += -w1 / r0 - c_delta * (1.0 / r0 + 1.0 / r1);
  u.m[2] += c_delta / r1;
  return u;
}

/// The first-order SDE-DPM-Solver step in noise prediction, exactly as Cycle-SDE inverts it:
///   x_t = (alpha_t/alpha_s) x_s - 2 sigma_t (e^h - 1) eps_s + sigma_t sqrt(e^{2h} - 1) xi.
struct SdeFirstOrder {
  double x, eps, noise;
};
inline SdeFirstOrder sde_dpm_solver_1(const Node& s, const Node& t) {
  const auto tw = taylor_weights(Integrand::sde_noise, s, t);
  return {tw.x, tw.w[0], tw.noise};
}

} // namespace diffgrad::coeffs::dpm
