// Multistep DPM-Solver / DPM-Solver++ (2M, 3M): coefficient exactness, convergence orders on
// uniform and non-uniform grids, the order schedule (warm-up, lower_order_final,
// euler_at_final, sigma = 0 final node), equivalences, hazards and errors.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include "diffgrad/coeffs/dpm_solver.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/dpm_solver_singlestep.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using coeffs::dpm::Integrand;
using diffgrad::testing::fitted_order;
using StateD = diffgrad::testing::State<double>;

namespace {

// Reference integrals (as in test_dpm_solver_singlestep.cpp): tau = lambda - lambda_s0.
template <class F> long double simpson(F&& f, long double a, long double b, int n = 4000) {
  const long double dx = (b - a) / n;
  long double sum = f(a) + f(b);
  for (int k = 1; k < n; ++k) sum += f(a + k * dx) * (k % 2 == 1 ? 4.0L : 2.0L);
  return sum * dx / 3.0L;
}
template <class M>
long double exact_contribution(Integrand f, const Node& s, const Node& t, M&& m) {
  const long double h = static_cast<long double>(t.lambda) - s.lambda;
  const long double at = t.alpha, st = t.sigma, as = s.alpha, ss = s.sigma;
  switch (f) {
  case Integrand::ode_noise:
    return -at * ss / as * simpson([&](long double u) { return std::exp(-u) * m(u); }, 0.0L, h);
  case Integrand::ode_data:
    return st * as / ss * simpson([&](long double u) { return std::exp(u) * m(u); }, 0.0L, h);
  case Integrand::sde_noise:
    return -2.0L * at * ss / as *
           simpson([&](long double u) { return std::exp(-u) * m(u); }, 0.0L, h);
  case Integrand::sde_data:
    return 2.0L * at *
           simpson([&](long double u) { return std::exp(-2.0L * (h - u)) * m(u); }, 0.0L, h);
  }
  return 0.0L;
}

// Largest relative node error along the trajectory against the exact flow (see the note in
// test_dpm_solver_singlestep.cpp: the final error alone nearly cancels at leading order on
// this problem).
template <class Scheme> double trajectory_error(const Scheme& scheme, std::span<const Node> nodes) {
  const VPLinearSchedule schedule;
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  const auto x_T = diffgrad::testing::test_batch<double>(4, 3);
  auto x = x_T;
  double worst = 0.0;
  sample(scheme, EigenBackend<double>(), schedule, nodes, model, x, SampleOptions{},
         [&](int, int, const Node& n, const StateD& state) {
           const auto exact = model.exact_flow(x_T, nodes.front(), n);
           worst = std::max(worst, diffgrad::testing::relative_error<double>(state, exact));
         });
  return worst;
}

enum class Grid { uniform_lambda, karras };

std::vector<Node> grid(Grid g, int n) {
  const VPLinearSchedule schedule;
  return make_nodes(schedule, g == Grid::uniform_lambda
                                  ? uniform_lambda_grid(schedule, n, 1.0, 1e-3)
                                  : karras_grid(schedule, n, 1.0, 1e-3));
}

template <class Scheme>
std::vector<double> global_errors(const Scheme& scheme, Grid g, const std::vector<int>& steps) {
  std::vector<double> errors;
  for (int n : steps) errors.push_back(trajectory_error(scheme, grid(g, n)));
  return errors;
}

void check_order(const std::vector<int>& steps, const std::vector<double>& errors,
                 double expected) {
  const double order = fitted_order(steps, errors);
  INFO("errors " << errors.front() << " ... " << errors.back() << ", fitted order " << order);
  CHECK(order == Approx(expected).margin(0.2));
  CHECK(errors.back() > 1e-13);
}

std::vector<int> orders_used(const DpmSolverMultistep& s, std::span<const Node> nodes) {
  std::vector<int> out;
  for (int i = 0; i + 1 < static_cast<int>(nodes.size()); ++i)
    out.push_back(s.step_order(nodes, i));
  return out;
}

} // namespace

// =======================================================================================
// Coefficients
// =======================================================================================

TEST_CASE("Multistep updates are exact for polynomial model values of degree < order",
          "[dpm][coeffs][multistep]") {
  // Deliberately unequal previous steps (r0 != r1 != 1).
  const VPLinearSchedule schedule;
  const Node s2 = schedule.node(0.8), s1 = schedule.node(0.62), s0 = schedule.node(0.55);
  const Node t = schedule.node(0.41);
  auto poly = [](int degree) {
    return [degree](long double u) {
      long double v = 0.3L;
      if (degree >= 1) v += -1.1L * u;
      if (degree >= 2) v += 0.7L * u * u;
      return v;
    };
  };
  for (Integrand f :
       {Integrand::ode_noise, Integrand::ode_data, Integrand::sde_noise, Integrand::sde_data})
    for (int order : {1, 2, 3})
      for (auto type : {DpmSolverType::midpoint, DpmSolverType::heun}) {
        // midpoint order 2 is exact for constants only (it uses W_0/2 for W_1).
        const int exact_degree = order == 2 && type == DpmSolverType::midpoint ? 0 : order - 1;
        for (int degree = 0; degree <= exact_degree; ++degree) {
          const auto m = poly(degree);
          const auto u = coeffs::dpm::multistep_update(f, order, type, s0, s1, s2, t);
          const long double got = u.m[0] * m(0.0L) + u.m[1] * m(s1.lambda - s0.lambda) +
                                  u.m[2] * m(s2.lambda - s0.lambda);
          INFO("integrand " << static_cast<int>(f) << ", order " << order << ", degree " << degree);
          CHECK(static_cast<double>(got) ==
                Approx(static_cast<double>(exact_contribution(f, s0, t, m))).epsilon(1e-11));
        }
      }
}

TEST_CASE("The reference codes' third-order multistep update is not exact for quadratics",
          "[dpm][coeffs][multistep]") {
  // Official DPM-Solver and diffusers weight D2 = (D1_0 - D1_1)/(r0 + r1) ~ h^2 m''/2 with
  // W_2, the weight of h^2 m''. For m = tau^2 the update then misses exactly W_2 h^2 ... / 2
  // of the quadratic term: a local error O(h^3), so the method is globally second order.
  const VPLinearSchedule schedule;
  const Node s2 = schedule.node(0.8), s1 = schedule.node(0.62), s0 = schedule.node(0.55);
  const Node t = schedule.node(0.41);
  const double h = t.lambda - s0.lambda;
  coeffs::dpm::ReferenceQuirks half;
  half.multistep_half_d2 = true;
  for (Integrand f : {Integrand::ode_noise, Integrand::ode_data}) {
    auto m = [](long double u) { return u * u; };
    const auto u = coeffs::dpm::multistep_update(f, 3, DpmSolverType::heun, s0, s1, s2, t, half);
    const long double got = u.m[1] * m(s1.lambda - s0.lambda) + u.m[2] * m(s2.lambda - s0.lambda);
    const double exact = static_cast<double>(exact_contribution(f, s0, t, m));
    const auto tw = coeffs::dpm::taylor_weights(f, s0, t);
    // m'' = 2: the reference update carries W_2 h^2 instead of 2 W_2 h^2.
    CHECK(static_cast<double>(got) == Approx(exact - tw.w[2] * h * h).epsilon(1e-10));
    CHECK(std::abs(static_cast<double>(got) - exact) > 1e-3 * std::abs(exact));
  }
}

// =======================================================================================
// Convergence orders (float64)
// =======================================================================================

TEST_CASE("Multistep DPM-Solver(++) has its theoretical order on uniform and Karras grids",
          "[dpm][multistep][order]") {
  const std::vector<int> steps{24, 48, 96, 192, 384};
  for (Grid g : {Grid::uniform_lambda, Grid::karras})
    for (SolverPrediction pred : {SolverPrediction::noise, SolverPrediction::data})
      for (int order : {1, 2, 3})
        for (auto type : {DpmSolverType::midpoint, DpmSolverType::heun}) {
          INFO("order " << order << (type == DpmSolverType::heun ? " heun" : " midpoint")
                        << (pred == SolverPrediction::data ? " data" : " noise")
                        << (g == Grid::karras ? " karras" : " uniform-lambda"));
          check_order(steps, global_errors(DpmSolverMultistep(order, pred, type), g, steps), order);
        }
}

TEST_CASE("diffusers' third-order multistep (halved D2) is globally second order",
          "[dpm][multistep][diffusers][order]") {
  const std::vector<int> steps{48, 96, 192, 384, 768};
  for (auto algo : {DpmAlgorithm::dpmsolver, DpmAlgorithm::dpmsolver_pp}) {
    const auto scheme = DpmSolverMultistep::diffusers({3, algo, DpmSolverType::midpoint});
    CHECK(scheme.config().quirks.multistep_half_d2);
    INFO((algo == DpmAlgorithm::dpmsolver ? "dpmsolver" : "dpmsolver++"));
    check_order(steps, global_errors(scheme, Grid::uniform_lambda, steps), 2.0);
  }
}

TEST_CASE("Multistep float32 stays within its documented tolerance", "[dpm][multistep][float32]") {
  // Documented tolerance: relative 1e-5 on top of the float64 truncation error (float32
  // rounding of O(1) states over N = 60 steps; the D1/D2 differences of model values lose no
  // more than a factor max(1/r) ~ 1 on a smooth grid).
  const VPLinearSchedule schedule;
  const auto nodes = grid(Grid::karras, 60);
  auto model64 = diffgrad::testing::gaussian_problem<double>(3);
  auto model32 = diffgrad::testing::gaussian_problem<float>(3);
  const auto x_T = diffgrad::testing::test_batch<double>(4, 3);
  const auto exact = model64.exact_flow(x_T, nodes.front(), nodes.back());
  for (int order : {1, 2, 3})
    for (SolverPrediction pred : {SolverPrediction::noise, SolverPrediction::data}) {
      const DpmSolverMultistep scheme(order, pred);
      auto x64 = x_T;
      diffgrad::testing::State<float> x32 = x_T.cast<float>();
      sample(scheme, EigenBackend<double>(), schedule, nodes, model64, x64);
      sample(scheme, EigenBackend<float>(), schedule, nodes, model32, x32);
      const double err64 = diffgrad::testing::relative_error<double>(x64, exact);
      const StateD x32d = x32.cast<double>();
      const double err32 = diffgrad::testing::relative_error<double>(x32d, exact);
      INFO("order " << order << ", float64 error " << err64 << ", float32 error " << err32);
      CHECK(err32 <= err64 + 1e-5);
      CHECK(diffgrad::testing::relative_error<double>(x32d, x64) < 1e-5);
    }
}

// =======================================================================================
// Equivalences
// =======================================================================================

TEST_CASE("DDIM == DPM-Solver-1 == multistep order 1 (noise), to rounding",
          "[dpm][multistep][ddim]") {
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  const std::vector<double> times{1.0, 0.9, 0.31, 0.3, 0.05, 0.002}; // deliberately irregular
  const auto nodes = make_nodes(schedule, times);
  const auto x_T = diffgrad::testing::test_batch<double>(4, 3);
  auto x_ddim = x_T, x_single = x_T, x_multi = x_T;
  sample(Ddim(), backend, schedule, nodes, model, x_ddim);
  sample(DpmSolverSinglestep(1, SolverPrediction::noise), backend, schedule, nodes, model,
         x_single);
  sample(DpmSolverMultistep(1, SolverPrediction::noise), backend, schedule, nodes, model, x_multi);
  CHECK(diffgrad::testing::relative_error<double>(x_single, x_ddim) <= 1e-14);
  CHECK(diffgrad::testing::relative_error<double>(x_multi, x_ddim) <= 1e-14);
  // The data-prediction first-order update is the same map written in x0 (DPM-Solver++1).
  auto x_data = x_T;
  sample(DpmSolverMultistep(1, SolverPrediction::data), backend, schedule, nodes, model, x_data);
  CHECK(diffgrad::testing::relative_error<double>(x_data, x_ddim) <= 1e-13);
}

TEST_CASE("DpmSolverMultistep::diffusers reproduces diffusers' formulas step by step",
          "[dpm][multistep][diffusers]") {
  // Transcriptions of DPMSolverMultistepScheduler's dpmsolver / dpmsolver++ updates (diffusers
  // 0.42, float64) on an irregular grid, x0 = (x - sigma eps)/alpha.
  const VPLinearSchedule schedule;
  const auto nodes = make_nodes(schedule, std::vector<double>{0.9, 0.7, 0.55, 0.42, 0.3});
  const double x = 0.37, e = -1.21, hx[2] = {0.52, 0.81}, he[2] = {-0.93, 0.44};
  const auto E = [](double z) { return std::exp(z); };
  for (auto algo : {DpmAlgorithm::dpmsolver, DpmAlgorithm::dpmsolver_pp})
    for (auto type : {DpmSolverType::midpoint, DpmSolverType::heun})
      for (int order : {1, 2, 3}) {
        const auto scheme = DpmSolverMultistep::diffusers({order, algo, type, false, false});
        const int i = 3;
        REQUIRE(scheme.step_order(nodes, i) == order);
        const StepPlan p = scheme.plan(nodes, i, NodeAtLambda(schedule));
        const double got = p.output.x * x + p.output.e[0] * e + p.output.hist_x[0] * hx[0] +
                           p.output.hist_e[0] * he[0] + p.output.hist_x[1] * hx[1] +
                           p.output.hist_e[1] * he[1];
        const bool data = algo == DpmAlgorithm::dpmsolver_pp;
        const Node &n0 = nodes[3], &n1 = nodes[2], &n2 = nodes[1], &nt = nodes[4];
        auto conv = [&](double xx, double ee, const Node& n) {
          return data ? (xx - n.sigma * ee) / n.alpha : ee;
        };
        const double m0 = conv(x, e, n0), m1 = conv(hx[0], he[0], n1), m2 = conv(hx[1], he[1], n2);
        const double at = nt.alpha, st = nt.sigma;
        const double h = nt.lambda - n0.lambda, r0 = (n0.lambda - n1.lambda) / h,
                     r1 = (n1.lambda - n2.lambda) / h;
        const bool mid = type == DpmSolverType::midpoint;
        const double lin = data ? (st / n0.sigma) * x : (at / n0.alpha) * x;
        double expected = 0.0;
        if (order == 1) {
          expected = data ? lin - (at * (E(-h) - 1.0)) * m0 : lin - (st * (E(h) - 1.0)) * m0;
        } else if (order == 2) {
          const double D0 = m0, D1 = (1.0 / r0) * (m0 - m1);
          expected =
              data ? lin - (at * (E(-h) - 1.0)) * D0 +
                         (mid ? -0.5 * (at * (E(-h) - 1.0)) : at * ((E(-h) - 1.0) / h + 1.0)) * D1
                   : lin - (st * (E(h) - 1.0)) * D0 -
                         (mid ? 0.5 * (st * (E(h) - 1.0)) : st * ((E(h) - 1.0) / h - 1.0)) * D1;
        } else {
          const double D0 = m0, D1_0 = (1.0 / r0) * (m0 - m1), D1_1 = (1.0 / r1) * (m1 - m2);
          const double D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1);
          const double D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1);
          expected = data
                         ? lin - (at * (E(-h) - 1.0)) * D0 + (at * ((E(-h) - 1.0) / h + 1.0)) * D1 -
                               (at * ((E(-h) - 1.0 + h) / (h * h) - 0.5)) * D2
                         : lin - (st * (E(h) - 1.0)) * D0 - (st * ((E(h) - 1.0) / h - 1.0)) * D1 -
                               (st * ((E(h) - 1.0 - h) / (h * h) - 0.5)) * D2;
        }
        INFO((data ? "dpmsolver++" : "dpmsolver")
             << " order " << order << (mid ? " midpoint" : " heun"));
        CHECK(got == Approx(expected).epsilon(1e-12));
        CHECK(p.noise == 0.0);
      }
}

// =======================================================================================
// Order schedule
// =======================================================================================

TEST_CASE("Multistep order schedule: warm-up, lower_order_final, euler_at_final, sigma = 0",
          "[dpm][multistep]") {
  // Literal lists from the rules in diffusers 0.42 DPMSolverMultistepScheduler.step and the
  // official DPM-Solver sample(method='multistep').
  const VPLinearSchedule schedule;
  auto nodes = [&](int n, bool zero) {
    auto v = make_nodes(schedule, uniform_lambda_grid(schedule, n, 1.0, 1e-3));
    if (zero) v.back() = terminal_data_node(0.0, 0.0);
    return v;
  };
  auto scheme = [](int order, bool lower_final, int max_steps, bool euler_final) {
    DpmSolverMultistep::Options o;
    o.order = order;
    o.lower_order_final = lower_final;
    o.lower_order_final_max_steps = max_steps;
    o.euler_at_final = euler_final;
    return DpmSolverMultistep(o);
  };
  using V = std::vector<int>;
  // diffusers: fewer than 15 steps -> last step first order, the one before at most second.
  CHECK(orders_used(scheme(3, true, 15, false), nodes(8, false)) == V{1, 2, 3, 3, 3, 3, 2, 1});
  CHECK(orders_used(scheme(3, true, 15, false), nodes(4, false)) == V{1, 2, 2, 1});
  CHECK(orders_used(scheme(2, true, 15, false), nodes(5, false)) == V{1, 2, 2, 2, 1});
  // 15 steps or more: no lowering.
  V full(15, 3);
  full[0] = 1;
  full[1] = 2;
  CHECK(orders_used(scheme(3, true, 15, false), nodes(15, false)) == full);
  // final_sigmas_type "zero" (a sigma = 0 last node): the last step is always first order.
  V zero = full;
  zero.back() = 1;
  CHECK(orders_used(scheme(3, true, 15, false), nodes(15, true)) == zero);
  CHECK(orders_used(scheme(3, false, 15, false), nodes(15, true)) == zero);
  // euler_at_final: the last step is first order whatever the step count.
  CHECK(orders_used(scheme(3, false, 15, true), nodes(15, false)) == zero);
  // lower_order_final off: no lowering even for few steps.
  CHECK(orders_used(scheme(3, false, 15, false), nodes(5, false)) == V{1, 2, 3, 3, 3});
  // The official code lowers only below 10 steps.
  CHECK(orders_used(scheme(3, true, 10, false), nodes(10, false)) ==
        V{1, 2, 3, 3, 3, 3, 3, 3, 3, 3});
  CHECK(orders_used(scheme(3, true, 10, false), nodes(9, false)) == V{1, 2, 3, 3, 3, 3, 3, 2, 1});
}

// =======================================================================================
// Hazards
// =======================================================================================

TEST_CASE("Multistep into a sigma = 0 node lands on x0 (data and noise forms)",
          "[dpm][multistep][hazard]") {
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  auto nodes = make_nodes(schedule, uniform_lambda_grid(schedule, 20, 1.0, 0.02));
  nodes.back() = terminal_data_node(0.0, 0.0);
  const int n = static_cast<int>(nodes.size()) - 1;
  for (int order : {1, 2, 3})
    for (auto pred : {SolverPrediction::noise, SolverPrediction::data})
      for (bool reference : {false, true}) {
        DpmSolverMultistep::Options o;
        o.order = order;
        o.prediction = pred;
        o.lower_order_final = false; // the sigma = 0 node alone must force the first order
        o.quirks.multistep_half_d2 = reference;
        const DpmSolverMultistep scheme(o);
        StateD x_prev;
        auto x = diffgrad::testing::test_batch<double>(4, 3);
        sample(scheme, backend, schedule, nodes, model, x, SampleOptions{},
               [&](int step, int, const Node&, const StateD& state) {
                 if (step == n - 1) x_prev = state;
               });
        REQUIRE(x.allFinite());
        const Node& s = nodes[static_cast<std::size_t>(n) - 1];
        StateD eps(4, 3);
        model.eps(x_prev, s, eps);
        const StateD x0 = (x_prev - s.sigma * eps) / s.alpha;
        INFO("order " << order << (pred == SolverPrediction::data ? " data" : " noise"));
        CHECK(scheme.step_order(nodes, n - 1) == 1);
        CHECK(diffgrad::testing::relative_error<double>(x, x0) < 1e-14);
      }
}

TEST_CASE("Multistep survives a vanishing step h -> 0", "[dpm][multistep][hazard]") {
  // An extra interval of 1e-12 in t. The step after it divides model differences by
  // r0 = h_0/h ~ 1e-11: D1 = (m_0 - m_1)/r0 is then O(1) rounding noise of size
  // eps_machine/r0 ~ 1e-5, a limit of every multistep DPM-Solver (reference codes alike).
  // The result stays finite and within that bound of the grid without the tiny interval.
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  const auto base = uniform_lambda_grid(schedule, 40, 1.0, 1e-3);
  std::vector<double> with_tiny = base;
  with_tiny.insert(with_tiny.begin() + 20, base[20] + 1e-12);
  const auto nodes_base = make_nodes(schedule, base);
  const auto nodes_tiny = make_nodes(schedule, with_tiny);
  for (int order : {2, 3})
    for (auto pred : {SolverPrediction::noise, SolverPrediction::data}) {
      const DpmSolverMultistep scheme(order, pred, DpmSolverType::heun);
      auto x_base = diffgrad::testing::test_batch<double>(4, 3);
      auto x_tiny = x_base;
      sample(scheme, backend, schedule, nodes_base, model, x_base);
      sample(scheme, backend, schedule, nodes_tiny, model, x_tiny);
      REQUIRE(x_tiny.allFinite());
      const double diff = diffgrad::testing::relative_error<double>(x_tiny, x_base);
      INFO("order " << order << ", relative change " << diff);
      CHECK(diff < 1e-3);
    }
}

// =======================================================================================
// Errors
// =======================================================================================

TEST_CASE("DpmSolverMultistep rejects an unsupported order", "[dpm][multistep][errors]") {
  CHECK_THROWS_WITH(DpmSolverMultistep(4, SolverPrediction::data),
                    Catch::Contains("DpmSolverMultistep") && Catch::Contains("'order'") &&
                        Catch::Contains("1, 2 or 3") && Catch::Contains("got 4"));
  CHECK_THROWS_AS(DpmSolverMultistep(0, SolverPrediction::noise), diffgrad::invalid_argument);
  CHECK_THROWS_AS(
      DpmSolverMultistep::diffusers({5, DpmAlgorithm::dpmsolver_pp, DpmSolverType::midpoint}),
      diffgrad::invalid_argument);
}

TEST_CASE("DpmSolverMultistep rejects bad options", "[dpm][multistep][errors]") {
  CHECK_THROWS_WITH(DpmSolverMultistep(2, SolverPrediction::data, static_cast<DpmSolverType>(9)),
                    Catch::Contains("solver_type"));
  DpmSolverMultistep::Options o;
  o.lower_order_final_max_steps = -1;
  CHECK_THROWS_WITH(DpmSolverMultistep(o), Catch::Contains("lower_order_final_max_steps"));
  CHECK_THROWS_WITH(
      DpmSolverMultistep::diffusers({2, DpmAlgorithm::sde_dpmsolver_pp, DpmSolverType::midpoint}),
      Catch::Contains("algorithm_type") && Catch::Contains("SdeDpmSolver"));
  // A grid running the wrong way (lambda decreasing) is rejected before any model call.
  const VPLinearSchedule schedule;
  std::vector<Node> nodes{schedule.node(0.1), schedule.node(0.5)};
  CHECK_THROWS_WITH(DpmSolverMultistep().validate(nodes), Catch::Contains("nodes"));
}
