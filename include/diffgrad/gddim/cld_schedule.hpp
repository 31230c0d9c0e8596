#pragma once
// Critically-damped Langevin diffusion (CLD) for gDDIM, host side, in double precision.
//
// The forward SDE du = F_t u dt + G_t dw acts identically on every (x_k, v_k) pair of the
// state u = (x, v), so every coefficient is a 2x2 block A acting as A (x) I_d. This header gives
// those blocks in closed form: the drift F_t, the transition Psi(t, s), the kernel covariance
// Sigma_t, the gDDIM square root R_t (R R^T = Sigma, rotation fixed by its ODE) and the
// deterministic step coefficient C(t, s) = R_t - Psi(t, s) R_s. The derivations are in
// docs/gddim.md ("gDDIM: Generalized denoising diffusion implicit models"; "Score-Based Generative
// Modeling with Critically-Damped Langevin Diffusion").
//
// R_t has no closed form as a matrix, but it factors as R_t = L_t Q(theta_t) with L_t the
// Cholesky factor of the closed-form Sigma_t and Q a plane rotation; the R ODE then reduces to a
// scalar *quadrature* theta' = -(beta / M) sqrt(det Sigma) / Sigma_xx (docs/gddim.md). The
// constructor tabulates theta on adaptively refined panels with Gauss-Legendre; R at any t
// integrates from the nearest panel start, so there is no interpolation error.
#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <span>
#include <vector>

#include "diffgrad/core/error.hpp"

namespace diffgrad::gddim {

/// One 2x2 block acting on an (x, v) pair; a coefficient acts on the state as Mat2 (x) I_d.
using Mat2 = Eigen::Matrix2d;

// Named cld_detail, not detail: a diffgrad::gddim::detail would hide diffgrad::detail from
// unqualified `detail::require` in any other gddim header included after this one.
namespace cld_detail {

/// Gauss-Legendre rule with N nodes on [-1, 1], computed once by Newton's method in long double
/// (so the nodes are correct to double rounding without a table of typed-in constants).
template <int N> struct GaussLegendre {
  std::array<double, N> x{}, w{};
  GaussLegendre() {
    const long double pi = 3.141592653589793238462643383279502884L;
    for (int i = 0; i < N; ++i) {
      long double z = std::cos(pi * (i + 0.75L) / (N + 0.5L)), dp = 0;
      for (int it = 0; it < 100; ++it) {
        long double p0 = 1, p1 = z; // P_0, P_1, then the three-term recurrence up to P_N
        for (int k = 2; k <= N; ++k) {
          const long double p2 = ((2 * k - 1) * z * p1 - (k - 1) * p0) / k;
          p0 = p1;
          p1 = p2;
        }
        dp = N * (z * p1 - p0) / (z * z - 1);
        const long double dz = p1 / dp;
        z -= dz;
        if (std::fabs(dz) < 1e-19L) break;
      }
      x[i] = static_cast<double>(z);
      w[i] = static_cast<double>(2 / ((1 - z * z) * dp * dp));
    }
  }
  static const GaussLegendre& get() {
    static const GaussLegendre rule;
    return rule;
  }
};

/// e^{-k} sum_{n >= 3} k^n / n! = 1 - e^{-k}(1 + k + k^2/2) for k >= 0, without the cancellation
/// of the right-hand side for small k (it is ~k^3/6 there, where the difference loses all digits).
inline double cld_e3(double k) {
  if (k < 2.0) {
    double term = k * k * k / 6.0, sum = 0.0;
    for (int n = 3; n < 60 && term > 1e-18 * sum; ++n) {
      sum += term;
      term *= k / (n + 1);
    }
    return std::exp(-k) * sum;
  }
  return 1.0 - std::exp(-k) * (1.0 + k + 0.5 * k * k);
}

/// Adaptive Dormand-Prince 5(4) for a small fixed-size state, from t0 to t1 (either direction).
/// The error of each component is measured against rtol * max(|y|, |y_new|): components that
/// start at zero (a covariance or coefficient grown from an empty step) keep relative accuracy.
template <int N, class Fn>
Eigen::Matrix<double, N, 1> dopri5(Fn&& f, double t0, double t1, Eigen::Matrix<double, N, 1> y,
                                   double h0, double rtol = 1e-13) {
  using V = Eigen::Matrix<double, N, 1>;
  static constexpr double c[7] = {0, 1.0 / 5, 3.0 / 10, 4.0 / 5, 8.0 / 9, 1, 1};
  static constexpr double a[7][6] = {
      {0, 0, 0, 0, 0, 0},
      {1.0 / 5, 0, 0, 0, 0, 0},
      {3.0 / 40, 9.0 / 40, 0, 0, 0, 0},
      {44.0 / 45, -56.0 / 15, 32.0 / 9, 0, 0, 0},
      {19372.0 / 6561, -25360.0 / 2187, 64448.0 / 6561, -212.0 / 729, 0, 0},
      {9017.0 / 3168, -355.0 / 33, 46732.0 / 5247, 49.0 / 176, -5103.0 / 18656, 0},
      {35.0 / 384, 0, 500.0 / 1113, 125.0 / 192, -2187.0 / 6784, 11.0 / 84}};
  static constexpr double b4[7] = {
      5179.0 / 57600, 0, 7571.0 / 16695, 393.0 / 640, -92097.0 / 339200, 187.0 / 2100, 1.0 / 40};
  // Elapsed time from t0 (t0 + e), so short spans are not eroded by rounding at |t0|.
  const double span = t1 - t0, dir = span >= 0 ? 1.0 : -1.0;
  double e = 0, h = dir * std::min(std::fabs(h0), std::fabs(span));
  std::array<V, 7> k;
  for (int guard = 0; dir * (span - e) > 0 && guard < 10000000; ++guard) {
    if (dir * (e + h - span) > 0) h = span - e;
    for (int st = 0; st < 7; ++st) {
      V ys = y;
      for (int j = 0; j < st; ++j) ys += (h * a[st][j]) * k[j];
      k[st] = f(t0 + (e + c[st] * h), ys);
    }
    V y5 = y, d = V::Zero();
    for (int st = 0; st < 7; ++st) {
      const double b5 = st < 6 ? a[6][st] : 0.0; // 5th-order weights = the last stage's row
      y5 += (h * b5) * k[st];
      d += (h * (b5 - b4[st])) * k[st];
    }
    double err = 0;
    for (int i = 0; i < N; ++i)
      err = std::max(err, std::fabs(d[i]) /
                              (1e-300 + rtol * std::max(std::fabs(y[i]), std::fabs(y5[i]))));
    if (err <= 1) {
      e += h;
      y = y5;
    }
    h *= err == 0 ? 5.0 : std::min(5.0, std::max(0.2, 0.9 * std::pow(err, -0.2)));
  }
  return y;
}

} // namespace cld_detail

/// CLD parameters. Defaults are the official CLD configuration used by both the CLD and the
/// gDDIM reference code: M^{-1} = 4, beta(t) = 4, gamma = 0.04 (initial velocity variance
/// gamma M = 0.01), eps = 1e-6, T = 1.
struct CldParams {
  double mass = 0.25;         ///< M > 0; the damping is critical, Gamma = 2 sqrt(M)
  double beta_0 = 4.0;        ///< beta(t) = beta_0 + beta_1 t, positive on [0, t_max]
  double beta_1 = 0.0;        ///<
  double gamma = 0.04;        ///< initial velocity variance is gamma M (>= 0)
  double eps = 1e-6;          ///< Sigma_0 = diag(eps, gamma M + eps), as the gDDIM reference code
  double t_max = 1.0;         ///< R_t is tabulated on [0, t_max]
  double initial_angle = 0.0; ///< R_0 = chol(Sigma_0) Q(initial_angle); 0 is the reference code
};

/// CLD schedule: closed-form 2x2 blocks and the gDDIM square root R_t. Immutable value type;
/// every member is const and thread-safe after construction.
class CldSchedule {
public:
  explicit CldSchedule(const CldParams& p = {}) : p_(p) {
    const char* where = "gddim::CldSchedule";
    using diffgrad::detail::require;
    require(std::isfinite(p.mass) && p.mass > 0, where, "mass", "a positive finite number", p.mass);
    require(std::isfinite(p.t_max) && p.t_max > 0, where, "t_max", "a positive finite number",
            p.t_max);
    require(std::isfinite(p.beta_0) && p.beta_0 > 0, where, "beta_0", "a positive finite number",
            p.beta_0);
    require(std::isfinite(p.beta_1) && p.beta_0 + p.beta_1 * p.t_max > 0, where, "beta_1",
            "a finite number with beta_0 + beta_1 t_max > 0", p.beta_1);
    require(std::isfinite(p.gamma) && p.gamma >= 0, where, "gamma", "a finite number >= 0",
            p.gamma);
    require(std::isfinite(p.eps) && p.eps > 0, where, "eps",
            "a positive finite number (Sigma_0 must be invertible for R_0)", p.eps);
    require(std::isfinite(p.initial_angle), where, "initial_angle", "a finite number",
            p.initial_angle);
    damping_ = 2.0 * std::sqrt(p.mass);
    sqrt_mass_ = std::sqrt(p.mass);
    sigma0_xx_ = p.eps;
    sigma0_vv_ = p.gamma * p.mass + p.eps;
    build_table();
  }

  const CldParams& params() const { return p_; }
  double mass() const { return p_.mass; }
  /// Gamma = 2 sqrt(M) (critical damping: F has one double eigenvalue -beta / sqrt(M)).
  double damping() const { return damping_; }
  double t_max() const { return p_.t_max; }
  double beta(double t) const { return p_.beta_0 + p_.beta_1 * t; }
  /// B(s, t) = int_s^t beta, written as a product so short intervals do not cancel.
  double beta_integral(double s, double t) const {
    return (t - s) * (p_.beta_0 + 0.5 * p_.beta_1 * (t + s));
  }

  /// F_t = beta(t) [[0, 1/M], [-1, -Gamma/M]].
  Mat2 drift(double t) const {
    const double b = beta(t);
    Mat2 f;
    f << 0.0, b / p_.mass, -b, -b * damping_ / p_.mass;
    return f;
  }
  /// G_t = [[0, 0], [0, sqrt(2 Gamma beta(t))]].
  Mat2 diffusion(double t) const {
    Mat2 g = Mat2::Zero();
    g(1, 1) = std::sqrt(2.0 * damping_ * beta(t));
    return g;
  }
  /// G_t G_t^T = diag(0, 2 Gamma beta(t)).
  Mat2 diffusion_squared(double t) const {
    Mat2 g = Mat2::Zero();
    g(1, 1) = 2.0 * damping_ * beta(t);
    return g;
  }

  /// Psi(t, s) = exp(B(s,t) A), A = [[0, 1/M], [-1, -2/sqrt(M)]]: with k = 2 B / sqrt(M),
  /// Psi = e^{-k/2} [[1 + k/2, B/M], [-B, 1 - k/2]]. Any order of s and t.
  Mat2 transition(double t, double s) const {
    const double b = beta_integral(s, t), k = 2.0 * b / sqrt_mass_, e = std::exp(-0.5 * k);
    Mat2 psi;
    psi << e * (1.0 + 0.5 * k), e * b / p_.mass, -e * b, e * (1.0 - 0.5 * k);
    return psi;
  }

  /// Sigma_0 = diag(eps, gamma M + eps).
  Mat2 initial_covariance() const {
    Mat2 s = Mat2::Zero();
    s(0, 0) = sigma0_xx_;
    s(1, 1) = sigma0_vv_;
    return s;
  }
  /// Stationary covariance diag(1, M): the prior is x ~ N(0, I), v ~ N(0, M I).
  Mat2 prior_covariance() const {
    Mat2 s = Mat2::Zero();
    s(0, 0) = 1.0;
    s(1, 1) = p_.mass;
    return s;
  }

  /// Sigma_t = Psi(t,0) Sigma_0 Psi(t,0)^T + Sigma^(0)_t for t >= 0, where (k = 2 B(0,t)/sqrt(M))
  /// Sigma^(0)_xx = e^{-k} E3(k), Sigma^(0)_xv = sqrt(M) k^2 e^{-k} / 2,
  /// Sigma^(0)_vv = M e^{-k} (2k + E3(k)), E3(k) = sum_{n>=3} k^n/n!: no term cancels.
  Mat2 covariance(double t) const {
    check_time(t, "covariance");
    const double k = 2.0 * beta_integral(0.0, t) / sqrt_mass_, ek = std::exp(-k);
    const double e3 = cld_detail::cld_e3(k); // already carries the e^{-k}
    const Mat2 psi = transition(t, 0.0);
    Mat2 s;
    const double xx = psi(0, 0) * psi(0, 0) * sigma0_xx_ + psi(0, 1) * psi(0, 1) * sigma0_vv_ + e3;
    const double xv = psi(0, 0) * psi(1, 0) * sigma0_xx_ + psi(0, 1) * psi(1, 1) * sigma0_vv_ +
                      0.5 * sqrt_mass_ * k * k * ek;
    const double vv = psi(1, 0) * psi(1, 0) * sigma0_xx_ + psi(1, 1) * psi(1, 1) * sigma0_vv_ +
                      p_.mass * (2.0 * k * ek + e3);
    s << xx, xv, xv, vv;
    return s;
  }

  /// Rotation angle theta_t of R_t = chol(Sigma_t) Q(theta_t), Q(a) = [[cos a, -sin a],
  /// [sin a, cos a]]; theta_0 = initial_angle. t in [0, t_max].
  double rotation_angle(double t) const {
    check_time(t, "rotation_angle");
    // Last panel start <= t; then integrate the rest of the panel at full Gauss-Legendre order.
    const auto it = std::upper_bound(knots_.begin(), knots_.end(), t);
    const std::size_t i = static_cast<std::size_t>(std::max<std::ptrdiff_t>(
        0, std::min<std::ptrdiff_t>(it - knots_.begin() - 1,
                                    static_cast<std::ptrdiff_t>(knots_.size()) - 2)));
    return theta_[i] + gl(knots_[i], t, [this](double u) { return angle_rate(u); });
  }

  /// gDDIM square root R_t: R R^T = Sigma_t and dR/dt = (F + 1/2 G G^T Sigma^{-1}) R, with
  /// R_0 = diag(sqrt(eps), sqrt(gamma M + eps)) Q(initial_angle). t in [0, t_max].
  Mat2 sqrt_covariance(double t) const {
    const double a = rotation_angle(t);
    return cholesky(covariance(t)) * rotation(a);
  }
  /// dR/dt = F_t R_t + 1/2 G G^T R_t^{-T} (the form of the ODE that needs no Sigma^{-1}).
  Mat2 sqrt_covariance_derivative(double t) const {
    const Mat2 r = sqrt_covariance(t);
    return drift(t) * r + 0.5 * diffusion_squared(t) * inverse(r).transpose();
  }

  /// Deterministic gDDIM step coefficient, u_t = Psi(t,s) u_s + C(t,s) eps_hat(u_s, s):
  /// C(t,s) = int_s^t Psi(t,tau) 1/2 G G^T R_tau^{-T} dtau = R_t - Psi(t,s) R_s. The difference
  /// is used where it does not cancel; otherwise (short steps: it loses ~1e-16/h relative) the
  /// integral is evaluated by Gauss-Legendre on the pieces of the theta panels. t, s in [0, t_max].
  Mat2 step_coefficient(double t, double s) const {
    check_time(t, "step_coefficient");
    check_time(s, "step_coefficient", "s");
    if (t == s) return Mat2::Zero();
    const Mat2 rt = sqrt_covariance(t), prs = transition(t, s) * sqrt_covariance(s);
    const Mat2 c = rt - prs;
    // Relative rounding error of the difference is ~1e-16 * (|R_t| + |Psi R_s|) / |C|; a factor
    // 4 costs less than one digit, beyond it the quadrature (no cancellation) takes over.
    if (rt.norm() + prs.norm() <= 4.0 * c.norm()) return c;
    return step_coefficient_quadrature(t, s);
  }

  /// The integral form of C(t, s) by Gauss-Legendre on the panel pieces (exposed for tests and
  /// for the multistep coefficients, which multiply this integrand by Lagrange polynomials).
  Mat2 step_coefficient_quadrature(double t, double s) const {
    check_time(t, "step_coefficient_quadrature");
    check_time(s, "step_coefficient_quadrature", "s");
    return integrate_pieces(s, t, [this, t](double tau) { return step_integrand(t, tau); });
  }

  /// Multistep (Adams-Bashforth in t) coefficients of gDDIM: for the step s = nodes[0] -> t with
  /// eps known at nodes[0], nodes[1], ... (newest first, q = nodes.size() in 1..4),
  ///   u_t = Psi(t, s) u_s + sum_j C_j eps(u(nodes[j]), nodes[j]),
  ///   C_j = int_s^t Psi(t,tau) 1/2 G G^T R_tau^{-T} l_j(tau) dtau,
  /// l_j the Lagrange basis polynomial in t of the nodes. No closed form for q > 1: Gauss-Legendre
  /// on the theta panels. The C_j sum to C(t, s) (partition of unity); q = 1 is C(t, s).
  std::vector<Mat2> multistep_coefficients(double t, std::span<const double> nodes) const {
    const char* where = "gddim::CldSchedule::multistep_coefficients";
    diffgrad::detail::require(!nodes.empty() && nodes.size() <= 4, where, "nodes",
                              "between 1 and 4 times", static_cast<double>(nodes.size()));
    check_time(t, "multistep_coefficients");
    for (std::size_t j = 0; j < nodes.size(); ++j) {
      check_time(nodes[j], "multistep_coefficients", "nodes");
      for (std::size_t k = 0; k < j; ++k)
        diffgrad::detail::require(nodes[j] != nodes[k], where, "nodes", "distinct times", nodes[j]);
    }
    const double s = nodes[0];
    if (nodes.size() == 1) return {step_coefficient(t, s)};
    std::vector<Mat2> out;
    for (std::size_t j = 0; j < nodes.size(); ++j) {
      const auto lagrange = [&](double tau) {
        double v = 1.0;
        for (std::size_t k = 0; k < nodes.size(); ++k)
          if (k != j) v *= (tau - nodes[k]) / (nodes[j] - nodes[k]);
        return v;
      };
      out.push_back(integrate_pieces(
          s, t, [&](double tau) { return Mat2(lagrange(tau) * step_integrand(t, tau)); }));
    }
    return out;
  }

  /// Step coefficient of the Cholesky parameterisation (score = -L_t^{-T} eps_L, L_t =
  /// chol(Sigma_t)), for comparison only: int_s^t Psi(t,tau) 1/2 G G^T L_tau^{-T} dtau has no
  /// closed form and, since eps_L is not constant along PF-ODE trajectories, the step is only
  /// first-order accurate even for one data point (docs/gddim.md).
  Mat2 cholesky_step_coefficient(double t, double s) const {
    check_time(t, "cholesky_step_coefficient");
    check_time(s, "cholesky_step_coefficient", "s");
    return integrate_pieces(s, t, [this, t](double tau) {
      return Mat2(transition(t, tau) * (0.5 * diffusion_squared(tau)) *
                  inverse(cholesky(covariance(tau))).transpose());
    });
  }

  /// Psi(t,tau) 1/2 G G^T R_tau^{-T}, the integrand of C(t, s).
  Mat2 step_integrand(double t, double tau) const {
    const Mat2 rinv_t = inverse(sqrt_covariance(tau)).transpose();
    return transition(t, tau) * (0.5 * diffusion_squared(tau)) * rinv_t;
  }

  /// Integrate a Mat2-valued f over [a, b] (either order) on the pieces of the theta panels,
  /// Gauss-Legendre with kNodes nodes per piece. Panels resolve the time scales of Sigma_t.
  template <class Fn> Mat2 integrate_pieces(double a, double b, Fn&& f) const {
    const double lo = std::min(a, b), hi = std::max(a, b);
    Mat2 sum = Mat2::Zero();
    auto it = std::upper_bound(knots_.begin(), knots_.end(), lo);
    double x = lo;
    while (x < hi) {
      const double y = (it == knots_.end()) ? hi : std::min(hi, *it);
      const double mid = 0.5 * (x + y), half = 0.5 * (y - x);
      const auto& r = cld_detail::GaussLegendre<kNodes>::get();
      for (int i = 0; i < kNodes; ++i) sum += (r.w[i] * half) * f(mid + half * r.x[i]);
      x = y;
      if (it != knots_.end()) ++it;
    }
    return b >= a ? sum : Mat2(-sum);
  }

  /// Panel boundaries of the theta table (adaptive; finer near t = 0 where Sigma_xx ~ eps).
  const std::vector<double>& knots() const { return knots_; }

  /// Inverse of an invertible 2x2 block (adjugate over determinant; no Eigen/LU needed).
  static Mat2 inverse(const Mat2& a) {
    const double det = a(0, 0) * a(1, 1) - a(0, 1) * a(1, 0);
    Mat2 r;
    r << a(1, 1) / det, -a(0, 1) / det, -a(1, 0) / det, a(0, 0) / det;
    return r;
  }
  static Mat2 rotation(double a) {
    Mat2 q;
    q << std::cos(a), -std::sin(a), std::sin(a), std::cos(a);
    return q;
  }
  /// Lower Cholesky factor of a symmetric positive definite 2x2 block.
  static Mat2 cholesky(const Mat2& s) {
    const double a = std::sqrt(s(0, 0)), b = s(1, 0) / a;
    const double det = s(0, 0) * s(1, 1) - s(1, 0) * s(0, 1);
    Mat2 l;
    l << a, 0.0, b, std::sqrt(det) / a;
    return l;
  }

  /// One stochastic gDDIM step from s down to t (t <= s) with stochasticity l in [0, 1] (the
  /// lambda of the gDDIM paper; l = 0 is the deterministic step, l = 1 the reverse SDE):
  ///   u_t ~ N(Psi(t,s) u_s + eps_coefficient eps(u_s, s), covariance),
  /// eps_coefficient = (Psi_hat(t,s) - Psi(t,s)) R_s, covariance P = Sigma_t - Psi_hat Sigma_s
  /// Psi_hat^T, Psi_hat the transition of F_hat = F + (1 + l^2)/2 G G^T Sigma^{-1}.
  struct StochasticStep {
    Mat2 transition;      ///< Psi(t, s)
    Mat2 eps_coefficient; ///< (Psi_hat(t, s) - Psi(t, s)) R_s
    Mat2 covariance;      ///< P, symmetric positive semidefinite
    Mat2 noise_factor;    ///< lower triangular with noise_factor noise_factor^T = P
  };

  /// Both P and E = Psi_hat - Psi are integrated from their zero value at s (no difference of
  /// nearly equal matrices on short steps), in decreasing time:
  ///   dP/dtau = F_hat P + P F_hat^T - l^2 G G^T,         P(s) = 0,
  ///   dE/dtau = F_hat E + (1 + l^2)/2 G G^T Sigma^{-1} Psi(tau, s),   E(s) = 0,
  /// by adaptive Dormand-Prince 5(4) in double (relative tolerance 1e-13 per entry), with the
  /// closed-form Sigma and Psi; no R table is involved except R_s in the last product.
  StochasticStep stochastic_step(double t, double s, double l) const {
    const char* where = "gddim::CldSchedule::stochastic_step";
    check_time(t, "stochastic_step");
    check_time(s, "stochastic_step", "s");
    diffgrad::detail::require(t <= s, where, "t", "t <= s (a sampling step goes down in time)", t);
    diffgrad::detail::require(l >= 0 && l <= 1, where, "stochasticity", "a number in [0, 1]", l);
    StochasticStep out;
    out.transition = transition(t, s);
    const double c = 0.5 * (1.0 + l * l);
    using V7 = Eigen::Matrix<double, 7, 1>; // P_xx, P_xv, P_vv, E (row-major)
    const auto rhs = [&](double tau_raw, const V7& y) {
      const double tau = std::clamp(tau_raw, t, s); // stage times may round past the ends
      const Mat2 sig = covariance(tau), gg = diffusion_squared(tau);
      const Mat2 gs = gg * inverse(sig), fh = drift(tau) + c * gs;
      Mat2 p;
      p << y[0], y[1], y[1], y[2];
      Mat2 e;
      e << y[3], y[4], y[5], y[6];
      const Mat2 dp = fh * p + p * fh.transpose() - (l * l) * gg;
      const Mat2 de = fh * e + c * gs * transition(tau, s);
      V7 d;
      d << dp(0, 0), 0.5 * (dp(0, 1) + dp(1, 0)), dp(1, 1), de(0, 0), de(0, 1), de(1, 0), de(1, 1);
      return d;
    };
    V7 y = V7::Zero();
    // A tiny first step; the controller grows it by up to 5x per step.
    if (t < s) y = cld_detail::dopri5<7>(rhs, s, t, y, 1e-6 * (s - t));
    Mat2 p;
    p << y[0], y[1], y[1], y[2];
    Mat2 e;
    e << y[3], y[4], y[5], y[6];
    out.eps_coefficient = e * sqrt_covariance(s);
    out.covariance = p;
    out.noise_factor = safe_cholesky(p);
    return out;
  }

  /// Lower Cholesky factor of a symmetric positive semidefinite block that may be singular or
  /// (by rounding) slightly indefinite: negative pivots are clamped to zero, a zero first pivot
  /// leaves the v noise alone. Used for P, which vanishes as l -> 0 or t -> s.
  static Mat2 safe_cholesky(const Mat2& p) {
    const double a = std::sqrt(std::max(p(0, 0), 0.0));
    const double b = a > 0 ? 0.5 * (p(0, 1) + p(1, 0)) / a : 0.0;
    const double c = std::sqrt(std::max(p(1, 1) - b * b, 0.0));
    Mat2 l;
    l << a, 0.0, b, c;
    return l;
  }

  static constexpr int kNodes = 20;

private:
  void check_time(double t, const char* fn, const char* arg = "t") const {
    if (!(t >= 0.0 && t <= p_.t_max))
      diffgrad::detail::throw_argument(
          diffgrad::detail::concat("gddim::CldSchedule::", fn).c_str(), arg,
          diffgrad::detail::concat("a time in [0, t_max = ", p_.t_max, "]"), t);
  }

  /// theta' = -(beta/M) L_vv / L_xx = -(beta/M) sqrt(det Sigma) / Sigma_xx (docs/gddim.md).
  double angle_rate(double t) const {
    const Mat2 s = covariance(t);
    const double det = s(0, 0) * s(1, 1) - s(1, 0) * s(0, 1);
    return -beta(t) / p_.mass * std::sqrt(det) / s(0, 0);
  }

  template <class Fn> static double gl(double a, double b, Fn&& f) {
    const auto& r = cld_detail::GaussLegendre<kNodes>::get();
    const double mid = 0.5 * (a + b), half = 0.5 * (b - a);
    double sum = 0.0;
    for (int i = 0; i < kNodes; ++i) sum += r.w[i] * f(mid + half * r.x[i]);
    return sum * half;
  }

  /// Adaptive bisection: a panel is kept when its 20-point rule agrees with the two half-panel
  /// rules to 1e-14 relative (the accepted value, order 40, is far more accurate than that; a
  /// tighter test only chases the rounding noise of the integrand: 5e7 panels at eps = 1e-12), and
  /// no panel is longer than t_max/64 so the C integrand (with Psi's e^{|k|/2}) is resolved too.
  void build_table() {
    const auto f = [this](double u) { return angle_rate(u); };
    knots_.assign(1, 0.0);
    theta_.assign(1, p_.initial_angle);
    long double acc = p_.initial_angle; // long double sum: hundreds of panels add no drift
    double x = 0.0;
    const double hmax = p_.t_max / 64.0;
    // Depth-first from the left so knots come out sorted.
    std::vector<double> ends{p_.t_max};
    while (!ends.empty()) {
      const double y = ends.back();
      const double m = 0.5 * (x + y);
      const double whole = gl(x, y, f), halves = gl(x, m, f) + gl(m, y, f);
      const bool ok =
          (y - x <= hmax && std::fabs(whole - halves) <= 1e-14 * std::fabs(halves) + 1e-300) ||
          (y - x) < 1e-14 * p_.t_max;
      if (!ok) {
        ends.push_back(m);
        continue;
      }
      acc += halves;
      knots_.push_back(y);
      theta_.push_back(static_cast<double>(acc));
      x = y;
      ends.pop_back();
    }
  }

  CldParams p_;
  double damping_ = 0, sqrt_mass_ = 0, sigma0_xx_ = 0, sigma0_vv_ = 0;
  std::vector<double> knots_, theta_;
};

} // namespace diffgrad::gddim
