// Singlestep DPM-Solver / DPM-Solver++ (official intermediate points and diffusers' grid-node
// structure), and the scalar coefficients of coeffs/dpm_solver.hpp they are built from.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include "diffgrad/coeffs/dpm_solver.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/dpm_solver_singlestep.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using coeffs::dpm::Integrand;
using diffgrad::testing::fitted_order;

namespace {

// ---------------------------------------------------------------------------------------
// Independent references for the coefficients: the defining integrals, by composite Simpson
// in long double. With tau = lambda - lambda_s in [0, h], the update adds
//   ODE noise:  -alpha_t e^{-lambda_s} int e^{-tau} m(tau) dtau
//   ODE data:    sigma_t e^{lambda_s}  int e^{tau}  m(tau) dtau
//   SDE noise:  twice the ODE noise integral
//   SDE data:    2 alpha_t int e^{-2 (h - tau)} m(tau) dtau
// (the first two are the variation-of-constants formulas of the DPM-Solver(++) papers; the
// SDE data one has the closed form alpha_t (1 - e^{-2h}) for m = 1, checked below).
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

const Integrand kAllIntegrands[] = {Integrand::ode_noise, Integrand::ode_data, Integrand::sde_noise,
                                    Integrand::sde_data};

// ---------------------------------------------------------------------------------------
// Convergence on the Gaussian problem. The error measure is the largest relative error over
// the grid nodes (against the exact flow at each node), not the final error alone: on this
// problem the leading global error term of the final state is an integral of a derivative
// of a sigmoid in lambda and nearly cancels, which makes final-time slopes drift towards 4.
// Node errors along the way show the order cleanly. `stride` skips nodes that are not the
// end of an update (diffusers' singlestep groups).
template <class Scheme>
double trajectory_error(const Scheme& scheme, std::span<const Node> nodes, int stride = 1) {
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  const auto x_T = diffgrad::testing::test_batch<double>(4, 3);
  auto x = x_T;
  double worst = 0.0;
  sample(scheme, backend, schedule, nodes, model, x, SampleOptions{},
         [&](int step, int, const Node& n, const diffgrad::testing::State<double>& state) {
           if (step % stride != 0) return;
           const auto exact = model.exact_flow(x_T, nodes.front(), n);
           worst = std::max(worst, diffgrad::testing::relative_error<double>(state, exact));
         });
  return worst;
}

std::vector<Node> lambda_grid(int n) {
  const VPLinearSchedule schedule;
  return make_nodes(schedule, uniform_lambda_grid(schedule, n, 1.0, 1e-3));
}

template <class Scheme>
std::vector<double> global_errors(const Scheme& scheme, const std::vector<int>& steps,
                                  int stride = 1) {
  std::vector<double> errors;
  for (int n : steps) errors.push_back(trajectory_error(scheme, lambda_grid(n), stride));
  return errors;
}

void check_order(const std::vector<int>& steps, const std::vector<double>& errors,
                 double expected) {
  const double order = fitted_order(steps, errors);
  INFO("errors " << errors.front() << " ... " << errors.back() << ", fitted order " << order);
  CHECK(order == Approx(expected).margin(0.2));
  CHECK(errors.back() > 1e-13); // still above rounding: the fit measures truncation error
}

} // namespace

// =======================================================================================
// Coefficients
// =======================================================================================

TEST_CASE("Taylor weights equal the defining integrals of the Taylor terms", "[dpm][coeffs]") {
  // W_k is the contribution of m(tau) = tau^k / k! divided by h^k.
  const VPLinearSchedule schedule;
  const std::pair<double, double> steps[] = {{0.9, 0.7}, {0.5, 0.45}, {0.3, 0.01}, {1.0, 0.002}};
  for (auto [ts, tt] : steps) {
    const Node s = schedule.node(ts), t = schedule.node(tt);
    const long double h = static_cast<long double>(t.lambda) - s.lambda;
    for (Integrand f : kAllIntegrands) {
      const auto tw = coeffs::dpm::taylor_weights(f, s, t);
      for (int k = 0; k < 3; ++k) {
        const long double fact = k == 2 ? 2.0L : 1.0L;
        const long double ref =
            exact_contribution(
                f, s, t,
                [&](long double u) { return std::pow(u, static_cast<long double>(k)) / fact; }) /
            std::pow(h, static_cast<long double>(k));
        INFO("integrand " << static_cast<int>(f) << ", k = " << k << ", s = " << ts
                          << ", t = " << tt);
        CHECK(tw.w[k] == Approx(static_cast<double>(ref)).epsilon(1e-11));
      }
    }
    // The linear coefficient and the noise std, from their closed forms.
    const double hd = t.lambda - s.lambda;
    CHECK(coeffs::dpm::taylor_weights(Integrand::ode_noise, s, t).x ==
          Approx(t.alpha / s.alpha).epsilon(1e-15));
    CHECK(coeffs::dpm::taylor_weights(Integrand::ode_data, s, t).x ==
          Approx(t.sigma / s.sigma).epsilon(1e-15));
    CHECK(coeffs::dpm::taylor_weights(Integrand::sde_data, s, t).x ==
          Approx(t.sigma * t.sigma * s.alpha / (s.sigma * s.sigma * t.alpha)).epsilon(1e-13));
    CHECK(coeffs::dpm::taylor_weights(Integrand::sde_data, s, t).noise ==
          Approx(t.sigma * std::sqrt(1.0 - std::exp(-2.0 * hd))).epsilon(1e-13));
    CHECK(coeffs::dpm::taylor_weights(Integrand::sde_noise, s, t).noise ==
          Approx(t.sigma * std::sqrt(std::exp(2.0 * hd) - 1.0)).epsilon(1e-13));
  }
}

TEST_CASE("Taylor weights keep full precision as h -> 0", "[dpm][coeffs][hazard]") {
  // Reference: the Taylor series of W_k in h, written out independently in long double.
  // ODE noise: -sigma_t h phi_{k+1}(h), ODE data: alpha_t h phi_{k+1}(-h); phi_{k+1}(z) =
  // sum_n z^n / (n + k + 1)!.
  const VPLinearSchedule schedule;
  auto phi_series = [](int k, long double z) {
    long double sum = 0.0L, fact = 1.0L;
    for (int n = 1; n <= k + 1; ++n) fact *= n; // (k + 1)!
    long double term = 1.0L / fact;
    for (int n = 0; n < 30; ++n) {
      sum += term;
      term *= z / static_cast<long double>(n + k + 2);
    }
    return sum;
  };
  for (double dt : {1e-3, 1e-5, 1e-7, 1e-9, 1e-11}) {
    const Node s = schedule.node(0.5), t = schedule.node(0.5 - dt);
    const long double h = static_cast<long double>(t.lambda) - s.lambda;
    const auto wn = coeffs::dpm::taylor_weights(Integrand::ode_noise, s, t);
    const auto wd = coeffs::dpm::taylor_weights(Integrand::ode_data, s, t);
    for (int k = 0; k < 3; ++k) {
      INFO("dt = " << dt << ", k = " << k);
      const double ref_n = static_cast<double>(-t.sigma * h * phi_series(k, h));
      const double ref_d = static_cast<double>(t.alpha * h * phi_series(k, -h));
      CHECK(std::isfinite(wn.w[k]));
      CHECK(wn.w[k] == Approx(ref_n).epsilon(1e-9));
      CHECK(wd.w[k] == Approx(ref_d).epsilon(1e-9));
    }
  }
}

TEST_CASE("Taylor weights take their limits at a sigma = 0 node", "[dpm][coeffs][hazard]") {
  const VPLinearSchedule schedule;
  const Node s = schedule.node(0.05);
  const Node t = terminal_data_node(0.0, 0.0);
  for (Integrand f : kAllIntegrands) {
    const auto tw = coeffs::dpm::taylor_weights(f, s, t);
    INFO("integrand " << static_cast<int>(f));
    CHECK(std::isfinite(tw.x));
    CHECK(std::isfinite(tw.noise));
    for (double w : tw.w) CHECK(std::isfinite(w));
  }
  // Data forms: x_t = alpha_t x0 exactly (X = 0, W_0 = alpha_t = 1, no noise).
  for (Integrand f : {Integrand::ode_data, Integrand::sde_data}) {
    const auto tw = coeffs::dpm::taylor_weights(f, s, t);
    CHECK(tw.x == 0.0);
    CHECK(tw.w[0] == 1.0);
    CHECK(tw.noise == 0.0);
  }
  // Noise forms: alpha_t/alpha_s x - (alpha_t sigma_s/alpha_s) eps = x0 too (ODE); the SDE
  // one doubles the eps weight and its noise std tends to alpha_t sigma_s / alpha_s.
  const auto on = coeffs::dpm::taylor_weights(Integrand::ode_noise, s, t);
  CHECK(on.x == Approx(1.0 / s.alpha).epsilon(1e-15));
  CHECK(on.w[0] == Approx(-s.sigma / s.alpha).epsilon(1e-15));
  const auto sn = coeffs::dpm::taylor_weights(Integrand::sde_noise, s, t);
  CHECK(sn.w[0] == Approx(-2.0 * s.sigma / s.alpha).epsilon(1e-15));
  CHECK(sn.noise == Approx(s.sigma / s.alpha).epsilon(1e-15));
  // ... and a node with sigma = 1e-12 gives nearly the same X, W_0 and noise (continuity:
  // no jump at sigma = 0; W_1, W_2 approach their limits only like 1/h).
  const double tiny = 1e-12;
  const Node near{0.0, std::sqrt(1.0 - tiny * tiny), tiny, std::log(1.0 / tiny), 0.0};
  for (Integrand f : kAllIntegrands) {
    const auto lim = coeffs::dpm::taylor_weights(f, s, t);
    const auto fin = coeffs::dpm::taylor_weights(f, s, near);
    INFO("integrand " << static_cast<int>(f));
    CHECK(fin.x == Approx(lim.x).margin(1e-10));
    CHECK(fin.w[0] == Approx(lim.w[0]).margin(1e-10));
    CHECK(fin.noise == Approx(lim.noise).margin(1e-10));
  }
}

TEST_CASE("Singlestep updates are exact for model values polynomial in lambda up to order-1",
          "[dpm][coeffs]") {
  // Sample m at the update's own points and compare sum_j m_j weight_j with the integral.
  const VPLinearSchedule schedule;
  const Node s = schedule.node(0.7), t = schedule.node(0.4);
  const double h = t.lambda - s.lambda;
  auto poly = [](int degree) {
    return [degree](long double u) {
      long double v = 0.3L;
      if (degree >= 1) v += -1.1L * u;
      if (degree >= 2) v += 0.7L * u * u;
      return v;
    };
  };
  struct Case {
    int order;
    DpmSolverType type;
    double r1, r2;
    int exact_degree;
  };
  const Case cases[] = {{2, DpmSolverType::heun, 0.5, 0.0, 1},
                        {2, DpmSolverType::heun, 0.3, 0.0, 1},
                        {2, DpmSolverType::midpoint, 0.5, 0.0, 0},
                        {3, DpmSolverType::heun, 1.0 / 3.0, 2.0 / 3.0, 2},
                        {3, DpmSolverType::heun, 0.2, 0.9, 2},
                        {3, DpmSolverType::midpoint, 1.0 / 3.0, 2.0 / 3.0, 1}};
  for (Integrand f : kAllIntegrands)
    for (const auto& c : cases)
      for (int degree = 0; degree <= c.exact_degree; ++degree) {
        const auto m = poly(degree);
        const auto u = coeffs::dpm::singlestep_update(f, c.order, c.type, s, t, c.r1, c.r2);
        const double got =
            static_cast<double>(u.m[0] * m(0.0L) + u.m[1] * m(c.r1 * h) + u.m[2] * m(c.r2 * h));
        const double ref = static_cast<double>(exact_contribution(f, s, t, m));
        INFO("integrand " << static_cast<int>(f) << ", order " << c.order << ", r1 = " << c.r1
                          << ", degree " << degree);
        CHECK(got == Approx(ref).epsilon(1e-11));
      }
}

TEST_CASE("Singlestep second stage of DPM-Solver-3 is exact for linear model values",
          "[dpm][coeffs]") {
  const VPLinearSchedule schedule;
  const Node s = schedule.node(0.7), t = schedule.node(0.4);
  const double h = t.lambda - s.lambda, r1 = 1.0 / 3.0, r2 = 2.0 / 3.0;
  const Node s2 = schedule.node(schedule.t_of_lambda(s.lambda + r2 * h));
  auto m = [](long double u) { return 0.3L - 1.1L * u; };
  for (Integrand f : kAllIntegrands) {
    const auto u = coeffs::dpm::singlestep_third_order_stage2(f, s, s2, r1, r2);
    const double got = static_cast<double>(u.m[0] * m(0.0L) + u.m[1] * m(r1 * h));
    CHECK(got == Approx(static_cast<double>(exact_contribution(f, s, s2, m))).epsilon(1e-10));
  }
}

// =======================================================================================
// Convergence orders (float64, Gaussian data, VP linear, t = 1 -> 1e-3)
// =======================================================================================

TEST_CASE("Singlestep DPM-Solver(++) has its theoretical order", "[dpm][singlestep][order]") {
  // Uniform-lambda grids, t = 1 -> 1e-3 (uniform-t grids with t_end = 1e-3 are not in the
  // asymptotic regime below N ~ 1e3: their last lambda step stays O(1)).
  const std::vector<int> steps{24, 48, 96, 192, 384};
  for (SolverPrediction pred : {SolverPrediction::noise, SolverPrediction::data})
    for (int order : {1, 2, 3})
      for (auto type : {DpmSolverType::midpoint, DpmSolverType::heun}) {
        INFO("order " << order << (type == DpmSolverType::heun ? " taylor" : " dpmsolver")
                      << (pred == SolverPrediction::data ? " data" : " noise"));
        check_order(steps, global_errors(DpmSolverSinglestep(order, pred, type), steps), order);
      }
}

TEST_CASE("Singlestep with per-step orders (DPM-Solver-fast mix) converges",
          "[dpm][singlestep][order]") {
  // A budget of 3K + 1 model calls: K third-order steps and one first-order final step. That
  // DDIM step is as long as the others, so its O(h^2) local error makes the mix globally
  // second order (the official recipe trades order for using every model call).
  for (SolverPrediction pred : {SolverPrediction::noise, SolverPrediction::data}) {
    const std::vector<int> intervals{24, 48, 96, 192, 384};
    std::vector<double> errors;
    for (int k : intervals) {
      DpmSolverSinglestep::Options o;
      o.order = 3;
      o.prediction = pred;
      o.orders = DpmSolverSinglestep::official_fast_orders(3 * (k - 1) + 1, 3);
      REQUIRE(o.orders.size() == static_cast<std::size_t>(k));
      errors.push_back(trajectory_error(DpmSolverSinglestep(o), lambda_grid(k)));
    }
    check_order(intervals, errors, 2.0);
  }
}

TEST_CASE("diffusers-structured singlestep has the order of its groups",
          "[dpm][singlestep][diffusers][order]") {
  // Each group of k grid intervals is one k-th order singlestep update whose intermediate
  // points are grid nodes (r = 1/2, or 1/3 and 2/3, on a uniform-lambda grid, so the midpoint
  // third-order type is DPM-Solver-3). Errors are read at group ends.
  const std::vector<int> steps{24, 48, 96, 192, 384};
  for (auto algo : {DpmAlgorithm::dpmsolver, DpmAlgorithm::dpmsolver_pp})
    for (auto type : {DpmSolverType::midpoint, DpmSolverType::heun})
      for (int order : {2, 3}) {
        const auto scheme = DpmSolverSinglestep::diffusers({order, algo, type, false});
        INFO("order " << order << (type == DpmSolverType::heun ? " heun" : " midpoint")
                      << (algo == DpmAlgorithm::dpmsolver ? " dpmsolver" : " dpmsolver++"));
        check_order(steps, global_errors(scheme, steps, order), order);
      }
}

TEST_CASE("Singlestep float32 stays within its documented tolerance",
          "[dpm][singlestep][float32]") {
  // Documented tolerance: relative 1e-5 (float32 rounding of O(1) states, ~N * 2^-24 * |x| = 4e-6
  // for N = 60, with the intermediate stages) on top of the float64 truncation error.
  const VPLinearSchedule schedule;
  const auto nodes = lambda_grid(60);
  auto model64 = diffgrad::testing::gaussian_problem<double>(3);
  auto model32 = diffgrad::testing::gaussian_problem<float>(3);
  const auto x_T = diffgrad::testing::test_batch<double>(4, 3);
  const auto exact = model64.exact_flow(x_T, nodes.front(), nodes.back());
  for (int order : {1, 2, 3})
    for (SolverPrediction pred : {SolverPrediction::noise, SolverPrediction::data}) {
      const DpmSolverSinglestep scheme(order, pred);
      auto x64 = x_T;
      diffgrad::testing::State<float> x32 = x_T.cast<float>();
      sample(scheme, EigenBackend<double>(), schedule, nodes, model64, x64);
      sample(scheme, EigenBackend<float>(), schedule, nodes, model32, x32);
      const double err64 = diffgrad::testing::relative_error<double>(x64, exact);
      const auto x32d = diffgrad::testing::State<double>(x32.cast<double>());
      const double err32 = diffgrad::testing::relative_error<double>(x32d, exact);
      INFO("order " << order << ", float64 error " << err64 << ", float32 error " << err32);
      CHECK(err32 <= err64 + 1e-5);
      CHECK(diffgrad::testing::relative_error<double>(x32d, x64) < 1e-5);
    }
}

TEST_CASE("DPM-Solver-1 (noise) is DDIM", "[dpm][singlestep]") {
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  const std::vector<double> grid{1.0, 0.9, 0.31, 0.3, 0.05, 0.002};
  const auto nodes = make_nodes(schedule, grid);
  auto x_ddim = diffgrad::testing::test_batch<double>(4, 3);
  auto x_dpm = x_ddim;
  sample(Ddim(), backend, schedule, nodes, model, x_ddim);
  sample(DpmSolverSinglestep(1, SolverPrediction::noise), backend, schedule, nodes, model, x_dpm);
  CHECK(diffgrad::testing::relative_error<double>(x_dpm, x_ddim) <= 1e-14);
}

// =======================================================================================
// Order lists
// =======================================================================================

TEST_CASE("official_fast_orders follows the official DPM-Solver-fast rule", "[dpm][singlestep]") {
  // Literal lists from get_orders_and_timesteps_for_singlestep_solver.
  using V = std::vector<int>;
  CHECK(DpmSolverSinglestep::official_fast_orders(9, 3) == V{3, 3, 2, 1});
  CHECK(DpmSolverSinglestep::official_fast_orders(10, 3) == V{3, 3, 3, 1});
  CHECK(DpmSolverSinglestep::official_fast_orders(11, 3) == V{3, 3, 3, 2});
  CHECK(DpmSolverSinglestep::official_fast_orders(6, 2) == V{2, 2, 2});
  CHECK(DpmSolverSinglestep::official_fast_orders(7, 2) == V{2, 2, 2, 1});
  CHECK(DpmSolverSinglestep::official_fast_orders(3, 1) == V{1, 1, 1});
}

TEST_CASE("diffusers singlestep order list matches get_order_list",
          "[dpm][singlestep][diffusers]") {
  // Literal lists from diffusers 0.42 DPMSolverSinglestepScheduler.get_order_list, with
  // set_timesteps forcing lower_order_final for an uneven step count or final sigma zero.
  const VPLinearSchedule schedule;
  auto orders = [&](int solver_order, bool lower_final, int n, bool zero) {
    auto nodes = make_nodes(schedule, uniform_t_grid(schedule, n, 1.0, 1e-3));
    if (zero) nodes.back() = terminal_data_node(0.0, 0.0);
    const auto s = DpmSolverSinglestep::diffusers(
        {solver_order, DpmAlgorithm::dpmsolver_pp, DpmSolverType::midpoint, lower_final});
    std::vector<int> out;
    for (int i = 0; i < n; ++i) out.push_back(s.step_order(nodes, i));
    return out;
  };
  using V = std::vector<int>;
  CHECK(orders(3, false, 6, false) == V{1, 2, 3, 1, 2, 3});
  CHECK(orders(3, true, 6, false) == V{1, 2, 3, 1, 2, 1});
  CHECK(orders(3, false, 7, false) == V{1, 2, 3, 1, 2, 3, 1}); // forced lower_order_final
  CHECK(orders(3, false, 8, false) == V{1, 2, 3, 1, 2, 3, 1, 2});
  CHECK(orders(3, false, 6, true) == V{1, 2, 3, 1, 2, 1});       // "zero" forces it too
  CHECK(orders(3, false, 8, true) == V{1, 2, 3, 1, 2, 3, 1, 1}); // and orders[-1] = 1
  CHECK(orders(2, false, 6, false) == V{1, 2, 1, 2, 1, 2});
  CHECK(orders(2, true, 6, false) == V{1, 2, 1, 2, 1, 1});
  CHECK(orders(2, false, 5, false) == V{1, 2, 1, 2, 1});
  CHECK(orders(1, false, 3, true) == V{1, 1, 1});
}

TEST_CASE("DpmSolverSinglestep::diffusers reproduces diffusers' formulas step by step",
          "[dpm][singlestep][diffusers]") {
  // Transcriptions of DPMSolverSinglestepScheduler's updates (diffusers 0.42, float64) on an
  // irregular grid; x0 = (x - sigma eps)/alpha as in convert_model_output. Scalar stand-ins
  // for the vectors: the state and eps at node i (x, e) and at nodes i-1, i-2 (hx, he).
  const VPLinearSchedule schedule;
  const auto nodes = make_nodes(schedule, std::vector<double>{0.95, 0.8, 0.62, 0.5, 0.33, 0.3});
  struct Vectors {
    double x, e, hx[2], he[2];
  } v{0.37, -1.21, {0.52, 0.81}, {-0.93, 0.44}};
  auto eval = [&](const Combo& c) {
    return c.x * v.x + c.e[0] * v.e + c.hist_x[0] * v.hx[0] + c.hist_e[0] * v.he[0] +
           c.hist_x[1] * v.hx[1] + c.hist_e[1] * v.he[1];
  };
  const auto E = [](double z) { return std::exp(z); };
  for (auto algo :
       {DpmAlgorithm::dpmsolver, DpmAlgorithm::dpmsolver_pp, DpmAlgorithm::sde_dpmsolver_pp})
    for (auto type : {DpmSolverType::midpoint, DpmSolverType::heun})
      for (int order : {2, 3}) {
        const auto scheme = DpmSolverSinglestep::diffusers({order, algo, type, false});
        const int i = order - 1; // the order-k step of the first group (start node 0)
        REQUIRE(scheme.step_order(nodes, i) == order);
        const StepPlan p = scheme.plan(nodes, i, NodeAtLambda(schedule));
        const bool data = algo != DpmAlgorithm::dpmsolver;
        auto conv = [&](double x, double e, const Node& n) {
          return data ? (x - n.sigma * e) / n.alpha : e;
        };
        const Node& nt = nodes[static_cast<std::size_t>(i) + 1];
        const double at = nt.alpha, st = nt.sigma;
        double expected = 0.0, noise = 0.0;
        if (order == 2) {
          const Node &n0 = nodes[1], &n1 = nodes[0];
          const double m0 = conv(v.x, v.e, n0), m1 = conv(v.hx[0], v.he[0], n1);
          const double sample = v.hx[0];
          const double h = nt.lambda - n1.lambda, h_0 = n0.lambda - n1.lambda, r0 = h_0 / h;
          const double D0 = m1, D1 = (1.0 / r0) * (m0 - m1);
          const bool mid = type == DpmSolverType::midpoint;
          if (algo == DpmAlgorithm::dpmsolver_pp)
            expected = (st / n1.sigma) * sample - (at * (E(-h) - 1.0)) * D0 +
                       (mid ? -0.5 * (at * (E(-h) - 1.0)) : at * ((E(-h) - 1.0) / h + 1.0)) * D1;
          else if (algo == DpmAlgorithm::dpmsolver)
            expected = (at / n1.alpha) * sample - (st * (E(h) - 1.0)) * D0 -
                       (mid ? 0.5 * (st * (E(h) - 1.0)) : st * ((E(h) - 1.0) / h - 1.0)) * D1;
          else {
            expected = (st / n1.sigma * E(-h)) * sample + (at * (1 - E(-2.0 * h))) * D0 +
                       (mid ? 0.5 * (at * (1 - E(-2.0 * h)))
                            : at * ((1.0 - E(-2.0 * h)) / (-2.0 * h) + 1.0)) *
                           D1;
            noise = st * std::sqrt(1.0 - E(-2 * h));
          }
        } else {
          const Node &n0 = nodes[2], &n1 = nodes[1], &n2 = nodes[0];
          const double m0 = conv(v.x, v.e, n0), m1 = conv(v.hx[0], v.he[0], n1),
                       m2 = conv(v.hx[1], v.he[1], n2);
          const double sample = v.hx[1];
          const double h = nt.lambda - n2.lambda, h_0 = n0.lambda - n2.lambda,
                       h_1 = n1.lambda - n2.lambda;
          const double r0 = h_0 / h, r1 = h_1 / h;
          const double D0 = m2;
          const double D1_0 = (1.0 / r1) * (m1 - m2), D1_1 = (1.0 / r0) * (m0 - m2);
          const double D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1);
          const double D2 = 2.0 * (D1_1 - D1_0) / (r0 - r1);
          const bool mid = type == DpmSolverType::midpoint;
          if (algo == DpmAlgorithm::dpmsolver_pp)
            expected = mid ? (st / n2.sigma) * sample - (at * (E(-h) - 1.0)) * D0 +
                                 (at * ((E(-h) - 1.0) / h + 1.0)) * D1_1
                           : (st / n2.sigma) * sample - (at * (E(-h) - 1.0)) * D0 +
                                 (at * ((E(-h) - 1.0) / h + 1.0)) * D1 -
                                 (at * ((E(-h) - 1.0 + h) / (h * h) - 0.5)) * D2;
          else if (algo == DpmAlgorithm::dpmsolver)
            expected = mid ? (at / n2.alpha) * sample - (st * (E(h) - 1.0)) * D0 -
                                 (st * ((E(h) - 1.0) / h - 1.0)) * D1_1
                           : (at / n2.alpha) * sample - (st * (E(h) - 1.0)) * D0 -
                                 (st * ((E(h) - 1.0) / h - 1.0)) * D1 -
                                 (st * ((E(h) - 1.0 - h) / (h * h) - 0.5)) * D2;
          else {
            expected =
                mid ? (st / n2.sigma * E(-h)) * sample + (at * (1.0 - E(-2.0 * h))) * D0 +
                          (at * ((1.0 - E(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1_1
                    : (st / n2.sigma * E(-h)) * sample + (at * (1.0 - E(-2.0 * h))) * D0 +
                          (at * ((1.0 - E(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1 +
                          (at * ((1.0 - E(-2.0 * h) + (-2.0 * h)) / std::pow(-2.0 * h, 2) - 0.5)) *
                              D2;
            noise = st * std::sqrt(1.0 - E(-2 * h));
          }
        }
        INFO("algorithm " << static_cast<int>(algo) << ", order " << order
                          << (type == DpmSolverType::heun ? " heun" : " midpoint"));
        CHECK(eval(p.output) == Approx(expected).epsilon(1e-12));
        CHECK(p.noise == Approx(noise).margin(1e-15).epsilon(1e-12));
        // The update restarts from the group's first state: x_i itself enters only through
        // the data prediction m(x_i) (never for noise prediction).
        if (!data) CHECK(p.output.x == 0.0);
      }
}

// =======================================================================================
// Hazards
// =======================================================================================

TEST_CASE("Singlestep into a sigma = 0 node: data forms land on x0, noise forms stay finite",
          "[dpm][singlestep][hazard]") {
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  std::vector<Node> nodes = make_nodes(schedule, uniform_lambda_grid(schedule, 12, 1.0, 0.02));
  nodes.back() = terminal_data_node(0.0, 0.0);
  std::vector<std::pair<const char*, DpmSolverSinglestep>> schemes;
  for (int order : {1, 2, 3})
    for (auto pred : {SolverPrediction::noise, SolverPrediction::data})
      schemes.emplace_back("official", DpmSolverSinglestep(order, pred));
  for (int order : {1, 2, 3})
    for (auto algo : {DpmAlgorithm::dpmsolver, DpmAlgorithm::dpmsolver_pp})
      schemes.emplace_back(
          "diffusers", DpmSolverSinglestep::diffusers({order, algo, DpmSolverType::heun, false}));
  for (auto& [name, scheme] : schemes) {
    // The last step starts from the state the scheme reaches at node N-1 (captured).
    const int n = static_cast<int>(nodes.size()) - 1;
    diffgrad::testing::State<double> x_prev;
    auto x = diffgrad::testing::test_batch<double>(4, 3);
    sample(scheme, backend, schedule, nodes, model, x, SampleOptions{},
           [&](int step, int, const Node&, const diffgrad::testing::State<double>& state) {
             if (step == n - 1) x_prev = state;
           });
    REQUIRE(x.allFinite());
    const Node& s = nodes[nodes.size() - 2];
    diffgrad::testing::State<double> eps(4, 3);
    model.eps(x_prev, s, eps);
    const diffgrad::testing::State<double> x0 = (x_prev - s.sigma * eps) / s.alpha;
    INFO(name << " order " << scheme.options().order);
    CHECK(scheme.step_order(nodes, static_cast<int>(nodes.size()) - 2) == 1);
    CHECK(diffgrad::testing::relative_error<double>(x, x0) < 1e-14);
  }
}

TEST_CASE("Singlestep survives a vanishing step h -> 0", "[dpm][singlestep][hazard]") {
  // One extra interval of 1e-12 in t: its coefficients use the phi series, and the result is
  // the result without that interval up to the size of the step (no 0/0, no cancellation).
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  const auto base = uniform_lambda_grid(schedule, 40, 1.0, 1e-3);
  std::vector<double> with_tiny = base;
  with_tiny.insert(with_tiny.begin() + 20, base[20] + 1e-12);
  const auto nodes_base = make_nodes(schedule, base);
  const auto nodes_tiny = make_nodes(schedule, with_tiny);
  for (int order : {1, 2, 3})
    for (auto pred : {SolverPrediction::noise, SolverPrediction::data}) {
      const DpmSolverSinglestep scheme(order, pred, DpmSolverType::heun);
      auto x_base = diffgrad::testing::test_batch<double>(4, 3);
      auto x_tiny = x_base;
      sample(scheme, backend, schedule, nodes_base, model, x_base);
      sample(scheme, backend, schedule, nodes_tiny, model, x_tiny);
      REQUIRE(x_tiny.allFinite());
      INFO("order " << order);
      CHECK(diffgrad::testing::relative_error<double>(x_tiny, x_base) < 1e-10);
    }
}

// =======================================================================================
// Errors
// =======================================================================================

TEST_CASE("DpmSolverSinglestep rejects an unsupported order", "[dpm][singlestep][errors]") {
  CHECK_THROWS_WITH(DpmSolverSinglestep(4, SolverPrediction::data),
                    Catch::Contains("order") && Catch::Contains("1, 2 or 3") &&
                        Catch::Contains("got 4"));
  CHECK_THROWS_AS(DpmSolverSinglestep(0, SolverPrediction::noise), diffgrad::invalid_argument);
  DpmSolverSinglestep::Options o;
  o.orders = {3, 3, 5};
  CHECK_THROWS_WITH(DpmSolverSinglestep(o), Catch::Contains("orders[i]"));
  CHECK_THROWS_AS(DpmSolverSinglestep::diffusers(
                      {4, DpmAlgorithm::dpmsolver_pp, DpmSolverType::midpoint, false}),
                  diffgrad::invalid_argument);
}

TEST_CASE("DpmSolverSinglestep rejects bad intermediate points r", "[dpm][singlestep][errors]") {
  DpmSolverSinglestep::Options o;
  o.order = 2;
  o.r1 = 0.0;
  CHECK_THROWS_WITH(DpmSolverSinglestep(o), Catch::Contains("'r1'") && Catch::Contains("0 < r1"));
  o.r1 = 1.5;
  CHECK_THROWS_AS(DpmSolverSinglestep(o), diffgrad::invalid_argument);
  o.order = 3;
  o.r1 = 0.7; // r2 defaults to 2/3 < r1
  CHECK_THROWS_WITH(DpmSolverSinglestep(o), Catch::Contains("'r1'") && Catch::Contains("r1 < r2"));
  o.r1 = 0.5;
  o.r2 = 1.2;
  CHECK_THROWS_WITH(DpmSolverSinglestep(o), Catch::Contains("'r2'"));
  o.order = 2;
  o.r2 = 0.8; // r2 means nothing for a second-order solver: say so rather than ignore it
  CHECK_THROWS_WITH(DpmSolverSinglestep(o), Catch::Contains("'r2'"));
}

TEST_CASE("DpmSolverSinglestep rejects bad options", "[dpm][singlestep][errors]") {
  CHECK_THROWS_WITH(DpmSolverSinglestep(2, SolverPrediction::data, static_cast<DpmSolverType>(7)),
                    Catch::Contains("solver_type"));
  CHECK_THROWS_WITH(DpmSolverSinglestep::diffusers(
                        {2, DpmAlgorithm::sde_dpmsolver, DpmSolverType::midpoint, false}),
                    Catch::Contains("algorithm_type") && Catch::Contains("sde-dpmsolver"));
  // A per-step order list must match the grid.
  DpmSolverSinglestep::Options o;
  o.orders = {2, 2};
  const VPLinearSchedule schedule;
  const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, 3, 1.0, 1e-3));
  CHECK_THROWS_WITH(DpmSolverSinglestep(o).validate(nodes),
                    Catch::Contains("nodes") && Catch::Contains("got 3"));
}
