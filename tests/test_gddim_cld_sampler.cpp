// CLD gDDIM samplers (include/diffgrad/gddim/cld_sampler.hpp) and the CLD Gaussian-mixture
// reference model (include/diffgrad/models/cld_mixture.hpp), through the library's engine
// (run_scheme) and exact discrete adjoint (gradient). References written here:
//   - single data point: the PF-ODE du/dt = F u + 1/2 G G^T Sigma^{-1}(u - Psi(t,0) u_0) in long
//     double (adaptive Dormand-Prince 5(4), ported from tests/test_gddim_cld.cpp); it uses
//     neither R_t nor C, so the sampler cannot pass by consistency with its own R table;
//   - convergence orders: an adaptive PF-ODE solve whose score comes from the model in the
//     Cholesky parameterisation (score = -L_t^{-T} eps_L: no R table either);
//   - stochastic steps: the Gaussian marginals N(Psi(t,0) u_0, Sigma_t) (closed forms checked
//     in tests/test_gddim_cld.cpp), 1e5 samples;
//   - gradients: fourth-order central differences of the sampler's output.
// Norms: relative 2-norm over the whole state unless stated.
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <array>
#include <cmath>
#include <cstdio>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/gddim/cld_sampler.hpp"
#include "diffgrad/gddim/cld_schedule.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/models/cld_mixture.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace {

using diffgrad::Block2;
using diffgrad::EigenBackend;
using diffgrad::Node;
using diffgrad::gddim::CldGddim;
using diffgrad::gddim::CldGddimOptions;
using diffgrad::gddim::CldMethod;
using diffgrad::gddim::CldMixture;
using diffgrad::gddim::CldParameterisation;
using diffgrad::gddim::CldParams;
using diffgrad::gddim::CldSchedule;
using diffgrad::gddim::Mat2;
using ld = long double;
using L2 = std::array<std::array<ld, 2>, 2>;
using StateD = EigenBackend<double>::state_type;
using StateF = EigenBackend<float>::state_type;
using Means = CldMixture<double>::means_type;

L2 mul(const L2& a, const L2& b) {
  L2 c{};
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) c[i][j] = a[i][0] * b[0][j] + a[i][1] * b[1][j];
  return c;
}
L2 inv(const L2& a) {
  const ld d = a[0][0] * a[1][1] - a[0][1] * a[1][0];
  return {{{a[1][1] / d, -a[0][1] / d}, {-a[1][0] / d, a[0][0] / d}}};
}
L2 to_l2(const Mat2& m) { return {{{m(0, 0), m(0, 1)}, {m(1, 0), m(1, 1)}}}; }

/// The CLD coefficients written from the parameters (not through the library).
struct Ref {
  CldParams p;
  ld beta(ld t) const { return p.beta_0 + p.beta_1 * t; }
  ld damping() const { return 2 * std::sqrt(static_cast<ld>(p.mass)); }
  L2 F(ld t) const {
    const ld b = beta(t);
    return {{{0, b / p.mass}, {-b, -b * damping() / p.mass}}};
  }
  ld gg(ld t) const { return 2 * damping() * beta(t); } // (G G^T)_vv
};

/// Psi = exp(int_s^t F) by scaling and squaring a Taylor series in long double.
L2 expm_ref(const Ref& ref, ld t, ld s) {
  L2 a = ref.F(s), b = ref.F(t);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) a[i][j] = 0.5L * (t - s) * (a[i][j] + b[i][j]);
  int sq = 0;
  ld nrm = std::fabs(a[0][0]) + std::fabs(a[0][1]) + std::fabs(a[1][0]) + std::fabs(a[1][1]);
  while (nrm > 0.125L) {
    nrm /= 2;
    ++sq;
  }
  const ld scale = std::ldexp(1.0L, -sq);
  for (auto& row : a)
    for (auto& v : row) v *= scale;
  L2 e{{{1, 0}, {0, 1}}}, term = e;
  for (int n = 1; n < 40; ++n) {
    term = mul(term, a);
    for (auto& row : term)
      for (auto& v : row) v /= n;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) e[i][j] += term[i][j];
  }
  for (int k = 0; k < sq; ++k) e = mul(e, e);
  return e;
}

/// Adaptive Dormand-Prince 5(4) in long double (per-component relative error control).
template <class V>
V dopri(const std::function<V(ld, const V&)>& f, ld t0, ld t1, V y, ld rtol, ld atol = 1e-40L,
        ld h0 = 1e-9L) {
  static constexpr ld c[7] = {0, 1.0L / 5, 3.0L / 10, 4.0L / 5, 8.0L / 9, 1, 1};
  static constexpr ld a[7][6] = {
      {0, 0, 0, 0, 0, 0},
      {1.0L / 5, 0, 0, 0, 0, 0},
      {3.0L / 40, 9.0L / 40, 0, 0, 0, 0},
      {44.0L / 45, -56.0L / 15, 32.0L / 9, 0, 0, 0},
      {19372.0L / 6561, -25360.0L / 2187, 64448.0L / 6561, -212.0L / 729, 0, 0},
      {9017.0L / 3168, -355.0L / 33, 46732.0L / 5247, 49.0L / 176, -5103.0L / 18656, 0},
      {35.0L / 384, 0, 500.0L / 1113, 125.0L / 192, -2187.0L / 6784, 11.0L / 84}};
  static constexpr ld b4[7] = {
      5179.0L / 57600, 0,        7571.0L / 16695, 393.0L / 640, -92097.0L / 339200,
      187.0L / 2100,   1.0L / 40};
  const std::size_t n = y.size();
  const ld dir = t1 >= t0 ? 1 : -1, span = t1 - t0;
  ld e = 0, h = dir * std::min(h0, std::fabs(span));
  std::array<V, 7> k;
  while (dir * (span - e) > 0) {
    if (dir * (e + h - span) > 0) h = span - e;
    for (int s = 0; s < 7; ++s) {
      V ys = y;
      for (int j = 0; j < s; ++j)
        for (std::size_t i = 0; i < n; ++i) ys[i] += h * a[s][j] * k[j][i];
      k[s] = f(t0 + (e + c[s] * h), ys);
    }
    V y5 = y;
    ld err = 0;
    for (std::size_t i = 0; i < n; ++i) {
      ld d = 0;
      for (int s = 0; s < 7; ++s) {
        const ld b5 = s < 6 ? a[6][s] : 0;
        y5[i] += h * b5 * k[s][i];
        d += h * (b5 - b4[s]) * k[s][i];
      }
      err =
          std::max(err, std::fabs(d) / (atol + rtol * std::max(std::fabs(y[i]), std::fabs(y5[i]))));
    }
    if (err <= 1) {
      e += h;
      y = y5;
    }
    h *= err == 0 ? 5 : std::min<ld>(5, std::max<ld>(0.2L, 0.9L * std::pow(err, -0.2L)));
  }
  return y;
}

using V2 = std::array<ld, 2>;

/// PF-ODE solution from (x, v) at s to t for data at the single point x0 (Sigma_0 as the
/// schedule's): du/dt = F u + 1/2 G G^T Sigma^{-1}(u - Psi(t,0)(x0, 0)).
V2 single_point_pf_ode(const CldSchedule& cld, const Ref& ref, double x0, V2 u, double s,
                       double t) {
  const auto rhs = [&](ld tau, const V2& y) {
    const L2 F = ref.F(tau), Si = inv(to_l2(cld.covariance(static_cast<double>(tau))));
    const L2 e = expm_ref(ref, tau, 0);
    const ld dx = y[0] - e[0][0] * x0, dv = y[1] - e[1][0] * x0;
    const ld g = 0.5L * ref.gg(tau) * (Si[1][0] * dx + Si[1][1] * dv);
    return V2{F[0][0] * y[0] + F[0][1] * y[1], F[1][0] * y[0] + F[1][1] * y[1] + g};
  };
  return dopri<V2>(rhs, s, t, u, 1e-17L);
}

double rel(const StateD& a, const StateD& b) { return (a - b).norm() / b.norm(); }

/// Runs `scheme` through the engine on x (in: x at nodes()[0]).
template <class Scalar, class Model>
typename EigenBackend<Scalar>::state_type
run(const CldGddim& scheme, Model& model, const typename EigenBackend<Scalar>::state_type& x_T,
    std::uint64_t seed = 0) {
  const EigenBackend<Scalar> backend;
  auto x = x_T;
  diffgrad::SamplerWorkspace<EigenBackend<Scalar>> ws(backend, scheme.history(), scheme.stages(),
                                                      x.rows(), x.cols());
  diffgrad::EpsField<Model> field{model};
  const auto& nodes = scheme.nodes();
  diffgrad::run_scheme(scheme, backend, std::span<const Node>(nodes), diffgrad::NodeAtLambda(scheme),
                       field, x, ws, diffgrad::SampleOptions{.seed = seed});
  return x;
}

std::string message_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const diffgrad::invalid_argument& e) {
    return e.what();
  }
  return "";
}

/// Single-point fixture: d = 2 data coordinates at x0 = (0.7, -0.4), 2 rows, u_T = Psi(T,0)
/// (x0, 0) + R_T z with fixed z; the reference is the PF-ODE from u_T to t_min for every pair.
struct SinglePoint {
  CldParams p{};
  CldSchedule cld{p};
  Ref ref{p};
  double t_min = 1e-3;
  std::array<double, 2> x0{0.7, -0.4};
  StateD x_T = StateD(2, 4), want = StateD(2, 4);
  SinglePoint() {
    const double z[2][4] = {{0.3, -1.2, -1.1, 0.4}, {-0.8, 0.5, 0.9, 1.3}};
    const Mat2 psi = cld.transition(1.0, 0.0), r = cld.sqrt_covariance(1.0);
    for (int row = 0; row < 2; ++row)
      for (int j = 0; j < 2; ++j) {
        const Eigen::Vector2d u = psi * Eigen::Vector2d(x0[static_cast<std::size_t>(j)], 0.0) +
                                  r * Eigen::Vector2d(z[row][j], z[row][2 + j]);
        x_T(row, j) = u[0];
        x_T(row, 2 + j) = u[1];
        const V2 w = single_point_pf_ode(cld, ref, x0[static_cast<std::size_t>(j)],
                                         V2{u[0], u[1]}, 1.0, t_min);
        want(row, j) = static_cast<double>(w[0]);
        want(row, 2 + j) = static_cast<double>(w[1]);
      }
  }
  Means means() const {
    Means m(1, 2);
    m << x0[0], x0[1];
    return m;
  }
};

const SinglePoint& single_point() {
  static const SinglePoint fixture;
  return fixture;
}

} // namespace

TEST_CASE("CLD gDDIM: single data point, q = 1, 2, 3 through run_scheme equal the PF-ODE",
          "[gddim][cld][sampler]") {
  const SinglePoint& sp = single_point();
  CldMixture<double> model_r(sp.cld, sp.means(), Eigen::VectorXd::Zero(1));
  CldMixture<double> model_l(sp.cld, sp.means(), Eigen::VectorXd::Zero(1), {},
                             CldParameterisation::cholesky);
  double worst = 0;
  std::printf("CLD single point through run_scheme, rel 2-norm error at t_min = 1e-3:\n"
              "  N   | q = 1    | q = 2    | q = 3    | Cholesky L_t | Euler PF-ODE (R_t)\n");
  for (int n : {1, 2, 5, 10, 50}) {
    const auto grid = diffgrad::gddim::cld_quadratic_grid(sp.cld, n, sp.t_min);
    double e[3];
    for (int q = 1; q <= 3; ++q) {
      const CldGddim scheme(sp.cld, grid, CldGddimOptions{.order = q});
      e[q - 1] = rel(run<double>(scheme, model_r, sp.x_T), sp.want);
      worst = std::max(worst, e[q - 1]);
    }
    const CldGddim chol(sp.cld, grid,
                        CldGddimOptions{.parameterisation = CldParameterisation::cholesky});
    const double el = rel(run<double>(chol, model_l, sp.x_T), sp.want);
    const CldGddim euler(sp.cld, grid, CldGddimOptions{.method = CldMethod::euler});
    const double ee = rel(run<double>(euler, model_r, sp.x_T), sp.want);
    std::printf("  %3d | %.2e | %.2e | %.2e | %.2e     | %.2e\n", n, e[0], e[1], e[2], el, ee);
    if (n <= 10) CHECK(el > 1e-3); // the Cholesky parameterisation is not exact
  }
  std::printf("  worst R_t: %.2e\n", worst);
  CHECK(worst <= 1e-10);
}
