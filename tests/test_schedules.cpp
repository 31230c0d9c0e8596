// Schedules: every schedule is checked against its definition, never against itself.
//   - t_of_lambda inverts lambda;
//   - f = d log alpha/dt and g^2 = d sigma^2/dt - 2 f sigma^2 (= -2 sigma^2 d lambda/dt), by
//     central differences of the public alpha/sigma/lambda;
//   - lambda is strictly decreasing; node(t) agrees with the scalar functions;
//   - alpha and sigma keep full relative precision as t -> 0 (references in long double from
//     series that do not cancel);
//   - the discrete schedules reproduce their table at t = (k + 1)/N, with betas recomputed
//     here from diffusers' definitions, and feed the model the documented time value.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numbers>
#include <string>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/concepts/schedule.hpp"
#include "diffgrad/schedule/discrete.hpp"
#include "diffgrad/schedule/edm.hpp"
#include "diffgrad/schedule/sub_vp.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/ve.hpp"
#include "diffgrad/schedule/vp_cosine.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/deis.hpp"
#include "diffgrad/solvers/dpm_solver_singlestep.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "test_support.hpp"
#if __has_include("diffgrad/solvers/dpm_solver_multistep.hpp")
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#define DIFFGRAD_TEST_HAS_DPM_MULTISTEP 1
#endif
#if __has_include("diffgrad/solvers/sde_dpm_solver.hpp")
#include "diffgrad/solvers/sde_dpm_solver.hpp"
#define DIFFGRAD_TEST_HAS_SDE_DPM 1
#endif

using namespace diffgrad;

static_assert(Schedule<VPLinearSchedule>);
static_assert(Schedule<VPCosineSchedule>);
static_assert(Schedule<DiscreteSchedule>);
static_assert(Schedule<VESchedule>);
static_assert(Schedule<SubVPSchedule>);
static_assert(Schedule<EDMSchedule>);

namespace {

std::vector<double> linspace(double a, double b, int n) {
  std::vector<double> v(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = a + (b - a) * i / (n - 1);
  v.back() = b;
  return v;
}

/// |a - b| <= rel * max(|a|, |b|) + abs.
bool close(double a, double b, double rel, double abs = 0.0) {
  return std::abs(a - b) <= rel * std::max(std::abs(a), std::abs(b)) + abs;
}

/// Central differences of the public functions at t with step h.
template <class S> struct Derivatives { double dlog_alpha, dsigma2, dlambda; };
/// Five-point central differences (error O(h^4)): the plain three-point rule is too coarse
/// near the cosine schedule's pole of f and near sigma -> 0, where lambda is steep.
template <class S> Derivatives<S> central_differences(const S& s, double t, double h) {
  const auto d = [&](auto fn) {
    return (-fn(t + 2 * h) + 8 * fn(t + h) - 8 * fn(t - h) + fn(t - 2 * h)) / (12 * h);
  };
  return {d([&](double u) { return std::log(s.alpha(u)); }),
          d([&](double u) { return s.sigma(u) * s.sigma(u); }),
          d([&](double u) { return s.lambda(u); })};
}

/// The checks every schedule must pass. `probe_times` are where derivatives are compared
/// (away from kinks for the piecewise-linear discrete schedule), `h` the difference step.
template <class S>
void check_schedule_identities(const std::string& name, const S& s,
                               const std::vector<double>& probe_times, double h) {
  INFO("schedule " << name);
  REQUIRE(s.t_min() < s.t_max());

  // t_of_lambda(lambda(t)) == t over the whole domain, endpoints included.
  for (double t : linspace(s.t_min(), s.t_max(), 401)) {
    INFO("t = " << t << ", lambda = " << s.lambda(t));
    CHECK(close(s.t_of_lambda(s.lambda(t)), t, 1e-10, 1e-13));
  }

  // lambda strictly decreasing on a fine grid.
  const auto fine = linspace(s.t_min(), s.t_max(), 20001);
  int non_decreasing = 0;
  for (std::size_t i = 1; i < fine.size(); ++i)
    if (!(s.lambda(fine[i]) < s.lambda(fine[i - 1]))) ++non_decreasing;
  CHECK(non_decreasing == 0);

  // f and g^2 against central differences of alpha, sigma and lambda.
  for (double t : probe_times) {
    const auto d = central_differences(s, t, h);
    const double sigma2 = s.sigma(t) * s.sigma(t);
    INFO("t = " << t << ": f = " << s.f(t) << " vs " << d.dlog_alpha << ", g2 = " << s.g2(t)
                << " vs " << d.dsigma2 - 2 * d.dlog_alpha * sigma2);
    CHECK(close(s.f(t), d.dlog_alpha, 1e-6, 1e-9));
    CHECK(close(s.g2(t), d.dsigma2 - 2.0 * d.dlog_alpha * sigma2, 1e-6, 1e-9));
    CHECK(close(s.g2(t), -2.0 * sigma2 * d.dlambda, 1e-6, 1e-9));
  }

  // node(t) is the scalar functions evaluated once, and lambda = log(alpha/sigma).
  for (double t : linspace(s.t_min(), s.t_max(), 17)) {
    const Node n = s.node(t);
    CHECK(n.t == t);
    CHECK(close(n.alpha, s.alpha(t), 1e-15));
    CHECK(close(n.sigma, s.sigma(t), 1e-15));
    CHECK(close(n.lambda, s.lambda(t), 1e-14, 1e-15));
    CHECK(close(n.lambda, std::log(n.alpha / n.sigma), 1e-13, 1e-14));
    CHECK(n.model_t == s.model_time(t));
  }
}

/// Interior points of [t_min, t_max], h away from both ends.
std::vector<double> interior(double lo, double hi, double h, int n) {
  return linspace(lo + 2 * h, hi - 2 * h, n);
}

} // namespace

TEST_CASE("VP linear: identities and the closed-form inverse", "[schedule][vp]") {
  const VPLinearSchedule s; // b0 = 0.1, b1 = 20, t in [1e-3, 1]
  check_schedule_identities("VPLinear", s, interior(s.t_min(), s.t_max(), 1e-5, 25), 1e-5);
  for (double t : linspace(1e-3, 1.0, 11)) {
    const double log_alpha = -(20.0 - 0.1) * t * t / 4.0 - 0.1 * t / 2.0;
    CHECK(close(s.alpha(t), std::exp(log_alpha), 1e-15));
    CHECK(close(s.sigma(t), std::sqrt(1.0 - std::exp(2 * log_alpha)), 1e-12));
    CHECK(close(s.f(t), -0.5 * (0.1 + (20.0 - 0.1) * t), 1e-15));
    CHECK(close(s.g2(t), 0.1 + (20.0 - 0.1) * t, 1e-15));
    // docs/math.md's inverse: L = 0.5 log(1 + e^{-2 lambda}), t = 4L/(b0 + sqrt(b0^2 + 4(b1-b0)L)).
    const double lambda = s.lambda(t);
    const double L = 0.5 * std::log(1.0 + std::exp(-2.0 * lambda));
    CHECK(close(s.t_of_lambda(lambda), 4 * L / (0.1 + std::sqrt(0.01 + 4 * (20.0 - 0.1) * L)),
                1e-12));
  }
}

TEST_CASE("VP cosine: identities and the Nichol-Dhariwal definition", "[schedule][vp]") {
  const VPCosineSchedule s; // s = 0.008, t in [1e-3, 0.9946]
  check_schedule_identities("VPCosine", s, interior(s.t_min(), s.t_max(), 1e-5, 25), 1e-5);
  const double off = 0.008;
  for (double t : linspace(0.05, 0.99, 11)) {
    const double alpha = std::cos((t + off) / (1 + off) * std::numbers::pi / 2) /
                         std::cos(off / (1 + off) * std::numbers::pi / 2);
    CHECK(close(s.alpha(t), alpha, 1e-13));
  }
  // The default end time T = 0.9946 of the official DPM-Solver code: alpha_T = sin(pi/2 (1 - T)/(1
  // + s)) / cos(pi/2 s/(1 + s)) = 0.00841, lambda_T = -4.78.
  CHECK(s.alpha(s.t_max()) == Approx(std::sin(std::numbers::pi / 2 * (1 - 0.9946) / 1.008) /
                                     std::cos(std::numbers::pi / 2 * off / 1.008))
                                  .epsilon(1e-12));
  CHECK(s.lambda(s.t_max()) == Approx(-4.778).margin(1e-3));
}

TEST_CASE("Discrete schedules: identities for every beta schedule and time input",
          "[schedule][discrete]") {
  const int N = 1000;
  for (auto kind :
       {BetaSchedule::linear, BetaSchedule::scaled_linear, BetaSchedule::squaredcos_cap_v2}) {
    for (auto input : {DiscreteTimeInput::dpm_solver_official, DiscreteTimeInput::timestep_index}) {
      const auto s = DiscreteSchedule::from_beta_schedule(kind, N, 1e-4, 0.02, input);
      const std::string name = "Discrete(kind " + std::to_string(static_cast<int>(kind)) +
                               ", input " + std::to_string(static_cast<int>(input)) + ")";
      // log alpha is piecewise linear between nodes: probe segment midpoints, h inside.
      std::vector<double> mids;
      for (int k = 0; k + 1 < N; k += 37) mids.push_back((k + 1.5) / N);
      check_schedule_identities(name, s, mids, 0.01 / N);
    }
  }
}

TEST_CASE("VE, sub-VP and EDM: identities and definitions", "[schedule]") {
  const VESchedule ve; // sigma in [0.01, 50], t in [1e-5, 1]
  check_schedule_identities("VE", ve, interior(ve.t_min(), ve.t_max(), 1e-5, 25), 1e-5);
  for (double t : linspace(1e-5, 1.0, 7)) {
    CHECK(ve.alpha(t) == 1.0);
    CHECK(close(ve.sigma(t), 0.01 * std::pow(50.0 / 0.01, t), 1e-13));
  }

  const SubVPSchedule sub; // alpha of VP linear, sigma = 1 - alpha^2
  check_schedule_identities("SubVP", sub, interior(sub.t_min(), sub.t_max(), 1e-5, 25), 1e-5);
  const VPLinearSchedule vp;
  for (double t : linspace(1e-3, 1.0, 7)) {
    CHECK(close(sub.alpha(t), vp.alpha(t), 1e-15));
    CHECK(close(sub.sigma(t), 1.0 - vp.alpha(t) * vp.alpha(t), 1e-12));
  }

  const EDMSchedule edm; // sigma = t in [0.002, 80]
  check_schedule_identities("EDM", edm, interior(edm.t_min(), edm.t_max(), 1e-6, 25), 1e-6);
  for (double t : {0.002, 0.1, 1.0, 80.0}) {
    CHECK(edm.alpha(t) == 1.0);
    CHECK(edm.sigma(t) == t);
    CHECK(edm.node(t).model_t == t);
  }
}

TEST_CASE("alpha and sigma keep full precision as t -> 0", "[schedule][precision]") {
  // References from series in long double: no 1 - alpha^2 or log(a) - log(b) anywhere.
  SECTION("VP linear") {
    const VPLinearSchedule s(0.1, 20.0, 1e-12, 1.0);
    for (double t : {1e-3, 1e-5, 1e-7, 1e-9, 1e-11}) {
      const long double u = (20.0L - 0.1L) * t * t / 2 + 0.1L * t; // -2 log alpha
      const long double sigma = std::sqrt(-std::expm1(-u));
      INFO("t = " << t);
      CHECK(close(s.sigma(t), static_cast<double>(sigma), 4e-16));
      CHECK(close(s.alpha(t), static_cast<double>(std::exp(-u / 2)), 4e-16));
      CHECK(close(s.lambda(t), static_cast<double>(-u / 2 - std::log(sigma)), 4e-16));
      CHECK(close(s.node(t).sigma, static_cast<double>(sigma), 4e-16));
    }
  }
  SECTION("VP cosine") {
    const double off = 0.008;
    const VPCosineSchedule s(off, 1e-12, 0.9946);
    for (double t : {1e-3, 1e-5, 1e-7, 1e-9, 1e-11}) {
      // cos(a + d)/cos(a) = 1 - 2 sin(a + d/2) sin(d/2)/cos(a): no cancellation.
      const long double pi = std::numbers::pi_v<long double>;
      const long double a = off / (1 + off) * pi / 2, d = t / (1 + off) * pi / 2;
      const long double log_alpha =
          std::log1p(-2 * std::sin(a + d / 2) * std::sin(d / 2) / std::cos(a));
      const long double sigma = std::sqrt(-std::expm1(2 * log_alpha));
      INFO("t = " << t);
      CHECK(close(s.sigma(t), static_cast<double>(sigma), 1e-15));
      CHECK(close(s.alpha(t), static_cast<double>(std::exp(log_alpha)), 1e-15));
      CHECK(close(s.lambda(t), static_cast<double>(log_alpha - std::log(sigma)), 1e-15));
    }
  }
  SECTION("sub-VP") {
    const SubVPSchedule s(0.1, 20.0, 1e-12, 1.0);
    for (double t : {1e-3, 1e-5, 1e-7, 1e-9, 1e-11}) {
      const long double u = (20.0L - 0.1L) * t * t / 2 + 0.1L * t;
      const long double sigma = -std::expm1(-u); // 1 - alpha^2
      INFO("t = " << t);
      CHECK(close(s.sigma(t), static_cast<double>(sigma), 4e-16));
      CHECK(close(s.lambda(t), static_cast<double>(-u / 2 - std::log(sigma)), 4e-16));
    }
  }
  SECTION("discrete: the first table entry") {
    // alphas_cumprod[0] = 1 - beta_0, so sigma(t_min) = sqrt(beta_0) exactly.
    const auto s = DiscreteSchedule::from_beta_schedule(BetaSchedule::linear, 1000, 1e-4, 0.02);
    CHECK(close(s.sigma(s.t_min()), std::sqrt(1e-4), 1e-12));
    CHECK(close(s.node(s.t_min()).sigma, std::sqrt(1e-4), 1e-12));
    CHECK(close(s.timestep_node(0).sigma, std::sqrt(1e-4), 1e-12));
  }
}

namespace {
/// diffgrad's make_betas re-derived from diffusers' DDPMScheduler definitions.
std::vector<double> reference_betas(BetaSchedule kind, int n, double b0, double b1) {
  std::vector<double> betas(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    const double frac = static_cast<double>(i) / (n - 1);
    double beta = 0;
    if (kind == BetaSchedule::linear) {
      beta = b0 + frac * (b1 - b0);
    } else if (kind == BetaSchedule::scaled_linear) {
      const double r = std::sqrt(b0) * (1 - frac) + std::sqrt(b1) * frac;
      beta = r * r;
    } else {
      const auto bar = [](double t) {
        return std::pow(std::cos((t + 0.008) / 1.008 * std::numbers::pi / 2), 2);
      };
      beta = std::min(1 - bar((i + 1.0) / n) / bar(1.0 * i / n), 0.999);
    }
    betas[static_cast<std::size_t>(i)] = beta;
  }
  return betas;
}
} // namespace

TEST_CASE("Discrete nodes coincide with the table at t = (k + 1)/N", "[schedule][discrete]") {
  for (int N : {1000, 500}) {
    for (auto kind :
         {BetaSchedule::linear, BetaSchedule::scaled_linear, BetaSchedule::squaredcos_cap_v2}) {
      const double b0 = kind == BetaSchedule::scaled_linear ? 0.00085 : 1e-4;
      const double b1 = kind == BetaSchedule::scaled_linear ? 0.012 : 0.02;
      const auto betas = reference_betas(kind, N, b0, b1);
      std::vector<double> cumprod(betas.size());
      double acc = 1.0;
      for (std::size_t k = 0; k < betas.size(); ++k) cumprod[k] = acc *= 1.0 - betas[k];

      for (auto input :
           {DiscreteTimeInput::dpm_solver_official, DiscreteTimeInput::timestep_index}) {
        const auto s = DiscreteSchedule::from_beta_schedule(kind, N, b0, b1, input);
        INFO("N = " << N << ", kind " << static_cast<int>(kind) << ", input "
                    << static_cast<int>(input));
        REQUIRE(s.num_train_timesteps() == N);
        CHECK(s.t_min() == Approx(1.0 / N).epsilon(1e-15));
        CHECK(s.t_max() == 1.0);
        int mismatches = 0;
        for (int k = 0; k < N; ++k) {
          const double t = (k + 1.0) / N;
          const Node n = s.node(t);
          const Node exact = s.timestep_node(k);
          const double a2 = cumprod[static_cast<std::size_t>(k)];
          const double model_t = input == DiscreteTimeInput::dpm_solver_official
                                     ? 1000.0 * k / N          // official: 1000 (t - 1/N)
                                     : static_cast<double>(k); // diffusers: the timestep
          const bool ok =
              close(n.alpha * n.alpha, a2, 1e-13) && close(n.sigma * n.sigma, 1 - a2, 1e-12) &&
              close(exact.alpha * exact.alpha, a2, 1e-13) &&
              close(exact.sigma * exact.sigma, 1 - a2, 1e-13) &&
              close(n.lambda, exact.lambda, 1e-12, 1e-13) && exact.t == t &&
              close(n.model_t, model_t, 1e-12, 1e-12) &&
              close(exact.model_t, model_t, 1e-12, 1e-12) && close(s.t_of_timestep(k), t, 1e-15);
          if (!ok) ++mismatches;
        }
        CHECK(mismatches == 0);
        // Between nodes, log alpha is linear in t (the official DPM-Solver interpolation).
        for (int k = 0; k + 1 < N; k += 97) {
          const double mid = (k + 1.5) / N;
          const double expected = 0.25 * (std::log(cumprod[static_cast<std::size_t>(k)]) +
                                          std::log(cumprod[static_cast<std::size_t>(k) + 1]));
          CHECK(close(std::log(s.alpha(mid)), expected, 1e-12));
        }
      }
    }
  }
}

TEST_CASE("Stable Diffusion's scaled-linear table gives its well-known sigma range",
          "[schedule][discrete]") {
  // diffusers / k-diffusion report sigma = sqrt((1 - a)/a) from 0.0292 to 14.6146 for
  // scaled_linear betas 0.00085 .. 0.012 over 1000 steps.
  const auto s =
      DiscreteSchedule::from_beta_schedule(BetaSchedule::scaled_linear, 1000, 0.00085, 0.012);
  const auto rho = [](const Node& n) { return n.sigma / n.alpha; };
  CHECK(rho(s.timestep_node(999)) == Approx(14.6146).epsilon(2e-5));
  CHECK(rho(s.timestep_node(0)) == Approx(0.0292).epsilon(2e-3));
}

// =============================================================================================
// Every sampler on every schedule
// =============================================================================================
// Schemes only read nodes, so each should work unchanged on every schedule. On Gaussian data the
// exact probability-flow map is known for any alpha/sigma, so each deterministic combination is
// checked for convergence at close to its order (uniform-lambda grids, 32..256 steps, the whole
// default domain). The schemes' own test files check the asymptotic orders within 0.2; this
// matrix covers a wider lambda range at pre-asymptotic step counts, so it allows 0.7 below theory.
// The stochastic schemes are checked in distribution: from x_T ~ p_T they must reproduce
// p_{t_min} = N(alpha mu, alpha^2 s^2 + sigma^2). DIFFGRAD_PRINT_MATRIX=1 prints the measured
// orders as a Markdown table (the README's table comes from it).

namespace {

using StateD = diffgrad::testing::State<double>;

struct MatrixEntry {
  std::string scheme;
  double expected_order;
  std::vector<double> measured; // one per schedule
};

template <class Scheme, class S>
double flow_error(const Scheme& scheme, const S& s, int num_steps) {
  const EigenBackend<double> backend;
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  const auto nodes = make_nodes(s, uniform_lambda_grid(s, num_steps, s.t_max(), s.t_min()));
  const StateD x_T = nodes.front().sigma * diffgrad::testing::test_batch<double>(4, 3);
  StateD x = x_T;
  sample(scheme, backend, s, nodes, model, x);
  return diffgrad::testing::relative_error<double>(
      x, model.exact_flow(x_T, nodes.front(), nodes.back()));
}

template <class Scheme, class S> double measured_order(const Scheme& scheme, const S& s) {
  const std::vector<int> steps{32, 64, 128, 256};
  std::vector<double> errors;
  for (int n : steps) errors.push_back(flow_error(scheme, s, n));
  return diffgrad::testing::fitted_order(steps, errors);
}

/// Calls f(name, scheme, expected order) for every deterministic noise-model scheme.
template <class F> void for_each_deterministic_scheme(F&& f) {
  f("DDIM", Ddim(), 1.0);
  for (int k : {1, 2, 3}) {
    f("DPM-Solver-" + std::to_string(k) + " (singlestep)",
      DpmSolverSinglestep(k, SolverPrediction::noise), k);
    f("DPM-Solver++ " + std::to_string(k) + "S", DpmSolverSinglestep(k, SolverPrediction::data), k);
  }
#ifdef DIFFGRAD_TEST_HAS_DPM_MULTISTEP
  for (int k : {2, 3}) {
    f("DPM-Solver-" + std::to_string(k) + " (multistep)",
      DpmSolverMultistep(k, SolverPrediction::noise), k);
    f("DPM-Solver++ " + std::to_string(k) + "M", DpmSolverMultistep(k, SolverPrediction::data), k);
  }
#endif
  for (int r : {1, 2, 3}) f("tAB-DEIS-" + std::to_string(r), DeisTab(r), r + 1);
  for (int r : {1, 2, 3}) f("rhoAB-DEIS-" + std::to_string(r), DeisRhoAb(r), r + 1);
  f("rhoRK-DEIS Heun", DeisRhoRk(DeisRkMethod::heun2), 2);
  f("rhoRK-DEIS Kutta", DeisRhoRk(DeisRkMethod::kutta3), 3);
  f("rhoRK-DEIS RK4", DeisRhoRk(DeisRkMethod::rk4), 4);
  for (int k : {2, 3}) f("DEIS (diffusers, log rho) " + std::to_string(k), DeisLogRho(k), k);
  // iPNDM's fixed uniform-step weights are second order on grids not uniform in rho.
  for (int k : {2, 3, 4}) f("iPNDM-" + std::to_string(k), IPndm(k), 2);
}

template <class F> void for_each_schedule(F&& f) {
  f("VP linear", VPLinearSchedule());
  f("VP cosine", VPCosineSchedule());
  f("discrete (linear betas)", DiscreteSchedule::from_beta_schedule(BetaSchedule::linear));
  f("VE", VESchedule());
  f("sub-VP", SubVPSchedule());
  f("EDM", EDMSchedule());
}

} // namespace

TEST_CASE("Every deterministic sampler converges at its order on every schedule",
          "[schedule][matrix]") {
  std::vector<std::string> schedule_names;
  for_each_schedule([&](const std::string& name, const auto&) { schedule_names.push_back(name); });
  std::vector<MatrixEntry> table;
  for_each_deterministic_scheme([&](const std::string& name, const auto& scheme, double order) {
    MatrixEntry entry{name, order, {}};
    for_each_schedule([&](const std::string& schedule_name, const auto& s) {
      const double measured = measured_order(scheme, s);
      INFO(name << " on " << schedule_name << ": fitted order " << measured << ", theory "
                << order);
      CHECK(measured >= order - 0.7);
      entry.measured.push_back(measured);
    });
    table.push_back(entry);
  });
  if (const char* print = std::getenv("DIFFGRAD_PRINT_MATRIX"); print && *print == '1') {
    std::printf("| sampler | order |");
    for (const auto& n : schedule_names) std::printf(" %s |", n.c_str());
    std::printf("\n|---|---|");
    for (std::size_t k = 0; k < schedule_names.size(); ++k) std::printf("---|");
    std::printf("\n");
    for (const auto& e : table) {
      std::printf("| %s | %g |", e.scheme.c_str(), e.expected_order);
      for (double m : e.measured) std::printf(" %.2f |", m);
      std::printf("\n");
    }
  }
}

#ifdef DIFFGRAD_TEST_HAS_SDE_DPM
TEST_CASE("Stochastic samplers reproduce the data distribution on every schedule",
          "[schedule][matrix][sde]") {
  constexpr Eigen::Index kSamples = 4000;
  const auto schemes = {
      std::pair{std::string("SDE-DPM-Solver-1"), SdeDpmSolver(1, SolverPrediction::noise)},
      std::pair{std::string("SDE-DPM-Solver++ 2M"), SdeDpmSolver(2, SolverPrediction::data)}};
  for (const auto& [name, scheme] : schemes) {
    for_each_schedule([&](const std::string& schedule_name, const auto& s) {
      const EigenBackend<double> backend;
      auto model = diffgrad::testing::gaussian_problem<double>(3);
      const auto nodes = make_nodes(s, uniform_lambda_grid(s, 100, s.t_max(), s.t_min()));
      // x_T ~ p_T = N(alpha_T mu, v_T I).
      StateD x = backend.make_state(kSamples, 3);
      backend.gaussian(x, 2718, 999);
      x *= std::sqrt(model.variance(nodes.front()));
      x.rowwise() += nodes.front().alpha * model.mu().transpose();
      SampleOptions options;
      options.seed = 31415;
      sample(scheme, backend, s, nodes, model, x, options);
      const Node& end = nodes.back();
      const double v = model.variance(end);
      const auto n = static_cast<double>(kSamples);
      for (Eigen::Index j = 0; j < 3; ++j) {
        const double mean = x.col(j).mean();
        const double var = (x.col(j).array() - mean).square().sum() / (n - 1);
        INFO(name << " on " << schedule_name << ", coordinate " << j << ": mean " << mean << " vs "
                  << end.alpha * model.mu()(j) << ", variance " << var << " vs " << v);
        // Five standard errors plus a small allowance for the discretisation.
        CHECK(std::abs(mean - end.alpha * model.mu()(j)) < 5 * std::sqrt(v / n) + 0.01);
        CHECK(std::abs(var / v - 1) < 5 * std::sqrt(2 / n) + 0.05);
      }
    });
  }
}
#endif
