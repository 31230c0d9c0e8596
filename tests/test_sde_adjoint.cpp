// SDE-AdjointDEIS: order against the exact pathwise gradient of the diffusion SDE on Gaussian
// data, the gap to the exact discrete gradient of the first-order SDE sampler given its noise,
// the Cycle-SDE pipeline (encode -> replay -> adjoint), cost counts and bad input.
#include <catch2/catch.hpp>

#include <cstdio>

#include "diffgrad/gradients/cycle_sde.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/gradients/sde_adjoint_deis.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using diffgrad::testing::fitted_order;
using StateD = EigenBackend<double>::state_type;
using VecD = EigenBackend<double>::vector_type;
using BackendD = EigenBackend<double>;

namespace {

double variance(const Node& n, double s) { return n.alpha * n.alpha * s * s + n.sigma * n.sigma; }

/// Exact pathwise Jacobians of the reverse SDE dx = [f x + (g^2/sigma) eps] dt + g dw on Gaussian
/// data, eps = sigma (x - alpha mu)/v. The SDE is affine in x with additive noise, so the
/// Jacobians do not depend on the path. With D = f + g^2/v and d log v/dt = 2f + g^2/v:
///   D = d/dt log(v/alpha)           =>  dx_0/dx_T = (v_0/alpha_0) / (v_T/alpha_T);
///   alpha^2 g^2/v^2 = -d/dt(alpha^2/v) =>  dx_0/dmu = alpha_0 - v_0 alpha_T^2 / (alpha_0 v_T).
/// (Checked against finite differences of a fine SDE simulation below.)
struct Pathwise {
  double x_T, mu;
};
Pathwise pathwise_jacobian(const Node& T, const Node& d, double s) {
  const double vT = variance(T, s), v0 = variance(d, s);
  return {v0 * T.alpha / (vT * d.alpha), d.alpha - v0 * T.alpha * T.alpha / (d.alpha * vT)};
}

struct Setup {
  VPLinearSchedule schedule;
  BackendD backend;
  models::GaussianData<double> model = diffgrad::testing::gaussian_problem<double>(3);
  StateD x_T = diffgrad::testing::test_batch<double>(4, 3);
  StateD w = (diffgrad::testing::test_batch<double>(4, 3).array() * 0.7 + 0.3).matrix();

  std::vector<Node> nodes(int n) const {
    return make_nodes(schedule, uniform_lambda_grid(schedule, n, 1.0, 1e-3));
  }
  std::vector<StateD> sample_path(const std::vector<Node>& nodes, std::uint64_t seed,
                                  const StateD& start) {
    const int n = static_cast<int>(nodes.size()) - 1;
    TrajectoryCache<BackendD> cache(backend, n, start.rows(), start.cols());
    cache.reset(start);
    StateD x = start;
    SampleOptions opt;
    opt.seed = seed;
    sample(CycleSdeFirstOrder(), backend, schedule, nodes, model, x, opt, cache);
    return {cache.states().begin(), cache.states().end()};
  }
  struct Grad {
    StateD x_T;
    VecD mu;
    double s = 0.0;
    AdjointCost cost;
  };
  Grad adjoint(const std::vector<Node>& nodes, const std::vector<StateD>& traj, int order) {
    Grad g;
    g.mu = VecD::Zero(3);
    VecD p = VecD::Zero(1);
    AdjointDeisOptions opt;
    opt.order = order;
    g.cost = sde_adjoint_deis(backend, model, nodes, std::span<const StateD>(traj), w, g.x_T, &g.mu,
                              &p, opt);
    g.s = p(0);
    return g;
  }
  double err_x(const StateD& g, const Pathwise& J) const {
    return (g - J.x_T * w).norm() / (J.x_T * w).norm();
  }
  double err_mu(const VecD& g, const Pathwise& J) const {
    const VecD ref = J.mu * w.colwise().sum().transpose();
    return (g - ref).norm() / ref.norm();
  }
};

} // namespace

TEST_CASE("The closed-form pathwise SDE Jacobian matches a fine SDE simulation",
          "[sde_adjoint][reference]") {
  // Given the noise, x_0 is affine in (x_T, mu); differences through a fine first-order SDE
  // simulation (same Philox noise) give its discrete Jacobian, O(1/N) from the continuous one.
  // Richardson extrapolation 2 J_{2N} - J_N removes the O(1/N) term.
  Setup S;
  auto discrete_jacobians = [&](int n) {
    const auto nodes = S.nodes(n);
    StateD one = StateD::Zero(1, 3);
    one(0, 1) = 0.2;
    const StateD xa = S.sample_path(nodes, 9, (one.array() + 1.0).matrix()).back();
    const StateD xb = S.sample_path(nodes, 9, (one.array() - 1.0).matrix()).back();
    const double m0 = S.model.mu()(2);
    S.model.mu()(2) = m0 + 0.5;
    const StateD ma = S.sample_path(nodes, 9, one).back();
    S.model.mu()(2) = m0 - 0.5;
    const StateD mb = S.sample_path(nodes, 9, one).back();
    S.model.mu()(2) = m0;
    CHECK(std::abs(ma(0, 0) - mb(0, 0)) < 1e-12); // other components do not see mu_2
    // Perturbing every component of x_T by +-1 moves x_0 by +-J_x (diagonal Jacobian).
    return Pathwise{((xa - xb) / 2.0).mean(), ma(0, 2) - mb(0, 2)};
  };
  const Pathwise coarse = discrete_jacobians(4000), fine = discrete_jacobians(8000);
  const auto nodes = S.nodes(8000);
  const Pathwise J = pathwise_jacobian(nodes.front(), nodes.back(), S.model.s());
  INFO("J_x: closed form " << J.x_T << ", discrete N=4000 " << coarse.x_T << ", N=8000 "
                           << fine.x_T);
  CHECK(2.0 * fine.x_T - coarse.x_T == Approx(J.x_T).epsilon(2e-3));
  CHECK(2.0 * fine.mu - coarse.mu == Approx(J.mu).epsilon(1e-6));
}

TEST_CASE("SDE-AdjointDEIS converges to the exact pathwise gradient", "[sde_adjoint][order]") {
  Setup S;
  // The asymptotic range: the doubled VJP weight makes the adjoint stiffer than the PF-ODE's,
  // so SDE-AdjointDEIS-1 reaches it later (relative error ~1 below N ~ 100 on this problem).
  for (int k : {1, 2}) {
    const std::vector<int> steps = k == 1 ? std::vector<int>{640, 1280, 2560, 5120, 10240}
                                          : std::vector<int>{160, 320, 640, 1280, 2560};
    std::vector<double> ex, em;
    for (int n : steps) {
      const auto nodes = S.nodes(n);
      const auto traj = S.sample_path(nodes, static_cast<std::uint64_t>(n), S.x_T);
      const auto g = S.adjoint(nodes, traj, k);
      CHECK(g.cost.vjps == n);
      CHECK(g.cost.model_evals == 0);
      const Pathwise J = pathwise_jacobian(nodes.front(), nodes.back(), S.model.s());
      ex.push_back(S.err_x(g.x_T, J));
      em.push_back(S.err_mu(g.mu, J));
    }
    const double ox = fitted_order(steps, ex), om = fitted_order(steps, em);
    INFO("SDE-AdjointDEIS order " << k << ": x_T errors " << ex.front() << " .. " << ex.back()
                                  << " (order " << ox << "), mu " << em.front() << " .. "
                                  << em.back() << " (order " << om << ")");
    // -2M is second order here because d eps/dx does not depend on the (rough) path.
    const double margin = k == 1 ? 0.2 : 0.3;
    CHECK(ox == Approx(k).margin(margin));
    CHECK(om == Approx(k).margin(margin));
  }
}

TEST_CASE("SDE-AdjointDEIS vs the exact discrete gradient of the SDE sampler given its noise",
          "[sde_adjoint][table]") {
  Setup S;
  std::printf("\nSDE-AdjointDEIS-1 on Gaussian data (VP linear, uniform lambda grid t = 1 -> 1e-3, "
              "first-order SDE sampler, Philox seed 3), relative errors of dL/dx_T | dL/dmu "
              "(| dL/ds)\n");
  std::printf("%-4s %-30s %-24s %-24s\n", "N", "adjoint vs discrete", "adjoint vs pathwise",
              "discrete vs pathwise");
  std::vector<double> gaps;
  for (int n : {10, 20, 50, 200}) {
    const auto nodes = S.nodes(n);
    const auto traj = S.sample_path(nodes, 3, S.x_T);
    const auto adj = S.adjoint(nodes, traj, 1);
    // The exact discrete gradient through the same noise (generic discrete adjoint).
    GradientOptions go;
    go.wrt_cond = true;
    go.wrt_params = true;
    go.seed = 3;
    const auto disc =
        gradient(CycleSdeFirstOrder(), S.backend, S.schedule, nodes, S.model, S.x_T, S.w, go);
    CHECK((disc.x0 - traj.back()).norm() < 1e-13 * traj.back().norm());
    // Cross-check: the discrete Jacobian is the product of the per-step factors
    // k_i = alpha_{i+1}/alpha_i - 2 sigma_{i+1} (e^h - 1) sigma_i / v_i.
    double prod = 1.0;
    for (std::size_t i = 0; i + 1 < nodes.size(); ++i) {
      const Node &a = nodes[i], &b = nodes[i + 1];
      prod *= b.alpha / a.alpha -
              2.0 * b.sigma * std::expm1(b.lambda - a.lambda) * a.sigma / variance(a, S.model.s());
    }
    CHECK((disc.grad_x - prod * S.w).norm() < 1e-12 * (prod * S.w).norm());

    const Pathwise J = pathwise_jacobian(nodes.front(), nodes.back(), S.model.s());
    const double ad_x = (adj.x_T - disc.grad_x).norm() / disc.grad_x.norm();
    const double ad_m = (adj.mu - disc.grad_cond).norm() / disc.grad_cond.norm();
    const double ad_s = std::abs(adj.s - disc.grad_params(0)) / std::abs(disc.grad_params(0));
    std::printf("%-4d %9.2e %9.2e %9.2e    %9.2e %9.2e    %9.2e %9.2e\n", n, ad_x, ad_m, ad_s,
                S.err_x(adj.x_T, J), S.err_mu(adj.mu, J), S.err_x(disc.grad_x, J),
                S.err_mu(disc.grad_cond, J));
    gaps.push_back(ad_x + ad_m);
  }
  CHECK(gaps.back() < gaps.front());
}

TEST_CASE("SDE-AdjointDEIS along a Cycle-SDE replay equals the original path's",
          "[sde_adjoint][cycle_sde]") {
  Setup S;
  const auto nodes = S.nodes(40);
  const auto traj = S.sample_path(nodes, 21, S.x_T);
  std::vector<StateD> noises(40);
  cycle_sde_encode(CycleSdeFirstOrder(), S.backend, S.schedule, nodes, S.model,
                   std::span<const StateD>(traj), std::span<StateD>(noises));
  TrajectoryCache<BackendD> cache(S.backend, 40, 4, 3);
  cache.reset(S.x_T);
  StateD x = S.x_T;
  cycle_sde_replay(CycleSdeFirstOrder(), S.backend, S.schedule, nodes, S.model, x,
                   std::span<const StateD>(noises), {}, cache);
  const std::vector<StateD> replayed(cache.states().begin(), cache.states().end());
  for (int k : {1, 2}) {
    const auto a = S.adjoint(nodes, traj, k), b = S.adjoint(nodes, replayed, k);
    CHECK((a.x_T - b.x_T).norm() <= 1e-12 * a.x_T.norm());
    CHECK((a.mu - b.mu).norm() <= 1e-12 * a.mu.norm());
    CHECK(std::abs(a.s - b.s) <= 1e-12 * std::abs(a.s));
  }
}

TEST_CASE("SDE-AdjointDEIS doubles the VJP terms of AdjointDEIS", "[sde_adjoint]") {
  // The SDE drift f x + (g^2/sigma) eps is the PF-ODE drift of the model 2 eps, so the SDE
  // adjoint must equal the ODE adjoint of that model along the same states.
  Setup S;
  const auto nodes = S.nodes(30);
  const auto traj = S.sample_path(nodes, 1, S.x_T);
  struct Doubled {
    models::GaussianData<double>& m;
    std::int64_t cond_size() const { return m.cond_size(); }
    std::int64_t param_size() const { return m.param_size(); }
    void eps(const StateD& x, const Node& n, StateD& out) const {
      m.eps(x, n, out);
      out *= 2.0;
    }
    void vjp(const StateD& x, const Node& n, const StateD& a, StateD& dx, VecD* dc,
             VecD* dp) const {
      const StateD a2 = 2.0 * a;
      m.vjp(x, n, a2, dx, dc, dp);
    }
  } doubled{S.model};
  StateD g_ode;
  VecD gm_ode = VecD::Zero(3), gs_ode = VecD::Zero(1);
  AdjointDeisOptions opt;
  opt.order = 2;
  adjoint_deis(S.backend, doubled, nodes, std::span<const StateD>(traj), S.w, g_ode, &gm_ode,
               &gs_ode, opt);
  const auto g = S.adjoint(nodes, traj, 2);
  CHECK((g.x_T - g_ode).norm() <= 1e-13 * g_ode.norm());
  CHECK((g.mu - gm_ode).norm() <= 1e-13 * gm_ode.norm());
  CHECK(g.s == Approx(gs_ode(0)).epsilon(1e-13));
}

TEST_CASE("SDE-AdjointDEIS rejects bad input", "[sde_adjoint][errors]") {
  Setup S;
  const auto nodes = S.nodes(5);
  const auto traj = S.sample_path(nodes, 1, S.x_T);
  StateD g;
  CHECK_THROWS_WITH(sde_adjoint_deis(S.backend, S.model, nodes, std::span<const StateD>{}, S.w, g),
                    Catch::Contains("sde_adjoint_deis") &&
                        Catch::Contains("argument 'trajectory'"));
  AdjointDeisOptions bad;
  bad.order = 0;
  CHECK_THROWS_WITH(sde_adjoint_deis(S.backend, S.model, nodes, std::span<const StateD>(traj), S.w,
                                     g, nullptr, nullptr, bad),
                    Catch::Contains("argument 'options.order'"));
  const std::vector<StateD> short_traj(traj.begin(), traj.begin() + 3);
  CHECK_THROWS_WITH(
      sde_adjoint_deis(S.backend, S.model, nodes, std::span<const StateD>(short_traj), S.w, g),
      Catch::Contains("one state per node (6)") && Catch::Contains("got 3"));
}

TEST_CASE("SDE-AdjointDEIS has the halved stability bound ln 2 and reports or refuses past it",
          "[sde_adjoint][stability][errors]") {
  const BackendD backend;
  const VPLinearSchedule schedule;
  // Uniform lambda, N = 12 over VP-linear from 1 to 1e-3: |h| = 0.80, stable for the PF-ODE
  // adjoint (< ln 3) but not for the SDE's doubled VJP weight (> ln 2).
  const auto nodes = make_nodes(schedule, uniform_lambda_grid(schedule, 12, 1.0, 1e-3));
  const double h = nodes[1].lambda - nodes[0].lambda;
  REQUIRE(h > std::log(2.0));
  REQUIRE(h < std::log(3.0));
  CHECK_FALSE(adjoint_deis_stability(nodes).exceeded());
  const auto r = sde_adjoint_deis_stability(nodes);
  CHECK(std::string(r.method) == "SDE-AdjointDEIS-1");
  CHECK(r.bound == Approx(std::log(2.0)).epsilon(1e-14));
  CHECK(r.steps_beyond == 12);
  CHECK(r.first_beyond == 0);
  // On the collapsed posterior the SDE step's factor is 1 + 2 (1 - e^{|h|}) (exact e^{-2|h|}).
  CHECK(r.factor_at_max == Approx(1.0 + 2.0 * (1.0 - std::exp(r.max_abs_h))).epsilon(1e-12));
  CHECK(r.factor_at_max < -1.0);

  models::GaussianData<double> model(VecD::Constant(3, 0.2), 0.2);
  const std::vector<StateD> traj(nodes.size(), StateD::Constant(2, 3, 0.1));
  const StateD a0 = StateD::Ones(2, 3);
  StateD g;
  int calls = 0;
  AdjointDeisOptions opt;
  opt.stability.on_warning = [&](const AdjointStabilityReport& rep) {
    ++calls;
    CHECK(rep.steps_beyond == 12);
  };
  const auto cost = sde_adjoint_deis(backend, model, nodes, std::span<const StateD>(traj), a0, g,
                                     nullptr, nullptr, opt);
  CHECK(cost.stability.warned);
  CHECK(calls == 1);
  CHECK(cost.vjps == 12);
  opt.stability.policy = AmplificationPolicy::refuse;
  CHECK_THROWS_WITH(sde_adjoint_deis(backend, model, nodes, std::span<const StateD>(traj), a0, g,
                                     nullptr, nullptr, opt),
                    Catch::Contains("SDE-AdjointDEIS-1") && Catch::Contains("stability bound"));
  // Twice the steps halve |h| to 0.40 < ln 2: clean, and refuse lets it run.
  const auto fine = make_nodes(schedule, uniform_lambda_grid(schedule, 24, 1.0, 1e-3));
  const std::vector<StateD> traj24(fine.size(), StateD::Constant(2, 3, 0.1));
  const auto ok = sde_adjoint_deis(backend, model, fine, std::span<const StateD>(traj24), a0, g,
                                   nullptr, nullptr, opt);
  CHECK_FALSE(ok.stability.exceeded());
  CHECK(ok.vjps == 24);
  // -2M's bound is smaller still.
  opt.order = 2;
  CHECK(sde_adjoint_deis_stability(fine, opt).bound == Approx(0.36213).margin(1e-4));
  CHECK(sde_adjoint_deis_stability(fine, opt).exceeded());
}
