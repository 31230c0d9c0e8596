// DEIS family (tAB, rhoAB, rhoRK, log-rho, iPNDM): convergence orders on the Gaussian-data
// problem, equivalences to DDIM, float32 tolerance, sigma = 0 final nodes, input errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/deis.hpp"
#include "diffgrad/solvers/dpm_solver_singlestep.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "test_support.hpp"


using namespace diffgrad;
using diffgrad::testing::fitted_order;
using diffgrad::testing::relative_error;

namespace {

/// Five doublings starting at `first` steps.
std::vector<int> doublings(int first) {
  std::vector<int> n;
  for (int k = 0; k < 5; ++k) n.push_back(first << k);
  return n;
}

/// Times uniform in rho = sigma/alpha (the grid on which iPNDM's fixed AB weights are exact).
std::vector<double> uniform_rho_grid(const VPLinearSchedule& s, int n, double t0, double t1) {
  const double r0 = std::exp(-s.lambda(t0)), r1 = std::exp(-s.lambda(t1));
  std::vector<double> t(static_cast<std::size_t>(n) + 1);
  for (int i = 0; i <= n; ++i)
    t[static_cast<std::size_t>(i)] = s.t_of_lambda(-std::log(r0 + (r1 - r0) * i / n));
  t.front() = t0;
  t.back() = t1;
  return t;
}

enum class Grid { uniform_t, uniform_lambda, uniform_rho };

std::vector<Node> grid_nodes(const VPLinearSchedule& s, Grid grid, int n) {
  switch (grid) {
  case Grid::uniform_t: return make_nodes(s, uniform_t_grid(s, n, 1.0, 1e-3));
  case Grid::uniform_lambda: return make_nodes(s, uniform_lambda_grid(s, n, 1.0, 1e-3));
  case Grid::uniform_rho: return make_nodes(s, uniform_rho_grid(s, n, 0.5, 1e-3));
  }
  return {};
}

/// The scheme's sample of the Gaussian problem from the fixed test batch, in Scalar.
template <class Scalar, class Scheme>
diffgrad::testing::State<double> gaussian_sample(const Scheme& scheme,
                                                 const std::vector<Node>& nodes) {
  const VPLinearSchedule schedule;
  auto model = diffgrad::testing::gaussian_problem<Scalar>(3);
  auto x = diffgrad::testing::test_batch<Scalar>(4, 3);
  sample(scheme, EigenBackend<Scalar>(), schedule, nodes, model, x);
  return x.template cast<double>();
}

/// Relative global error at the data end of the Gaussian problem, against its exact flow.
template <class Scalar, class Scheme>
double gaussian_error(const Scheme& scheme, const std::vector<Node>& nodes) {
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  const auto exact = model.exact_flow(diffgrad::testing::test_batch<double>(4, 3),
                                      nodes.front(), nodes.back());
  return relative_error<double>(gaussian_sample<Scalar>(scheme, nodes), exact);
}

template <class Scheme>
double measured_order(const Scheme& scheme, Grid grid, int first, std::vector<double>& errors) {
  const VPLinearSchedule schedule;
  const auto steps = doublings(first);
  errors.clear();
  for (int n : steps) errors.push_back(gaussian_error<double>(scheme, grid_nodes(schedule, grid, n)));
  return fitted_order(steps, errors);
}

template <class Scheme>
void check_order(const std::string& name, const Scheme& scheme, Grid grid, int first,
                 double theory) {
  std::vector<double> errors;
  const double order = measured_order(scheme, grid, first, errors);
  INFO(name << ": N = " << first << " .. " << (first << 4) << ", errors " << errors.front()
            << " .. " << errors.back() << ", fitted order " << order << " (theory " << theory
            << ")");
  CHECK(order == Approx(theory).margin(0.2));
}

} // namespace

// Windows: the first N where every local slope is within ~0.1 of the asymptote, five
// doublings from there (the VP-linear Gaussian problem changes on a lambda scale of ~1, so
// 4th-order methods need N >= 160 on the uniform-lambda grid from t = 1 to 1e-3).
TEST_CASE("tAB-DEIS order r converges with order r + 1 (float64)", "[deis][tab][order]") {
  check_order("DeisTab(0)", DeisTab(0), Grid::uniform_lambda, 20, 1.0);
  check_order("DeisTab(1)", DeisTab(1), Grid::uniform_lambda, 40, 2.0);
  check_order("DeisTab(2)", DeisTab(2), Grid::uniform_lambda, 80, 3.0);
  check_order("DeisTab(3)", DeisTab(3), Grid::uniform_lambda, 160, 4.0);
}

TEST_CASE("rhoAB-DEIS order r converges with order r + 1 (float64)", "[deis][rhoab][order]") {
  check_order("DeisRhoAb(1)", DeisRhoAb(1), Grid::uniform_lambda, 40, 2.0);
  check_order("DeisRhoAb(2)", DeisRhoAb(2), Grid::uniform_lambda, 80, 3.0);
  check_order("DeisRhoAb(3)", DeisRhoAb(3), Grid::uniform_lambda, 160, 4.0);
}

TEST_CASE("rhoRK-DEIS converges with the order of its Runge-Kutta method (float64)",
          "[deis][rhork][order]") {
  check_order("DeisRhoRk(heun2)", DeisRhoRk(DeisRkMethod::heun2), Grid::uniform_lambda, 40, 2.0);
  check_order("DeisRhoRk(kutta3)", DeisRhoRk(DeisRkMethod::kutta3), Grid::uniform_lambda, 80,
              3.0);
  check_order("DeisRhoRk(rk4)", DeisRhoRk(DeisRkMethod::rk4), Grid::uniform_lambda, 40, 4.0);
  // Single-step methods do not care about the grid's smoothness in lambda: uniform t too.
  check_order("DeisRhoRk(kutta3), uniform t", DeisRhoRk(DeisRkMethod::kutta3), Grid::uniform_t,
              50, 3.0);
}

TEST_CASE("log-rho DEIS (diffusers) with k points converges with order k (float64)",
          "[deis][logrho][order]") {
  check_order("DeisLogRho(1)", DeisLogRho(1), Grid::uniform_lambda, 20, 1.0);
  check_order("DeisLogRho(2)", DeisLogRho(2), Grid::uniform_lambda, 40, 2.0);
  // On the uniform-lambda grid the h^3 term of the 3-point method nearly cancels on this
  // problem (the error changes sign between N = 640 and 1280, ~1e-11), so its asymptotic
  // regime lies below rounding there; on the uniform-t grid it is reachable.
  check_order("DeisLogRho(3), uniform t", DeisLogRho(3), Grid::uniform_t, 2000, 3.0);
}

TEST_CASE("iPNDM: order k on uniform-rho grids, min(k, 2) on other smooth grids",
          "[deis][ipndm][order]") {
  // The fixed uniform-step AB weights are exact AB-k only where the rho steps are equal.
  check_order("IPndm(4), uniform rho", IPndm(4), Grid::uniform_rho, 200, 4.0);
  // Elsewhere the weights integrate the grid's stretching d rho/ds only to second order.
  check_order("IPndm(1)", IPndm(1), Grid::uniform_lambda, 20, 1.0);
  check_order("IPndm(2)", IPndm(2), Grid::uniform_lambda, 40, 2.0);
  check_order("IPndm(3)", IPndm(3), Grid::uniform_lambda, 40, 2.0);
  check_order("IPndm(4)", IPndm(4), Grid::uniform_lambda, 40, 2.0);
}

TEST_CASE("iPNDM(k) equals rhoAB-DEIS(k - 1) on a grid uniform in rho", "[deis][ipndm]") {
  // Independent derivations of the same method there: fixed AB weights vs exact Lagrange
  // integrals in rho. Agreement to rounding checks both coefficient sets.
  const VPLinearSchedule schedule;
  const auto nodes = grid_nodes(schedule, Grid::uniform_rho, 60);
  for (int k = 2; k <= 4; ++k) {
    const auto ipndm = gaussian_sample<double>(IPndm(k), nodes);
    const auto rho_ab = gaussian_sample<double>(DeisRhoAb(k - 1), nodes);
    INFO("k = " << k);
    CHECK(relative_error<double>(ipndm, rho_ab) < 1e-13);
  }
}

TEST_CASE("DDIM, DeisTab(0), DeisLogRho(1), IPndm(1), DPM-Solver-1 agree to rounding",
          "[deis][ddim]") {
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  const auto x_T = diffgrad::testing::test_batch<double>(4, 3);
  const std::vector<double> grid{1.0, 0.9, 0.31, 0.3, 0.05, 0.002};  // deliberately irregular
  const auto nodes = make_nodes(schedule, grid);
  auto run = [&](const auto& scheme) {
    auto x = x_T;
    sample(scheme, backend, schedule, nodes, model, x);
    return x;
  };
  const auto ddim = run(Ddim());
  CHECK(relative_error<double>(run(DeisTab(0)), ddim) <= 1e-14);
  CHECK(relative_error<double>(run(DeisLogRho(1)), ddim) <= 1e-14);
  CHECK(relative_error<double>(run(IPndm(1)), ddim) <= 1e-14);
  DpmSolverSinglestep::Options dpm1;
  dpm1.order = 1;
  dpm1.prediction = SolverPrediction::noise;
  CHECK(relative_error<double>(run(DpmSolverSinglestep(dpm1)), ddim) <= 1e-14);
  // Warm-up: the first step of every multistep variant is a DDIM step.
  const std::vector<Node> first(nodes.begin(), nodes.begin() + 2);
  auto first_step = [&](const auto& scheme) {
    auto x = x_T;
    sample(scheme, backend, schedule, first, model, x);
    return x;
  };
  const auto ddim1 = first_step(Ddim());
  CHECK(relative_error<double>(first_step(DeisTab(3)), ddim1) <= 1e-14);
  CHECK(relative_error<double>(first_step(DeisRhoAb(3)), ddim1) <= 1e-14);
  CHECK(relative_error<double>(first_step(DeisLogRho(3)), ddim1) <= 1e-14);
  CHECK(relative_error<double>(first_step(IPndm(4)), ddim1) <= 1e-14);
}

TEST_CASE("DEIS schemes are exact for a single data point", "[deis]") {
  // eps is constant along every PF-ODE path of one point, so any consistent polynomial
  // extrapolation of eps and any RK method on dv/drho = eps is exact.
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  Eigen::VectorXd y(2);
  y << 0.7, -1.2;
  models::GaussianData<double> model(y, 1e-300);
  const auto x_T = diffgrad::testing::test_batch<double>(3, 2);
  const auto nodes = make_nodes(schedule, std::vector<double>{1.0, 0.9, 0.31, 0.3, 0.05, 0.002});
  const auto exact = model.exact_flow(x_T, nodes.front(), nodes.back());
  auto check = [&](const auto& scheme, const char* name) {
    auto x = x_T;
    sample(scheme, backend, schedule, nodes, model, x);
    INFO(name);
    CHECK(relative_error<double>(x, exact) < 1e-13);
  };
  check(DeisTab(3), "DeisTab(3)");
  check(DeisRhoAb(3), "DeisRhoAb(3)");
  check(DeisLogRho(3), "DeisLogRho(3)");
  check(IPndm(4), "IPndm(4)");
  check(DeisRhoRk(DeisRkMethod::rk4), "DeisRhoRk(rk4)");
}

TEST_CASE("DEIS schemes in float32 stay within 1e-5 of float64", "[deis][float32]") {
  // Documented tolerance: states are O(1) and every step adds O(1) float32 rounding
  // (2^-24 ~ 6e-8) to a contractive flow; 50 steps give ~1e-7 in practice, 1e-5 leaves room
  // for other compilers and FMA. The coefficients are computed in double either way.
  const VPLinearSchedule schedule;
  const auto nodes = make_nodes(schedule, uniform_lambda_grid(schedule, 50, 1.0, 1e-3));
  auto compare = [&](const auto& scheme, const char* name) {
    const double diff = relative_error<double>(gaussian_sample<float>(scheme, nodes),
                                               gaussian_sample<double>(scheme, nodes));
    INFO(name << ": float32 vs float64 relative difference " << diff);
    CHECK(diff < 1e-5);
  };
  compare(DeisTab(3), "DeisTab(3)");
  compare(DeisRhoAb(3), "DeisRhoAb(3)");
  compare(DeisLogRho(3), "DeisLogRho(3)");
  compare(IPndm(4), "IPndm(4)");
  compare(DeisRhoRk(DeisRkMethod::heun2), "DeisRhoRk(heun2)");
  compare(DeisRhoRk(DeisRkMethod::kutta3), "DeisRhoRk(kutta3)");
  compare(DeisRhoRk(DeisRkMethod::rk4), "DeisRhoRk(rk4)");
}

TEST_CASE("rho-space DEIS schemes reach a sigma = 0 final node", "[deis][hazard]") {
  // lambda = +inf at the last node: rho = 0 there, every coefficient stays finite. RK's
  // intermediate stages of the last step sit at rho_i / 2 (t ~ 2.7e-4 here), which must be
  // inside the schedule's domain: the schedule handed to sample() goes down to t = 1e-6.
  const VPLinearSchedule schedule(0.1, 20.0, 1e-6);
  const EigenBackend<double> backend;
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  const auto x_T = diffgrad::testing::test_batch<double>(4, 3);
  auto nodes = make_nodes(schedule, uniform_lambda_grid(schedule, 40, 1.0, 1e-3));
  nodes.push_back(terminal_data_node(0.0, 0.0));
  // Exact PF-ODE end point at sigma = 0, alpha = 1: mu + sqrt(s^2 / v_T) (x_T - alpha_T mu).
  const auto exact = model.exact_flow(x_T, nodes.front(), nodes.back());
  auto check = [&](const auto& scheme, const char* name) {
    auto x = x_T;
    sample(scheme, backend, schedule, nodes, model, x);
    INFO(name << ": error " << relative_error<double>(x, exact));
    CHECK(x.allFinite());
    CHECK(relative_error<double>(x, exact) < 1e-2);
  };
  check(DeisRhoAb(3), "DeisRhoAb(3)");
  check(DeisLogRho(3, false), "DeisLogRho(3)");
  check(IPndm(4), "IPndm(4)");
  check(DeisRhoRk(DeisRkMethod::rk4), "DeisRhoRk(rk4)");
}

TEST_CASE("Model evaluations: one per step for multistep, one per stage for RK", "[deis]") {
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  auto x = diffgrad::testing::test_batch<double>(2, 3);
  const auto nodes = make_nodes(schedule, uniform_lambda_grid(schedule, 7, 1.0, 1e-3));
  CHECK(sample(DeisTab(3), backend, schedule, nodes, model, x).model_evals == 7);
  CHECK(sample(IPndm(4), backend, schedule, nodes, model, x).model_evals == 7);
  CHECK(sample(DeisRhoRk(DeisRkMethod::heun2), backend, schedule, nodes, model, x).model_evals ==
        14);
  CHECK(sample(DeisRhoRk(DeisRkMethod::kutta3), backend, schedule, nodes, model, x).model_evals ==
        21);
  CHECK(sample(DeisRhoRk(DeisRkMethod::rk4), backend, schedule, nodes, model, x).model_evals ==
        28);
}

TEST_CASE("DeisLogRho warm-up and lower_order_final follow diffusers", "[deis][logrho]") {
  // diffusers: step 0 first order, step 1 at most second; with lower_order_final and fewer
  // than 15 steps the last step is first order and the one before at most second.
  const DeisLogRho d3(3);
  CHECK(d3.points_at(0, 10) == 1);
  CHECK(d3.points_at(1, 10) == 2);
  CHECK(d3.points_at(2, 10) == 3);
  CHECK(d3.points_at(7, 10) == 3);
  CHECK(d3.points_at(8, 10) == 2);
  CHECK(d3.points_at(9, 10) == 1);
  CHECK(d3.points_at(13, 15) == 3);  // 15 steps: no lower-order final steps
  CHECK(d3.points_at(14, 15) == 3);
  const DeisLogRho d3_full(3, false);
  CHECK(d3_full.points_at(9, 10) == 3);
  const DeisLogRho d2(2);
  CHECK(d2.points_at(8, 10) == 2);
  CHECK(d2.points_at(9, 10) == 1);
}

TEST_CASE("DEIS schemes reject unsupported orders", "[deis][errors]") {
  CHECK_THROWS_WITH(DeisTab(4), Catch::Contains("DeisTab") && Catch::Contains("order") &&
                                    Catch::Contains("[0, 3]") && Catch::Contains("got 4"));
  CHECK_THROWS_AS(DeisTab(-1), diffgrad::invalid_argument);
  CHECK_THROWS_WITH(DeisRhoAb(0), Catch::Contains("DeisRhoAb") && Catch::Contains("[1, 3]"));
  CHECK_THROWS_WITH(DeisLogRho(4), Catch::Contains("DeisLogRho") && Catch::Contains("[1, 3]"));
  CHECK_THROWS_WITH(IPndm(5), Catch::Contains("IPndm") && Catch::Contains("[1, 4]"));
  CHECK_THROWS_AS(IPndm(0), diffgrad::invalid_argument);
}

TEST_CASE("DeisRhoRk rejects an unknown method", "[deis][errors]") {
  CHECK_THROWS_WITH(DeisRhoRk(static_cast<DeisRkMethod>(7)),
                    Catch::Contains("DeisRhoRk") && Catch::Contains("method") &&
                        Catch::Contains("heun2") && Catch::Contains("got 7"));
  CHECK_THROWS_AS(DeisRhoRk(static_cast<DeisRkMethod>(-1)), diffgrad::invalid_argument);
}

TEST_CASE("DEIS schemes reject node sequences that do not move towards data",
          "[deis][errors]") {
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  auto x = diffgrad::testing::test_batch<double>(2, 3);
  // lambda must increase strictly: a repeated node is rejected before any model call.
  const std::vector<Node> repeated{schedule.node(1.0), schedule.node(0.5), schedule.node(0.5)};
  CHECK_THROWS_WITH(sample(DeisRhoAb(2), backend, schedule, repeated, model, x),
                    Catch::Contains("DeisRhoAb") && Catch::Contains("strictly increasing lambda"));
  CHECK_THROWS_AS(sample(DeisTab(2), backend, schedule, repeated, model, x),
                  diffgrad::invalid_argument);
  // tAB needs t(lambda) on the whole step, which a sigma = 0 node leaves.
  const std::vector<Node> terminal{schedule.node(1.0), schedule.node(0.5),
                                   terminal_data_node(0.0, 0.0)};
  CHECK_THROWS_WITH(sample(DeisTab(1), backend, schedule, terminal, model, x),
                    Catch::Contains("DeisTab") && Catch::Contains("finite lambda"));
}
