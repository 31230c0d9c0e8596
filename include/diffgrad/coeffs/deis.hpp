#pragma once
// Pure coefficient math of the DEIS family (Zhang & Chen 2022; thesis ch. 6), in double.
//
// Every DEIS-type step integrates the PF-ODE written for v = x/alpha in rho = sigma/alpha,
//     dv/drho = eps,   v_{i+1} = v_i + int_{rho_i}^{rho_{i+1}} eps drho,
// with eps replaced by a polynomial through the last r+1 model outputs. The schemes differ
// only in the variable the polynomial is built in:
//   tAB-DEIS      in t        (the schedule time; no closed form: adaptive Gauss-Kronrod),
//   rhoAB-DEIS    in rho      (exact polynomial integral),
//   log-rho DEIS  in lambda = -log rho  (diffusers' DEISMultistepScheduler; closed form
//                 through incomplete gamma functions of h).
// Multiplying by alpha_{i+1} and substituting lambda, each eps coefficient is
//     C_j = -alpha_{i+1} rho_i * int_0^h e^{-u} l_j(u) du,     u = lambda - lambda_i,
// whose weight e^{-u} is bounded by 1, so every quadrature below works on an O(1) integrand
// and the sigma_{i+1} = 0 (h = +inf) limit is an ordinary convergent integral.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <span>

#include "diffgrad/coeffs/exponential.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::coeffs {

/// At most 4 interpolation points (cubic polynomials: DEIS order 3, iPNDM order 4).
inline constexpr int kDeisMaxPoints = 4;

/// Values of the Lagrange basis polynomials l_0..l_{n-1} on the points z at x
/// (product form: each factor is a ratio of differences, no monomial expansion).
inline void lagrange_basis(const double* z, int n, double x, double* out) {
  for (int j = 0; j < n; ++j) {
    double p = 1.0;
    for (int k = 0; k < n; ++k)
      if (k != j) p *= (x - z[k]) / (z[j] - z[k]);
    out[j] = p;
  }
}

/// Monomial coefficients c[j][m] with l_j(x) = sum_m c[j][m] x^m on the points z (n <= 4).
/// Used only where the points are O(1) apart in the chosen variable (normalized steps), so
/// the expansion is well conditioned.
inline void lagrange_monomials(const double* z, int n,
                               std::array<std::array<double, kDeisMaxPoints>, kDeisMaxPoints>& c) {
  for (int j = 0; j < n; ++j) {
    std::array<double, kDeisMaxPoints> p{};
    p[0] = 1.0;
    int deg = 0;
    for (int k = 0; k < n; ++k) {
      if (k == j) continue;
      const double d = z[j] - z[k];
      // p(x) <- p(x) (x - z_k) / d
      for (int m = deg + 1; m >= 0; --m) {
        const double shifted = m > 0 ? p[static_cast<std::size_t>(m - 1)] : 0.0;
        const double here = m <= deg ? p[static_cast<std::size_t>(m)] : 0.0;
        p[static_cast<std::size_t>(m)] = (shifted - z[k] * here) / d;
      }
      ++deg;
    }
    c[static_cast<std::size_t>(j)] = p;
  }
}

/// int_0^1 l_j(s) ds for the Lagrange basis on the points s (exact polynomial integral).
inline void unit_lagrange_integrals(const double* s, int n, double* out) {
  std::array<std::array<double, kDeisMaxPoints>, kDeisMaxPoints> c{};
  lagrange_monomials(s, n, c);
  for (int j = 0; j < n; ++j) {
    double acc = 0.0;
    for (int m = n - 1; m >= 0; --m) acc += c[static_cast<std::size_t>(j)][static_cast<std::size_t>(m)] / (m + 1);
    out[j] = acc;
  }
}

/// Lower incomplete gamma G_m(h) = int_0^h e^{-u} u^m du for m = 0..3, h in [0, +inf].
/// For h <= 12 the all-positive series G_m(h) = e^{-h} sum_{k > m} m! h^k / k! (no
/// cancellation at any h, unlike the alternating Taylor series or the recurrence
/// G_m = m G_{m-1} - h^m e^{-h} near h ~ m); beyond, that recurrence, whose subtracted term
/// h^m e^{-h} is then below 1e-2 of m G_{m-1} (no cancellation, fewer roundings).
inline double incomplete_gamma_lower(int m, double h) {
  double factorial = 1.0;
  for (int k = 2; k <= m; ++k) factorial *= k;
  if (std::isinf(h)) return factorial;
  if (h > 12.0) {
    double g = -std::expm1(-h);
    const double e = std::exp(-h);
    double hp = 1.0;
    for (int k = 1; k <= m; ++k) {
      hp *= h;
      g = k * g - hp * e;
    }
    return g;
  }
  double term = std::pow(h, m + 1) / (m + 1);  // m! h^{m+1} / (m+1)!
  double sum = term;
  for (int k = m + 2; k < m + 200; ++k) {
    term *= h / k;
    sum += term;
    if (term < 1e-17 * sum) break;
  }
  return std::exp(-h) * sum;
}

/// out_j = int_0^h e^{-u} l_j(u) du for the Lagrange basis on the points u (u_0 = 0 is the
/// current node, u_k < 0 earlier ones), h in (0, +inf]: the closed form
/// sum_m c_jm G_m(h). With u measured in lambda this is the log-rho DEIS integral.
inline void exp_weighted_lagrange_integrals(const double* u, int n, double h, double* out) {
  std::array<std::array<double, kDeisMaxPoints>, kDeisMaxPoints> c{};
  // Expand in the scaled variable u / L (L = the largest node distance, or h if smaller
  // and finite) so the monomial coefficients stay O(1); G_m scales back by L^{-(m+1)}.
  double scale = 0.0;
  for (int k = 0; k < n; ++k) scale = std::max(scale, std::abs(u[k]));
  if (std::isfinite(h)) scale = scale > 0.0 ? std::min(scale, h) : h;
  if (!(scale > 0.0)) scale = 1.0;
  std::array<double, kDeisMaxPoints> z{};
  for (int k = 0; k < n; ++k) z[static_cast<std::size_t>(k)] = u[k] / scale;
  lagrange_monomials(z.data(), n, c);
  std::array<double, kDeisMaxPoints> moment{};  // int_0^h e^{-u} (u/scale)^m du
  for (int m = 0; m < n; ++m)
    moment[static_cast<std::size_t>(m)] = incomplete_gamma_lower(m, h) / std::pow(scale, m);
  for (int j = 0; j < n; ++j) {
    double acc = 0.0;
    for (int m = n - 1; m >= 0; --m)
      acc += c[static_cast<std::size_t>(j)][static_cast<std::size_t>(m)] *
             moment[static_cast<std::size_t>(m)];
    out[j] = acc;
  }
}

// ---------------------------------------------------------------------------------------
// Adaptive Gauss-Kronrod (7, 15) quadrature for integrands without a closed form (tAB-DEIS).
// Nodes and weights from QUADPACK's qk15 (verified in tests: exact on polynomials up to
// degree 13 / 22).
namespace detail {
inline constexpr std::array<double, 8> kXgk{
    0.991455371120812639206854697526329, 0.949107912342758524526189684047851,
    0.864864423359769072789712788640926, 0.741531185599394439863864773280788,
    0.586087235467691130294144845693013, 0.405845151377397166906606412076961,
    0.207784955007898467600689403773245, 0.0};
inline constexpr std::array<double, 8> kWgk{
    0.022935322010529224963732008058970, 0.063092092629978553290700663189204,
    0.104790010322250183839876322541518, 0.140653259715525918745189590510238,
    0.169004726639267902826583426598550, 0.190350578064785409913256402421014,
    0.204432940075298892414161999234649, 0.209482141084727828012999174891714};
/// Gauss 7-point weights at kXgk[1], kXgk[3], kXgk[5], kXgk[7].
inline constexpr std::array<double, 4> kWg{
    0.129484966168869693270611432679082, 0.279705391489276667901467771423780,
    0.381830050505118944950369775488975, 0.417959183673469387755102040816327};
} // namespace detail

/// Result of one G7K15 panel for a vector integrand of n <= 4 components.
struct KronrodPanel {
  double a = 0.0, b = 0.0;
  std::array<double, kDeisMaxPoints> value{};
  double error = 0.0;  ///< max_j |K15_j - G7_j|, a (pessimistic) error bound
};

/// Applies the G7K15 pair on [a, b] to f(x, out[n]).
template <class F> KronrodPanel kronrod_panel(F& f, int n, double a, double b) {
  const double c = 0.5 * (a + b), r = 0.5 * (b - a);
  KronrodPanel p;
  p.a = a;
  p.b = b;
  std::array<double, kDeisMaxPoints> gauss{}, fv{};
  for (int k = 0; k < 8; ++k) {
    const std::size_t ks = static_cast<std::size_t>(k);
    const int copies = k == 7 ? 1 : 2;
    for (int side = 0; side < copies; ++side) {
      const double x = side == 0 ? c - r * detail::kXgk[ks] : c + r * detail::kXgk[ks];
      f(x, fv.data());
      for (int j = 0; j < n; ++j) {
        const std::size_t js = static_cast<std::size_t>(j);
        p.value[js] += detail::kWgk[ks] * fv[js];
        if (k % 2 == 1) gauss[js] += detail::kWg[static_cast<std::size_t>(k / 2)] * fv[js];
      }
    }
  }
  for (int j = 0; j < n; ++j) {
    const std::size_t js = static_cast<std::size_t>(j);
    p.value[js] *= r;
    gauss[js] *= r;
    p.error = std::max(p.error, std::abs(p.value[js] - gauss[js]));
  }
  return p;
}

struct AdaptiveQuadratureResult {
  int panels = 0;       ///< panels used
  double error = 0.0;   ///< summed Kronrod error estimate
  bool converged = false;
};

/// Globally adaptive G7K15 on [a, b] for f(x, out[n]) (n <= 4): bisects the panel with the
/// largest error until the summed estimate is below rel_tol * max_j |I_j| (+ abs_tol) or
/// kMaxPanels panels are in use. Fixed-size storage: no allocation (it runs per step).
/// |K15 - G7| overestimates the K15 error by orders of magnitude on smooth integrands, so
/// rel_tol = 1e-14 delivers results correct to rounding.
template <class F>
AdaptiveQuadratureResult adaptive_kronrod(F&& f, int n, double a, double b, double* out,
                                          double rel_tol = 1e-14, double abs_tol = 0.0) {
  constexpr int kMaxPanels = 64;
  std::array<KronrodPanel, kMaxPanels> panels{};
  int count = 1;
  panels[0] = kronrod_panel(f, n, a, b);
  AdaptiveQuadratureResult res;
  for (;;) {
    std::array<double, kDeisMaxPoints> total{};
    double err = 0.0;
    int worst = 0;
    for (int p = 0; p < count; ++p) {
      const auto& pan = panels[static_cast<std::size_t>(p)];
      for (int j = 0; j < n; ++j) total[static_cast<std::size_t>(j)] += pan.value[static_cast<std::size_t>(j)];
      err += pan.error;
      if (pan.error > panels[static_cast<std::size_t>(worst)].error) worst = p;
    }
    double mag = 0.0;
    for (int j = 0; j < n; ++j) mag = std::max(mag, std::abs(total[static_cast<std::size_t>(j)]));
    for (int j = 0; j < n; ++j) out[j] = total[static_cast<std::size_t>(j)];
    res.panels = count;
    res.error = err;
    if (err <= rel_tol * mag + abs_tol) {
      res.converged = true;
      return res;
    }
    if (count == kMaxPanels) return res;
    const KronrodPanel w = panels[static_cast<std::size_t>(worst)];
    const double mid = 0.5 * (w.a + w.b);
    if (!(mid > w.a && mid < w.b)) return res;  // cannot split further in double
    panels[static_cast<std::size_t>(worst)] = kronrod_panel(f, n, w.a, mid);
    panels[static_cast<std::size_t>(count++)] = kronrod_panel(f, n, mid, w.b);
  }
}

// ---------------------------------------------------------------------------------------
// Fixed-coefficient Adams-Bashforth weights of iPNDM (uniform-step AB, newest first).
inline std::array<double, kDeisMaxPoints> ipndm_weights(int order) {
  switch (order) {
  case 1: return {1.0, 0.0, 0.0, 0.0};
  case 2: return {1.5, -0.5, 0.0, 0.0};
  case 3: return {23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0, 0.0};
  default: return {55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0};
  }
}

/// Explicit Runge-Kutta tableaux (c, A, b) used by rhoRK-DEIS.
struct RkTableau {
  int stages = 0;
  std::array<double, 4> c{};
  std::array<std::array<double, 4>, 4> a{};
  std::array<double, 4> b{};
};
/// Heun's 2nd-order method (trapezoidal predictor-corrector).
inline RkTableau rk_heun2() { return {2, {0.0, 1.0}, {{{}, {1.0}}}, {0.5, 0.5}}; }
/// Kutta's 3rd-order method.
inline RkTableau rk_kutta3() {
  return {3, {0.0, 0.5, 1.0}, {{{}, {0.5}, {-1.0, 2.0}}}, {1.0 / 6, 4.0 / 6, 1.0 / 6}};
}
/// The classical 4th-order Runge-Kutta method.
inline RkTableau rk_classic4() {
  return {4,
          {0.0, 0.5, 0.5, 1.0},
          {{{}, {0.5}, {0.0, 0.5}, {0.0, 0.0, 1.0}}},
          {1.0 / 6, 2.0 / 6, 2.0 / 6, 1.0 / 6}};
}

// ---------------------------------------------------------------------------------------
// Per-step coefficients of the multistep schemes:
//   x_{i+1} = x * x_i + sum_{k < points} eps[k] * e_{i-k}.

struct MultistepCoeffs {
  int points = 1;                          ///< model outputs used (e_i, e_{i-1}, ...)
  double x = 0.0;                          ///< coefficient of x_i: alpha_{i+1} / alpha_i
  std::array<double, kDeisMaxPoints> eps{};  ///< eps[k] multiplies e_{i-k}
  double quadrature_error = 0.0;           ///< tAB only: Kronrod estimate, scaled like eps
};

/// alpha_t (rho_t - rho_s) = -sigma_t (e^h - 1): the DDIM eps coefficient, also the length
/// of the step in rho scaled to x (finite when sigma_t = 0).
inline double alpha_rho_step(const Node& s, const Node& t) { return -sigma_expm1(s, t); }

namespace detail {
inline const Node& node_at(std::span<const Node> nodes, int k) {
  return nodes[static_cast<std::size_t>(k)];
}
inline MultistepCoeffs ddim_like(const Node& s, const Node& t) {
  MultistepCoeffs c;
  c.points = 1;
  c.x = t.alpha / s.alpha;
  c.eps[0] = alpha_rho_step(s, t);
  return c;
}
} // namespace detail

/// rhoAB-DEIS step i with `points` = r + 1 nodes: Lagrange polynomial in rho through
/// rho_i, ..., rho_{i-r}, integrated exactly over [rho_i, rho_{i+1}]. Needs i >= points - 1.
inline MultistepCoeffs deis_rho_ab(std::span<const Node> nodes, int i, int points) {
  const Node& s = detail::node_at(nodes, i);
  const Node& t = detail::node_at(nodes, i + 1);
  MultistepCoeffs c = detail::ddim_like(s, t);
  if (points == 1) return c;
  c.points = points;
  const double step = c.eps[0];  // alpha_{i+1} (rho_{i+1} - rho_i)
  const double rho_s = s.sigma / s.alpha;
  const double drho = t.sigma / t.alpha - rho_s;  // < 0
  // Points in the step-normalized variable (rho - rho_i) / drho: 0, then negative values.
  std::array<double, kDeisMaxPoints> z{}, w{};
  for (int k = 1; k < points; ++k) {
    const Node& n = detail::node_at(nodes, i - k);
    z[static_cast<std::size_t>(k)] = (n.sigma / n.alpha - rho_s) / drho;
  }
  unit_lagrange_integrals(z.data(), points, w.data());
  for (int k = 0; k < points; ++k)
    c.eps[static_cast<std::size_t>(k)] = step * w[static_cast<std::size_t>(k)];
  return c;
}

/// log-rho DEIS (diffusers' DEISMultistepScheduler) step i with `points` nodes: Lagrange
/// polynomial in log rho = -lambda, integrated over rho in closed form
///   eps_k = -alpha_{i+1} rho_i int_0^h e^{-u} l_k(u) du,  u = lambda - lambda_i.
/// Exact where diffusers' antiderivative formula cancels (small h) and at sigma_{i+1} = 0.
inline MultistepCoeffs deis_log_rho(std::span<const Node> nodes, int i, int points) {
  const Node& s = detail::node_at(nodes, i);
  const Node& t = detail::node_at(nodes, i + 1);
  MultistepCoeffs c = detail::ddim_like(s, t);
  if (points == 1) return c;
  c.points = points;
  std::array<double, kDeisMaxPoints> u{}, w{};
  for (int k = 1; k < points; ++k)
    u[static_cast<std::size_t>(k)] = detail::node_at(nodes, i - k).lambda - s.lambda;
  exp_weighted_lagrange_integrals(u.data(), points, step_h(s, t), w.data());
  const double scale = -t.alpha * s.sigma / s.alpha;
  for (int k = 0; k < points; ++k)
    c.eps[static_cast<std::size_t>(k)] = scale * w[static_cast<std::size_t>(k)];
  return c;
}

/// tAB-DEIS step i with `points` = r + 1 nodes: Lagrange polynomial in the schedule time t,
///   eps_k = -alpha_{i+1} rho_i int_0^h e^{-u} l_k(t(lambda_i + u)) du,
/// by adaptive Gauss-Kronrod in u (t(lambda) is smooth for the analytic schedules; for
/// piecewise tables the kinks limit the accuracy the 64-panel budget reaches, reported in
/// quadrature_error). `t_of_lambda(lambda)` is the schedule's inverse map. h must be finite.
template <class TOfLambda>
MultistepCoeffs deis_tab(std::span<const Node> nodes, int i, int points, TOfLambda&& t_of_lambda) {
  const Node& s = detail::node_at(nodes, i);
  const Node& t = detail::node_at(nodes, i + 1);
  MultistepCoeffs c = detail::ddim_like(s, t);
  if (points == 1) return c;
  c.points = points;
  std::array<double, kDeisMaxPoints> tk{}, w{};
  for (int k = 0; k < points; ++k) tk[static_cast<std::size_t>(k)] = detail::node_at(nodes, i - k).t;
  const double lambda_s = s.lambda;
  auto integrand = [&](double u, double* out) {
    std::array<double, kDeisMaxPoints> l{};
    lagrange_basis(tk.data(), points, t_of_lambda(lambda_s + u), l.data());
    const double weight = std::exp(-u);
    for (int k = 0; k < points; ++k) out[k] = weight * l[static_cast<std::size_t>(k)];
  };
  // Conditioning floor: t(lambda) is known to ~eps * |t|, and the basis divides differences
  // of t by the node spacing, so the integrand carries noise ~eps * max|t| / min|t_j - t_k|;
  // asking the quadrature for less than that would only burn panels.
  double t_max = 0.0, gap = std::numeric_limits<double>::infinity();
  for (int j = 0; j < points; ++j) {
    t_max = std::max(t_max, std::abs(tk[static_cast<std::size_t>(j)]));
    for (int k = 0; k < j; ++k)
      gap = std::min(gap, std::abs(tk[static_cast<std::size_t>(j)] - tk[static_cast<std::size_t>(k)]));
  }
  const double noise = std::numeric_limits<double>::epsilon() * t_max / gap;
  const double rel_tol = std::max(1e-14, 100.0 * noise);
  const auto q = adaptive_kronrod(integrand, points, 0.0, step_h(s, t), w.data(), rel_tol);
  const double scale = -t.alpha * s.sigma / s.alpha;
  for (int k = 0; k < points; ++k)
    c.eps[static_cast<std::size_t>(k)] = scale * w[static_cast<std::size_t>(k)];
  c.quadrature_error = std::abs(scale) * q.error;
  return c;
}

/// iPNDM step i with `points` model outputs: the uniform-step Adams-Bashforth weights applied
/// to the rho step, eps_k = alpha_{i+1} (rho_{i+1} - rho_i) b_k (the DEIS authors' code).
inline MultistepCoeffs ipndm(std::span<const Node> nodes, int i, int points) {
  const Node& s = detail::node_at(nodes, i);
  const Node& t = detail::node_at(nodes, i + 1);
  MultistepCoeffs c = detail::ddim_like(s, t);
  c.points = points;
  const double step = c.eps[0];
  const auto b = ipndm_weights(points);
  for (int k = 0; k < points; ++k) c.eps[static_cast<std::size_t>(k)] = step * b[static_cast<std::size_t>(k)];
  return c;
}

} // namespace diffgrad::coeffs
