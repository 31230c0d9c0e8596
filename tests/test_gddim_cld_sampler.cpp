// CLD gDDIM samplers (include/diffgrad/gddim/cld_sampler.hpp) and the CLD Gaussian-mixture
// reference model (include/diffgrad/models/cld_mixture.hpp), through the library's engine
// (run_scheme) and exact discrete adjoint (gradient). References written here:
//   - single data point: the PF-ODE du/dt = F u + 1/2 G G^T Sigma^{-1}(u - Psi(t,0) u_0) in long
//     double (adaptive Dormand-Prince 5(4) as in tests/test_gddim_cld.cpp, here for the
//     fundamental matrix of u - Psi(t,0) u_0); it uses neither R_t nor C, so the sampler cannot
//     pass by consistency with its own R table;
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
#include "cld_reference.hpp"

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
using namespace cld_reference;
using StateD = EigenBackend<double>::state_type;
using StateF = EigenBackend<float>::state_type;
using Means = CldMixture<double>::means_type;






/// For data at one point, delta = u - Psi(t,0) u_0 obeys the linear PF-ODE
/// d delta/dt = (F + 1/2 G G^T Sigma^{-1}) delta (the mean's own derivative F m cancels), so every
/// pair's solution is delta(t) = Phi(t, s) delta(s) with the fundamental matrix Phi of that
/// system: one long-double solve serves all pairs and data points. Neither R_t nor C is used.
L2 pf_ode_fundamental_matrix(const CldSchedule& cld, const Ref& ref, double s, double t) {
  const auto rhs = [&](ld tau, const V4& y) {
    const L2 F = ref.F(tau), Si = inv(to_l2(cld.covariance(static_cast<double>(tau))));
    L2 a = F;
    a[1][0] += 0.5L * ref.gg(tau) * Si[1][0];
    a[1][1] += 0.5L * ref.gg(tau) * Si[1][1];
    const L2 d = mul(a, L2{{{y[0], y[1]}, {y[2], y[3]}}});
    return V4{d[0][0], d[0][1], d[1][0], d[1][1]};
  };
  const V4 y = dopri<V4>(rhs, s, t, V4{1, 0, 0, 1}, 1e-17L);
  return {{{y[0], y[1]}, {y[2], y[3]}}};
}

double rel(const StateD& a, const StateD& b) { return (a - b).norm() / b.norm(); }

/// Runs `scheme` through the engine on x (in: x at nodes()[0]).
template <class Scalar, class Model>
typename EigenBackend<Scalar>::state_type run(const CldGddim& scheme, Model& model,
                                              const typename EigenBackend<Scalar>::state_type& x_T,
                                              std::uint64_t seed = 0) {
  const EigenBackend<Scalar> backend;
  auto x = x_T;
  diffgrad::SamplerWorkspace<EigenBackend<Scalar>> ws(backend, scheme.history(), scheme.stages(),
                                                      x.rows(), x.cols());
  diffgrad::EpsField<Model> field{model};
  const auto& nodes = scheme.nodes();
  diffgrad::run_scheme(scheme, backend, std::span<const Node>(nodes),
                       diffgrad::NodeAtLambda(scheme), field, x, ws,
                       diffgrad::SampleOptions{.seed = seed});
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

bool has_message(const std::string& msg, const char* what) {
  INFO(msg);
  return msg.find(what) != std::string::npos;
}

/// Single-point fixture: d = 2 data coordinates at x0 = (0.7, -0.4), 2 rows, u_T = Psi(T,0)
/// (x0, 0) + R_T z with fixed z; the reference is the PF-ODE from u_T to t_min for every pair
/// (mean by the matrix exponential, deviation by the fundamental matrix, long double).
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
    const L2 phi = pf_ode_fundamental_matrix(cld, ref, 1.0, t_min);
    const L2 e_T = expm_ref(ref, 1.0, 0.0), e_t = expm_ref(ref, t_min, 0.0);
    for (int row = 0; row < 2; ++row)
      for (int j = 0; j < 2; ++j) {
        const Eigen::Vector2d u = psi * Eigen::Vector2d(x0[static_cast<std::size_t>(j)], 0.0) +
                                  r * Eigen::Vector2d(z[row][j], z[row][2 + j]);
        x_T(row, j) = u[0];
        x_T(row, 2 + j) = u[1];
        const ld xj = x0[static_cast<std::size_t>(j)];
        const ld dx = u[0] - e_T[0][0] * xj, dv = u[1] - e_T[1][0] * xj;
        want(row, j) = static_cast<double>(e_t[0][0] * xj + phi[0][0] * dx + phi[0][1] * dv);
        want(row, 2 + j) = static_cast<double>(e_t[1][0] * xj + phi[1][0] * dx + phi[1][1] * dv);
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

namespace {

/// Least-squares slope of log(err) against log(N).
double fitted_slope(const std::vector<int>& ns, const std::vector<double>& errs) {
  double mx = 0, my = 0;
  for (std::size_t i = 0; i < ns.size(); ++i) {
    mx += std::log(static_cast<double>(ns[i]));
    my += std::log(errs[i]);
  }
  mx /= static_cast<double>(ns.size());
  my /= static_cast<double>(ns.size());
  double sxy = 0, sxx = 0;
  for (std::size_t i = 0; i < ns.size(); ++i) {
    const double dx = std::log(static_cast<double>(ns[i])) - mx;
    sxy += dx * (std::log(errs[i]) - my);
    sxx += dx * dx;
  }
  return sxy / sxx;
}

/// Three-component mixture in d = 2 (weights 1 : 2 : 1, std 0.3).
Means ring_means() {
  Means m(3, 2);
  m << 1.0, 0.0, -0.5, 0.8, -0.5, -0.8;
  return m;
}

} // namespace

TEST_CASE("CLD gDDIM: convergence orders q = 1, 2, 3 on a Gaussian mixture",
          "[gddim][cld][sampler]") {
  // Reference: the PF-ODE du/dt = F u - 1/2 G G^T score with score = -L_t^{-T} eps_L from the
  // model in the Cholesky parameterisation (no R table), adaptive DOPRI5 in long double with
  // relative tolerance 1e-14 on every entry, from T = 1 to t_min.
  const CldParams p{};
  const CldSchedule cld(p);
  const Ref ref{p};
  const double t_min = 1e-3;
  const Eigen::VectorXd stds = Eigen::VectorXd::Constant(3, 0.3);
  const Eigen::Vector3d weights(1.0, 2.0, 1.0);
  CldMixture<double> model(cld, ring_means(), stds, weights);
  CldMixture<double> model_l(cld, ring_means(), stds, weights, CldParameterisation::cholesky);
  const EigenBackend<double> backend;
  StateD x_T(4, 4);
  diffgrad::gddim::draw_cld_prior(backend, cld, x_T, 3);
  using VN = std::vector<ld>;
  const auto rhs = [&](ld tau, const VN& y) {
    StateD u(4, 4), e(4, 4);
    for (int i = 0; i < 16; ++i)
      u(i / 4, i % 4) = static_cast<double>(y[static_cast<std::size_t>(i)]);
    const double td = static_cast<double>(tau);
    model_l.eps(u, Node{td, 0, 0, 0, td}, e);
    const L2 F = ref.F(tau), Lit = inv(to_l2(CldSchedule::cholesky(cld.covariance(td))));
    VN d(16);
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < 2; ++j) {
        const ld x = y[static_cast<std::size_t>(4 * r + j)],
                 v = y[static_cast<std::size_t>(4 * r + 2 + j)];
        // score_v = -(L^{-T} eps)_v = -(Lit[0][1] eps_x + Lit[1][1] eps_v)  (L^{-T} = (L^{-1})^T)
        const ld score_v = -(Lit[0][1] * e(r, j) + Lit[1][1] * e(r, 2 + j));
        d[static_cast<std::size_t>(4 * r + j)] = F[0][0] * x + F[0][1] * v;
        d[static_cast<std::size_t>(4 * r + 2 + j)] =
            F[1][0] * x + F[1][1] * v - 0.5L * ref.gg(tau) * score_v;
      }
    return d;
  };
  VN y0(16);
  for (int i = 0; i < 16; ++i) y0[static_cast<std::size_t>(i)] = x_T(i / 4, i % 4);
  const VN yr = dopri<VN>(rhs, 1.0L, t_min, y0, 1e-14L, 1e-300L, 1e-6L);
  StateD want(4, 4);
  for (int i = 0; i < 16; ++i)
    want(i / 4, i % 4) = static_cast<double>(yr[static_cast<std::size_t>(i)]);

  const std::vector<int> ns{40, 80, 160, 320};
  std::printf("CLD mixture, rel 2-norm error at t_min = %g vs N (quadratic grid):\n", t_min);
  for (int q = 1; q <= 3; ++q) {
    std::vector<double> errs;
    for (int n : ns) {
      const CldGddim scheme(cld, diffgrad::gddim::cld_quadratic_grid(cld, n, t_min),
                            CldGddimOptions{.order = q});
      errs.push_back(rel(run<double>(scheme, model, x_T), want));
    }
    const double slope = -fitted_slope(ns, errs);
    std::printf("  q = %d: %.2e %.2e %.2e %.2e  fitted order %.2f\n", q, errs[0], errs[1], errs[2],
                errs[3], slope);
    CHECK(std::fabs(slope - q) <= 0.2);
  }
}

TEST_CASE("CLD stochastic gDDIM: one step maps N(m_s, Sigma_s) onto N(m_t, Sigma_t)",
          "[gddim][cld][sampler]") {
  // Gaussian data N((x0, 0), Sigma_0) (the model with one component of std 0): at time s the
  // law is N(Psi(s,0) u_0, Sigma_s). 1e5 samples u_s = m_s + chol(Sigma_s) z, one step to t;
  // mean and covariance against Psi(t,0) u_0 and Sigma_t within 5 standard errors
  // (SE of a mean: sqrt(Sigma_ii / n); of a covariance entry: sqrt((Sigma_ii Sigma_jj +
  // Sigma_ij^2) / n)).
  const CldSchedule cld{};
  const double x0 = 0.5;
  Means mean(1, 1);
  mean << x0;
  const EigenBackend<double> backend;
  const int n = 100000;
  const double s = 0.5, t = 0.1;
  for (const auto param : {CldParameterisation::R, CldParameterisation::cholesky})
    for (const double l : {0.5, 1.0}) {
      CldMixture<double> model(cld, mean, Eigen::VectorXd::Zero(1), {}, param);
      StateD z(n, 2), u(n, 2);
      backend.gaussian(z, 101, 0);
      const Eigen::Vector2d ms = cld.transition(s, 0) * Eigen::Vector2d(x0, 0.0);
      const Mat2 ls = CldSchedule::cholesky(cld.covariance(s));
      for (int r = 0; r < n; ++r) {
        const Eigen::Vector2d v = ms + ls * Eigen::Vector2d(z(r, 0), z(r, 1));
        u(r, 0) = v[0];
        u(r, 1) = v[1];
      }
      const CldGddim scheme(cld, {s, t},
                            CldGddimOptions{.stochasticity = l, .parameterisation = param});
      REQUIRE(scheme.stochastic());
      const StateD out = run<double>(scheme, model, u, 7);
      const Eigen::Vector2d mt = cld.transition(t, 0) * Eigen::Vector2d(x0, 0.0);
      const Mat2 st = cld.covariance(t);
      const Eigen::RowVector2d m = out.colwise().mean();
      const StateD c = out.rowwise() - m;
      const Mat2 cov = (c.transpose() * c) / static_cast<double>(n);
      double worst = 0;
      for (int i = 0; i < 2; ++i) {
        worst = std::max(worst, std::fabs(m[i] - mt[i]) / std::sqrt(st(i, i) / n));
        for (int j = 0; j < 2; ++j)
          worst = std::max(worst, std::fabs(cov(i, j) - st(i, j)) /
                                      std::sqrt((st(i, i) * st(j, j) + st(i, j) * st(i, j)) / n));
      }
      std::printf("CLD stochastic step %g -> %g, l = %g (%s): worst moment error %.2f SE\n", s, t,
                  l, param == CldParameterisation::R ? "R_t" : "L_t", worst);
      CHECK(worst <= 5.0);
    }
}

TEST_CASE("CLD stochastic gDDIM: l -> 0 is the deterministic step", "[gddim][cld][sampler]") {
  // l = 0 builds the deterministic plan; a small l > 0 goes through the stochastic-step ODEs
  // (CldSchedule::stochastic_step) and must approach it: mean coefficients differ by O(l^2),
  // the noise factor is O(l).
  const CldSchedule cld{};
  const auto grid = diffgrad::gddim::cld_quadratic_grid(cld, 5, 1e-3);
  const CldGddim det(cld, grid), zero(cld, grid, CldGddimOptions{.stochasticity = 0.0}),
      tiny(cld, grid, CldGddimOptions{.stochasticity = 1e-4});
  CHECK_FALSE(zero.stochastic());
  const auto norm = [](const Block2& b) {
    return std::sqrt(b.xx * b.xx + b.xv * b.xv + b.vx * b.vx + b.vv * b.vv);
  };
  const auto diff = [&](const Block2& a, const Block2& b) {
    return norm(Block2{a.xx - b.xx, a.xv - b.xv, a.vx - b.vx, a.vv - b.vv}) / norm(b);
  };
  double worst_x = 0, worst_e = 0, worst_noise = 0;
  for (int i = 0; i < det.num_steps(); ++i) {
    const auto& a = det.plans()[static_cast<std::size_t>(i)];
    const auto& b = zero.plans()[static_cast<std::size_t>(i)];
    const auto& c = tiny.plans()[static_cast<std::size_t>(i)];
    CHECK(a.output.x == b.output.x);
    CHECK(a.output.e[0] == b.output.e[0]);
    CHECK(b.noise.is_zero());
    worst_x = std::max(worst_x, diff(c.output.x, a.output.x));
    worst_e = std::max(worst_e, diff(c.output.e[0], a.output.e[0]));
    worst_noise = std::max(worst_noise, norm(c.noise) / norm(a.output.e[0]));
  }
  std::printf("CLD l = 1e-4 vs deterministic plan: Psi %.1e, eps coefficient %.1e, noise %.1e\n",
              worst_x, worst_e, worst_noise);
  CHECK(worst_x == 0.0);
  CHECK(worst_e <= 1e-7);
  CHECK(worst_noise <= 1e-3);
}

namespace {

/// A small differentiable model on [x | v] rows: per pair p_j = (x_j, v_j),
/// eps_j = tanh(A p_j + t b) + c (x_j, v_j) with parameters theta = (A row-major, b, c)
/// (7 numbers). Not symmetric in x and v, so a missing block transpose in the adjoint shows.
struct TanhPairModel {
  Eigen::VectorXd theta;
  std::int64_t cond_size() const { return 0; }
  std::int64_t param_size() const { return 7; }
  void eps(const StateD& u, const Node& n, StateD& out) const {
    const Eigen::Index d = u.cols() / 2;
    out.resize(u.rows(), u.cols());
    for (Eigen::Index r = 0; r < u.rows(); ++r)
      for (Eigen::Index j = 0; j < d; ++j) {
        const double x = u(r, j), v = u(r, d + j);
        out(r, j) = std::tanh(theta[0] * x + theta[1] * v + n.t * theta[4]) + theta[6] * x;
        out(r, d + j) = std::tanh(theta[2] * x + theta[3] * v + n.t * theta[5]) + theta[6] * v;
      }
  }
  void vjp(const StateD& u, const Node& n, const StateD& a, StateD& dx, Eigen::VectorXd*,
           Eigen::VectorXd* dparams) const {
    const Eigen::Index d = u.cols() / 2;
    StateD g(u.rows(), u.cols());
    for (Eigen::Index r = 0; r < u.rows(); ++r)
      for (Eigen::Index j = 0; j < d; ++j) {
        const double x = u(r, j), v = u(r, d + j);
        const double ex = std::tanh(theta[0] * x + theta[1] * v + n.t * theta[4]);
        const double ev = std::tanh(theta[2] * x + theta[3] * v + n.t * theta[5]);
        const double gx = a(r, j) * (1 - ex * ex), gv = a(r, d + j) * (1 - ev * ev);
        g(r, j) = theta[0] * gx + theta[2] * gv + theta[6] * a(r, j);
        g(r, d + j) = theta[1] * gx + theta[3] * gv + theta[6] * a(r, d + j);
        if (dparams) {
          (*dparams)[0] += gx * x;
          (*dparams)[1] += gx * v;
          (*dparams)[2] += gv * x;
          (*dparams)[3] += gv * v;
          (*dparams)[4] += gx * n.t;
          (*dparams)[5] += gv * n.t;
          (*dparams)[6] += a(r, j) * x + a(r, d + j) * v;
        }
      }
    dx = g;
  }
};

} // namespace

TEST_CASE("CLD gDDIM: exact discrete gradients through block plans vs finite differences",
          "[gddim][cld][sampler][gradient]") {
  // L = <w, x_0>. dL/dx_T and dL/dtheta from diffgrad::gradient (the scheme stands in for the
  // schedule: its NodeAtLambda is never used) against the fourth-order central difference
  // (step 1e-4) along 4 random directions each; relative error of the projected vectors.
  // Identical (bitwise) across MemoryMode::store_all / checkpoint(2) / recompute.
  const CldSchedule cld{};
  const auto grid = diffgrad::gddim::cld_quadratic_grid(cld, 5, 0.05);
  const EigenBackend<double> backend;
  TanhPairModel model{Eigen::VectorXd(7)};
  model.theta << 0.8, -0.3, 0.4, 0.6, 0.5, -0.7, 0.2;
  StateD x_T(3, 4), w(3, 4);
  diffgrad::gddim::draw_cld_prior(backend, cld, x_T, 21);
  backend.gaussian(w, 22, 0);
  std::vector<StateD> noise(grid.size(), StateD(3, 4));
  for (std::size_t i = 0; i < noise.size(); ++i) backend.gaussian(noise[i], 23, i);

  struct Case {
    const char* name;
    CldGddimOptions opt;
  };
  const std::vector<Case> cases{
      {"q = 1", CldGddimOptions{.order = 1}},
      {"q = 3", CldGddimOptions{.order = 3}},
      {"stochastic l = 0.7, given noise", CldGddimOptions{.stochasticity = 0.7}},
      {"Euler-Maruyama l = 0.5 + denoise",
       CldGddimOptions{.stochasticity = 0.5, .method = CldMethod::euler, .denoise = true}}};
  for (const auto& c : cases) {
    const CldGddim scheme(cld, grid, c.opt);
    const auto& nodes = scheme.nodes();
    const auto grad = [&](const StateD& x, const Eigen::VectorXd& theta, diffgrad::MemoryMode mm) {
      TanhPairModel m{theta};
      const diffgrad::GradientOptions go{.memory = mm, .wrt_params = true};
      auto ws = diffgrad::make_gradient_workspace(scheme, backend, std::span<const Node>(nodes), m,
                                                  x, go);
      if (scheme.stochastic())
        ws.given_noise = std::span<const StateD>(noise.data(), nodes.size() - 1);
      diffgrad::gradient(scheme, backend, scheme, std::span<const Node>(nodes), m, x, w, go, ws);
      return ws.result;
    };
    const auto full = grad(x_T, model.theta, diffgrad::MemoryMode::store_all());
    const auto loss = [&](const StateD& x, const Eigen::VectorXd& theta) {
      return grad(x, theta, diffgrad::MemoryMode::store_all()).loss;
    };
    const double h = 1e-4;
    Eigen::VectorXd by_adj(8), by_fd(8);
    for (int k = 0; k < 8; ++k) {
      StateD dir_x = StateD::Zero(3, 4);
      Eigen::VectorXd dir_t = Eigen::VectorXd::Zero(7);
      if (k < 4) {
        backend.gaussian(dir_x, 30, static_cast<std::uint64_t>(k));
        dir_x /= dir_x.norm();
        by_adj[k] = full.grad_x.cwiseProduct(dir_x).sum();
      } else {
        for (int j = 0; j < 7; ++j) dir_t[j] = std::sin(1.7 * (k * 7 + j) + 0.3);
        dir_t /= dir_t.norm();
        by_adj[k] = full.grad_params.dot(dir_t);
      }
      const auto phi = [&](double e) { return loss(x_T + e * dir_x, model.theta + e * dir_t); };
      by_fd[k] = (8.0 * (phi(h) - phi(-h)) - (phi(2 * h) - phi(-2 * h))) / (12.0 * h);
    }
    const double err = (by_adj - by_fd).norm() / by_fd.norm();
    const auto ck = grad(x_T, model.theta, diffgrad::MemoryMode::checkpoint(2));
    const auto rc = grad(x_T, model.theta, diffgrad::MemoryMode::recompute());
    std::printf("CLD gradient (%s): FD rel error %.2e\n", c.name, err);
    CHECK(err <= 1e-7);
    CHECK(ck.grad_x == full.grad_x);
    CHECK(rc.grad_x == full.grad_x);
    CHECK(ck.grad_params == full.grad_params);
    CHECK(rc.grad_params == full.grad_params);
    CHECK(ck.x0 == full.x0);
  }
}

TEST_CASE("CLD gDDIM: bad input is refused by name", "[gddim][cld][sampler]") {
  const CldSchedule cld{};
  const std::vector<double> grid{1.0, 0.5, 0.1};
  const auto has = [](const std::string& msg, const char* what) {
    INFO(msg);
    return msg.find(what) != std::string::npos;
  };
  CHECK(has(message_of([&] {
              CldGddim(cld, {1.0, 0.5, 0.5});
            }),
            "'times' expected strictly decreasing"));
  CHECK(has(message_of([&] {
              CldGddim(cld, {0.1, 0.5});
            }),
            "'times' expected strictly decreasing"));
  CHECK(has(message_of([&] {
              CldGddim(cld, {1.5, 0.5});
            }),
            "'times' expected times in (0, t_max = 1]"));
  CHECK(has(message_of([&] {
              CldGddim(cld, {1.0, 0.0});
            }),
            "'times' expected times in (0, t_max = 1]"));
  CHECK(has(message_of([&] { CldGddim(cld, {1.0}); }), "'times' expected at least 2 times"));
  CHECK(has(message_of([&] { CldGddim(cld, grid, CldGddimOptions{.stochasticity = 1.5}); }),
            "'stochasticity' expected a number in [0, 1]"));
  CHECK(has(message_of([&] { CldGddim(cld, grid, CldGddimOptions{.stochasticity = -0.1}); }),
            "'stochasticity' expected a number in [0, 1]"));
  CHECK(has(message_of([&] { CldGddim(cld, grid, CldGddimOptions{.order = 0}); }),
            "'order' expected an order q in 1..3"));
  CHECK(has(message_of([&] { CldGddim(cld, grid, CldGddimOptions{.order = 4}); }),
            "'order' expected an order q in 1..3"));
  CHECK(has(
      message_of([&] { CldGddim(cld, grid, CldGddimOptions{.order = 2, .stochasticity = 0.5}); }),
      "'order' expected order 1 for a stochastic sampler"));
  CHECK(has(message_of([&] {
              CldGddim(cld, grid, CldGddimOptions{.order = 2, .method = CldMethod::euler});
            }),
            "'order' expected order 1 for the Euler baseline"));
  CHECK(has(message_of([&] {
              CldGddim(
                  cld, grid,
                  CldGddimOptions{.order = 2, .parameterisation = CldParameterisation::cholesky});
            }),
            "'order' expected order 1 for the Cholesky parameterisation"));
  CHECK(has(message_of([&] { CldGddim(cld, grid, CldGddimOptions{.model_time_scale = 0}); }),
            "'model_time_scale'"));

  // Odd state width and mismatched nodes, through the engine.
  const CldGddim scheme(cld, grid);
  Means m(1, 1);
  m << 0.3;
  CldMixture<double> model(cld, m, Eigen::VectorXd::Zero(1));
  CHECK(has(message_of([&] { (void)run<double>(scheme, model, StateD::Zero(2, 3)); }),
            "'x' expected a state width of an even number 2d"));
  const EigenBackend<double> backend;
  StateD x = StateD::Zero(2, 2);
  diffgrad::SamplerWorkspace<EigenBackend<double>> ws(backend, 0, 1, 2, 2);
  diffgrad::EpsField<CldMixture<double>> field{model};
  std::vector<Node> other = CldGddim(cld, {1.0, 0.4, 0.1}).nodes();
  CHECK(has(message_of([&] {
              diffgrad::run_scheme(scheme, backend, std::span<const Node>(other),
                                   diffgrad::NodeAtLambda(scheme), field, x, ws);
            }),
            "'nodes' expected the scheme's grid"));
  other.pop_back();
  CHECK(has(message_of([&] {
              diffgrad::run_scheme(scheme, backend, std::span<const Node>(other),
                                   diffgrad::NodeAtLambda(scheme), field, x, ws);
            }),
            "'nodes' expected the scheme's 3 nodes"));
  // The NaN alpha/sigma/lambda of CLD nodes.
  CHECK(std::isnan(scheme.nodes()[0].alpha));
  CHECK(std::isnan(scheme.nodes()[1].sigma));
  CHECK(scheme.nodes()[1].model_t == 999.0 * 0.5);
  // The model refuses a state of the wrong width; the grid helper and prior refuse bad input.
  StateD out;
  CHECK(has(message_of([&] { model.eps(StateD::Zero(1, 4), scheme.nodes()[0], out); }),
            "'u' expected width 2d = 2"));
  CHECK(has(message_of([&] { (void)diffgrad::gddim::cld_quadratic_grid(cld, 0); }), "'steps'"));
  CHECK(
      has(message_of([&] { (void)diffgrad::gddim::cld_quadratic_grid(cld, 5, 1.0); }), "'t_min'"));
  StateD odd(2, 3);
  CHECK(has(message_of([&] { diffgrad::gddim::draw_cld_prior(backend, cld, odd, 1); }),
            "'u' expected a state of even width"));
  CHECK(has(message_of([&] { CldMixture<double>(cld, m, Eigen::VectorXd::Zero(2)); }), "'stds'"));
}

TEST_CASE("CLD gDDIM: float32 single-point error table", "[gddim][cld][sampler]") {
  // The same single-point problem as above in EigenBackend<float> (coefficients computed in
  // double, applied in float; the model computes in double from float states). One long step
  // has coefficients up to ~5e4, which multiply float rounding. Bounds: ~5x the measured.
  const SinglePoint& sp = single_point();
  Means m = sp.means();
  CldMixture<float> model(sp.cld, m, Eigen::VectorXd::Zero(1));
  const StateF x_T = sp.x_T.cast<float>();
  std::printf("CLD single point in float32, rel 2-norm error at t_min (q = 1 | q = 3):\n");
  for (int n : {1, 2, 5, 10}) {
    const auto grid = diffgrad::gddim::cld_quadratic_grid(sp.cld, n, sp.t_min);
    double e[2];
    for (int k = 0; k < 2; ++k) {
      const CldGddim scheme(sp.cld, grid, CldGddimOptions{.order = k == 0 ? 1 : 3});
      const StateF got = run<float>(scheme, model, x_T);
      e[k] = rel(got.cast<double>(), sp.want);
    }
    std::printf("  N = %2d: %.2e | %.2e\n", n, e[0], e[1]);
    CHECK(e[0] <= (n == 1 ? 1e-2 : 1e-4));
    // q = 3: the Adams coefficients C_j are individually much larger than their sum C, so the
    // float products cancel (measured: 5e-4 at N = 2, 5e-5 at N = 10).
    CHECK(e[1] <= (n <= 2 ? 1e-2 : 1e-3));
  }
}

namespace {

/// The mixture model seen through the official interleaved layout (..., d, 2): its own index
/// arithmetic (element (j, c) of a row at 2j + c), written here independently of the adapter.
struct InterleavedMixture {
  CldMixture<double>& inner;
  std::int64_t cond_size() const { return 0; }
  std::int64_t param_size() const { return 0; }
  static StateD blocked(const StateD& u) {
    StateD b(u.rows(), u.cols());
    const Eigen::Index d = u.cols() / 2;
    for (Eigen::Index r = 0; r < u.rows(); ++r)
      for (Eigen::Index i = 0; i < u.cols(); ++i) b(r, (i % 2) * d + i / 2) = u(r, i);
    return b;
  }
  static StateD interleaved(const StateD& b) {
    StateD u(b.rows(), b.cols());
    const Eigen::Index d = b.cols() / 2;
    for (Eigen::Index r = 0; r < b.rows(); ++r)
      for (Eigen::Index i = 0; i < b.cols(); ++i) u(r, i) = b(r, (i % 2) * d + i / 2);
    return u;
  }
  void eps(const StateD& u, double model_t, StateD& out) const {
    StateD e;
    inner.eps(blocked(u), Node{model_t / 999.0, 0, 0, 0, model_t}, e);
    out = interleaved(e);
  }
  void vjp(const StateD& u, double model_t, const StateD& a, StateD& dx, Eigen::VectorXd* c,
           Eigen::VectorXd* p) const {
    StateD g;
    inner.vjp(blocked(u), Node{model_t / 999.0, 0, 0, 0, model_t}, blocked(a), g, c, p);
    dx = interleaved(g);
  }
};

} // namespace

TEST_CASE("CLD gDDIM: prior, interleaved adapter, denoising step, x half, R_0 angle",
          "[gddim][cld][sampler]") {
  const CldSchedule cld{};
  const EigenBackend<double> backend;
  // Prior: x ~ N(0, 1), v ~ N(0, M), independent; 2e5 draws (5 standard errors).
  {
    StateD u(50000, 8);
    diffgrad::gddim::draw_cld_prior(backend, cld, u, 5);
    const auto xs = u.leftCols(4).array(), vs = u.rightCols(4).array();
    const double n = 2e5;
    CHECK(std::fabs(xs.square().mean() - 1.0) <= 5 * std::sqrt(2.0 / n));
    CHECK(std::fabs(vs.square().mean() - 0.25) <= 5 * 0.25 * std::sqrt(2.0 / n));
    CHECK(std::fabs((xs * vs).mean()) <= 5 * 0.5 / std::sqrt(n));
    CHECK(std::fabs(xs.mean()) <= 5 / std::sqrt(n));
    // The same draws as the library's standard normal state scaled by diag(1, sqrt M).
    StateD xi(50000, 8);
    backend.gaussian(xi, 5, 0);
    CHECK(u.leftCols(4) == xi.leftCols(4));
    CHECK((u.rightCols(4) - 0.5 * xi.rightCols(4)).cwiseAbs().maxCoeff() <= 1e-15);
  }
  const Eigen::VectorXd stds = Eigen::VectorXd::Constant(3, 0.3);
  CldMixture<double> model(cld, ring_means(), stds);
  StateD u(4, 4), a(4, 4);
  diffgrad::gddim::draw_cld_prior(backend, cld, u, 8);
  backend.gaussian(a, 9, 0);
  // Interleaved adapter: eps and VJP equal the blocked model's.
  {
    InterleavedMixture inter{model};
    diffgrad::gddim::CldInterleavedModel<InterleavedMixture, double> adapted(inter, 4, 2);
    const Node n{0.3, 0, 0, 0, 999.0 * 0.3};
    StateD e1, e2, g1, g2;
    model.eps(u, n, e1);
    adapted.eps(u, n, e2);
    CHECK((e1 - e2).cwiseAbs().maxCoeff() <= 1e-15 * e1.cwiseAbs().maxCoeff());
    model.vjp(u, n, a, g1, nullptr, nullptr);
    adapted.vjp(u, n, a, g2, nullptr, nullptr);
    CHECK((g1 - g2).cwiseAbs().maxCoeff() <= 1e-15 * g1.cwiseAbs().maxCoeff());
    CHECK(adapted.param_size() == 0);
    CHECK(has_message(message_of([&] { adapted.eps(StateD::Zero(2, 4), n, e2); }),
                      "'u' expected shape 4 x 4"));
  }
  // Denoising step: the last step is u_0 = (I - delta F) u - delta G G^T R^{-T} eps(u, delta).
  {
    const auto grid = diffgrad::gddim::cld_quadratic_grid(cld, 4, 1e-3);
    const CldGddim plain(cld, grid, CldGddimOptions{.order = 2});
    const CldGddim denoised(cld, grid, CldGddimOptions{.order = 2, .denoise = true});
    CHECK(denoised.num_steps() == 5);
    CHECK(denoised.nodes().back().t == 0.0);
    const StateD before = run<double>(plain, model, u), after = run<double>(denoised, model, u);
    const double delta = 1e-3;
    StateD e;
    model.eps(before, Node{delta, 0, 0, 0, 0}, e);
    const Ref ref{cld.params()};
    const L2 F = ref.F(delta), Rit = inv(to_l2(cld.sqrt_covariance(delta)));
    StateD want(4, 4);
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < 2; ++j) {
        const ld x = before(r, j), v = before(r, 2 + j);
        // (R^{-T} eps)_v = Rit[0][1] eps_x + Rit[1][1] eps_v
        const ld g = ref.gg(delta) * (Rit[0][1] * e(r, j) + Rit[1][1] * e(r, 2 + j));
        want(r, j) = static_cast<double>(x - delta * (F[0][0] * x + F[0][1] * v));
        want(r, 2 + j) = static_cast<double>(v - delta * (F[1][0] * x + F[1][1] * v) - delta * g);
      }
    CHECK(rel(after, want) <= 1e-13);
    const StateD x_only = diffgrad::gddim::cld_data_half(after);
    CHECK(x_only.cols() == 2);
    CHECK(x_only == after.leftCols(2));
  }
  // A user-supplied R: the angle that makes the library's R pass through a given R_t.
  {
    CldParams p{};
    p.initial_angle = 0.4;
    const CldSchedule rotated(p);
    const double t = 0.3;
    const double angle =
        diffgrad::gddim::cld_initial_angle(CldParams{}, t, rotated.sqrt_covariance(t));
    CHECK(std::fabs(angle - 0.4) <= 1e-12);
    const Mat2 r0 = rotated.sqrt_covariance(0.0);
    CHECK(std::fabs(diffgrad::gddim::cld_initial_angle(CldParams{}, 0.0, r0) - 0.4) <= 1e-12);
    Mat2 reflect = r0;
    reflect.col(0) *= -1.0;
    CHECK(has_message(
        message_of([&] { (void)diffgrad::gddim::cld_initial_angle(CldParams{}, 0.0, reflect); }),
        "det R > 0"));
    CHECK(has_message(
        message_of([&] { (void)diffgrad::gddim::cld_initial_angle(CldParams{}, 0.0, 2.0 * r0); }),
        "'r_t' expected a square root of Sigma_t"));
  }
}

TEST_CASE("CldMixture: eps = -K^T grad log p_t of an independent density; VJP vs FD",
          "[gddim][cld][sampler][model]") {
  // log p_t(u) written here as a sum over components of 2d-dimensional Gaussian densities:
  // component k has mean Psi(t,0)(m_k, 0) per pair and per-pair covariance
  // Psi(t,0) diag(s_k^2 + eps, gamma M + eps) Psi(t,0)^T + (Sigma_t - Psi Sigma_0 Psi^T)
  // (the noise part; Sigma_t is checked against the Lyapunov ODE in test_gddim_cld.cpp).
  // grad log p by fourth-order central differences (step 1e-5, relative error ~1e-9).
  const CldSchedule cld{};
  const Eigen::Vector3d stds(0.3, 0.1, 0.5), weights(1.0, 2.0, 1.5);
  const Means means = ring_means();
  StateD u(2, 4);
  u << 0.4, -0.2, 0.3, 0.1, -0.6, 0.9, -0.2, 0.5;
  for (const auto param : {CldParameterisation::R, CldParameterisation::cholesky})
    for (const double t : {0.05, 0.3, 0.9}) {
      CldMixture<double> model(cld, means, stds, weights, param);
      const Mat2 psi = cld.transition(t, 0.0), sig = cld.covariance(t);
      const Mat2 noise = sig - psi * cld.initial_covariance() * psi.transpose();
      const auto log_p = [&](const StateD& y, int r) {
        ld total = 0;
        for (int k = 0; k < 3; ++k) {
          Mat2 s0 = cld.initial_covariance();
          s0(0, 0) += stds[k] * stds[k];
          const Mat2 c = psi * s0 * psi.transpose() + noise;
          const Mat2 ci = CldSchedule::inverse(c);
          ld quad = 0;
          for (int j = 0; j < 2; ++j) {
            const Eigen::Vector2d dlt =
                Eigen::Vector2d(y(r, j), y(r, 2 + j)) - psi * Eigen::Vector2d(means(k, j), 0.0);
            quad += dlt.dot(ci * dlt);
          }
          const ld det = c(0, 0) * c(1, 1) - c(0, 1) * c(1, 0);
          total += weights[k] / weights.sum() * std::exp(-0.5L * quad) / det; // (2 pi)^d cancels
        }
        return std::log(total);
      };
      const Mat2 k_t =
          param == CldParameterisation::R ? cld.sqrt_covariance(t) : CldSchedule::cholesky(sig);
      StateD got, want(2, 4);
      model.eps(u, Node{t, 0, 0, 0, 999 * t}, got);
      for (int r = 0; r < 2; ++r) {
        Eigen::Vector4d score;
        for (int i = 0; i < 4; ++i) {
          const double h = 1e-5;
          const auto at = [&](double e) {
            StateD y = u;
            y(r, i) += e;
            return log_p(y, r);
          };
          score[i] =
              static_cast<double>((8 * (at(h) - at(-h)) - (at(2 * h) - at(-2 * h))) / (12 * h));
        }
        for (int j = 0; j < 2; ++j) {
          const Eigen::Vector2d e = -k_t.transpose() * Eigen::Vector2d(score[j], score[2 + j]);
          want(r, j) = e[0];
          want(r, 2 + j) = e[1];
        }
      }
      const double err = rel(got, want);
      INFO("t = " << t);
      CHECK(err <= 1e-7);
      // VJP against central differences of eps along random directions.
      StateD a(2, 4), dir(2, 4), g;
      const EigenBackend<double> backend;
      backend.gaussian(a, 40, 0);
      backend.gaussian(dir, 41, 0);
      model.vjp(u, Node{t, 0, 0, 0, 0}, a, g, nullptr, nullptr);
      const double h = 1e-5;
      const auto proj = [&](double e) {
        StateD out;
        model.eps(u + e * dir, Node{t, 0, 0, 0, 0}, out);
        return a.cwiseProduct(out).sum();
      };
      const double fd = (8 * (proj(h) - proj(-h)) - (proj(2 * h) - proj(-2 * h))) / (12 * h);
      const double by_vjp = g.cwiseProduct(dir).sum();
      CHECK(std::fabs(fd - by_vjp) <= 1e-7 * std::fabs(fd));
    }
}

TEST_CASE("CLD Euler-Maruyama: the (1 + l^2)/2 drift keeps the Gaussian marginals",
          "[gddim][cld][sampler]") {
  // Gaussian data as in the stochastic gDDIM test; 200 Euler-Maruyama steps 0.5 -> 0.1 at
  // l = 0.5, 1e4 samples. The mean and covariance must match N(m_t, Sigma_t) within 5 standard
  // errors plus 10 % of the scale (the O(h) bias of Euler-Maruyama: measured 3.8 % on Sigma_xx).
  // The official code's factor (1 + l)/2 = 0.75 instead of 0.625 gives half the covariance
  // (measured: Sigma_xx 0.115 instead of 0.222, 2.8 times the tolerance).
  const CldSchedule cld{};
  const double x0 = 0.5, s = 0.5, t = 0.1, l = 0.5;
  Means mean(1, 1);
  mean << x0;
  CldMixture<double> model(cld, mean, Eigen::VectorXd::Zero(1));
  const EigenBackend<double> backend;
  const int n = 10000;
  StateD z(n, 2), u(n, 2);
  backend.gaussian(z, 51, 0);
  const Eigen::Vector2d ms = cld.transition(s, 0) * Eigen::Vector2d(x0, 0.0);
  const Mat2 ls = CldSchedule::cholesky(cld.covariance(s));
  for (int r = 0; r < n; ++r) {
    const Eigen::Vector2d v = ms + ls * Eigen::Vector2d(z(r, 0), z(r, 1));
    u(r, 0) = v[0];
    u(r, 1) = v[1];
  }
  std::vector<double> grid(201);
  for (int i = 0; i <= 200; ++i) grid[static_cast<std::size_t>(i)] = s + (t - s) * i / 200.0;
  const CldGddim em(cld, grid, CldGddimOptions{.stochasticity = l, .method = CldMethod::euler});
  const StateD out = run<double>(em, model, u, 52);
  const Eigen::Vector2d mt = cld.transition(t, 0) * Eigen::Vector2d(x0, 0.0);
  const Mat2 st = cld.covariance(t);
  const Eigen::RowVector2d m = out.colwise().mean();
  const StateD c = out.rowwise() - m;
  const Mat2 cov = (c.transpose() * c) / static_cast<double>(n);
  double worst = 0;
  for (int i = 0; i < 2; ++i) {
    const double tol_m = 5 * std::sqrt(st(i, i) / n) + 0.1 * std::sqrt(st(i, i));
    worst = std::max(worst, std::fabs(m[i] - mt[i]) / tol_m);
    for (int j = 0; j < 2; ++j) {
      const double scale = std::sqrt(st(i, i) * st(j, j));
      const double tol_c =
          5 * std::sqrt((st(i, i) * st(j, j) + st(i, j) * st(i, j)) / n) + 0.1 * scale;
      worst = std::max(worst, std::fabs(cov(i, j) - st(i, j)) / tol_c);
    }
  }
  std::printf("CLD Euler-Maruyama, 200 steps %g -> %g, l = %g: worst moment error %.2f of the "
              "tolerance\n  mean %.4f %.4f (want %.4f %.4f), cov %.4f %.4f %.4f (want %.4f %.4f "
              "%.4f)\n",
              s, t, l, worst, m[0], m[1], mt[0], mt[1], cov(0, 0), cov(0, 1), cov(1, 1), st(0, 0),
              st(0, 1), st(1, 1));
  CHECK(worst <= 1.0);
}
