// Cycle-SDE: the first-order SDE step's coefficients, encoding a trajectory into per-step noises,
// re-simulating it from them (<= 1e-12 in float64), regenerating a freshly sampled path from its
// Philox seed without storage, multistep schemes, and bad input.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>

#include "diffgrad/gradients/adjoint_deis.hpp"
#include "diffgrad/gradients/cycle_sde.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "test_support.hpp"

#if __has_include("diffgrad/solvers/sde_dpm_solver.hpp")
#include "diffgrad/solvers/sde_dpm_solver.hpp"
#define DIFFGRAD_TEST_HAVE_SDE_DPM_SOLVER 1
#endif

using namespace diffgrad;
using StateD = EigenBackend<double>::state_type;
using BackendD = EigenBackend<double>;

namespace {

/// max_i |a_i - b_i| / max(1, |b_i|) over a whole trajectory.
double trajectory_gap(std::span<const StateD> a, std::span<const StateD> b) {
  double gap = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i)
    gap = std::max(gap, (a[i] - b[i]).cwiseAbs().maxCoeff() / std::max(1.0, b[i].cwiseAbs().maxCoeff()));
  return gap;
}

struct Setup {
  VPLinearSchedule schedule;
  BackendD backend;
  models::GaussianData<double> model = diffgrad::testing::gaussian_problem<double>(3);
  StateD x_T = diffgrad::testing::test_batch<double>(4, 3);

  std::vector<Node> nodes(int n) const {
    return make_nodes(schedule, uniform_t_grid(schedule, n, 1.0, 1e-3));
  }
  template <class Scheme>
  std::vector<StateD> sample_path(const Scheme& scheme, const std::vector<Node>& nodes,
                                  std::uint64_t seed) {
    const int n = static_cast<int>(nodes.size()) - 1;
    TrajectoryCache<BackendD> cache(backend, n, 4, 3);
    cache.reset(x_T);
    StateD x = x_T;
    SampleOptions opt;
    opt.seed = seed;
    sample(scheme, backend, schedule, nodes, model, x, opt, cache);
    return {cache.states().begin(), cache.states().end()};
  }
  template <class Scheme>
  std::vector<StateD> replay(const Scheme& scheme, const std::vector<Node>& nodes,
                             const std::vector<StateD>& noises, const StateD& start) {
    const int n = static_cast<int>(nodes.size()) - 1;
    TrajectoryCache<BackendD> cache(backend, n, 4, 3);
    cache.reset(start);
    StateD x = start;
    cycle_sde_replay(scheme, backend, schedule, nodes, model, x, std::span<const StateD>(noises),
                     {}, cache);
    return {cache.states().begin(), cache.states().end()};
  }
  template <class Scheme>
  std::vector<StateD> encode(const Scheme& scheme, const std::vector<Node>& nodes,
                             const std::vector<StateD>& traj, CycleSdeResult* result = nullptr) {
    std::vector<StateD> noises(nodes.size() - 1);
    const auto r = cycle_sde_encode(scheme, backend, schedule, nodes, model,
                                    std::span<const StateD>(traj), std::span<StateD>(noises));
    if (result) *result = r;
    return noises;
  }
};

/// A stochastic two-step scheme used only to exercise history handling in encode / replay:
/// x_{i+1} = (alpha_{i+1}/alpha_i) x_i + c e_i + d (x_{i-1} - x_i) + noise xi (no accuracy claim).
struct TwoStepStochastic {
  int history() const { return 1; }
  int stages() const { return 1; }
  bool stochastic() const { return true; }
  void validate(std::span<const Node> nodes) const { validate_nodes(nodes, "TwoStepStochastic"); }
  StepPlan plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    const Node& s = nodes[static_cast<std::size_t>(i)];
    const Node& t = nodes[static_cast<std::size_t>(i) + 1];
    StepPlan p;
    p.stage_node[0] = s;
    p.output.x = t.alpha / s.alpha - (i > 0 ? 0.1 : 0.0);
    p.output.e[0] = -0.5 * (t.alpha * s.sigma / s.alpha - t.sigma);
    if (i > 0) {
      p.output.hist_x[0] = 0.1;
      p.output.hist_e[0] = 0.05;
    }
    p.noise = 0.3 * t.sigma;
    return p;
  }
};

} // namespace

TEST_CASE("Cycle-SDE step coefficients", "[cycle_sde][coeffs]") {
  const VPLinearSchedule sch;
  const Node s = sch.node(0.6), t = sch.node(0.4);
  const auto c = coeffs::cycle_sde_step(s, t);
  const double h = t.lambda - s.lambda;
  CHECK(c.x == Approx(t.alpha / s.alpha).epsilon(1e-15));
  CHECK(c.eps == Approx(-2.0 * t.sigma * (std::exp(h) - 1.0)).epsilon(1e-13));
  CHECK(c.noise == Approx(t.sigma * std::sqrt(std::exp(2.0 * h) - 1.0)).epsilon(1e-13));
  // sigma_t e^h = alpha_t sigma_s / alpha_s, so noise^2 = (alpha_t sigma_s/alpha_s)^2 - sigma_t^2.
  const double q = t.alpha * s.sigma / s.alpha;
  CHECK(c.noise * c.noise == Approx(q * q - t.sigma * t.sigma).epsilon(1e-12));
  // Tiny steps keep full relative precision (expm1, no cancellation).
  const Node t2 = sch.node(0.6 - 1e-9);
  const auto c2 = coeffs::cycle_sde_step(s, t2);
  const double h2 = t2.lambda - s.lambda;
  CHECK(c2.noise == Approx(t2.sigma * std::sqrt(2.0 * h2 * (1.0 + h2))).epsilon(1e-8));
  CHECK(c2.eps == Approx(-2.0 * t2.sigma * h2 * (1.0 + h2 / 2)).epsilon(1e-8));
  // sigma_t = 0 (final node): the finite limits.
  const Node d = terminal_data_node(0.0, 0.0);
  const auto c3 = coeffs::cycle_sde_step(s, d);
  CHECK(c3.eps == Approx(-2.0 * d.alpha * s.sigma / s.alpha));
  CHECK(c3.noise == Approx(d.alpha * s.sigma / s.alpha));
}

TEST_CASE("Cycle-SDE recovers the Philox noise of a sampled path and replays it", "[cycle_sde]") {
  Setup S;
  const auto nodes = S.nodes(25);
  const auto traj = S.sample_path(CycleSdeFirstOrder(), nodes, 11);
  CycleSdeResult r;
  const auto noises = S.encode(CycleSdeFirstOrder(), nodes, traj, &r);
  CHECK(r.steps == 25);
  CHECK(r.model_evals == 25);
  // The encoded noise is the Philox noise the sampler drew (step i, seed 11).
  double noise_gap = 0.0;
  StateD xi(4, 3);
  for (int i = 0; i < 25; ++i) {
    S.backend.gaussian(xi, 11, static_cast<std::uint64_t>(i));
    noise_gap = std::max(noise_gap, (noises[static_cast<std::size_t>(i)] - xi).cwiseAbs().maxCoeff());
  }
  CHECK(noise_gap < 1e-10);
  // Re-simulating with the encoded noises reproduces the trajectory.
  const auto again = S.replay(CycleSdeFirstOrder(), nodes, noises, S.x_T);
  CHECK(trajectory_gap(again, traj) <= 1e-12);
  // A freshly sampled path needs no storage: the same seed regenerates it bit for bit.
  const auto regenerated = S.sample_path(CycleSdeFirstOrder(), nodes, 11);
  CHECK(trajectory_gap(regenerated, traj) == 0.0);
  CHECK(trajectory_gap(S.sample_path(CycleSdeFirstOrder(), nodes, 12), traj) > 1e-3);
}

TEST_CASE("Cycle-SDE encodes the closed form xi_s of the first-order step", "[cycle_sde]") {
  // xi_s = (x_t - (alpha_t/alpha_s) x_s + 2 sigma_t (e^h - 1) eps(x_s)) / (sigma_t sqrt(e^{2h} - 1)),
  // written out here with exp() (docs/math.md, 'Cycle-SDE'), on an arbitrary pair of states.
  Setup S;
  const auto nodes = S.nodes(6);
  std::vector<StateD> traj;
  for (std::size_t i = 0; i < nodes.size(); ++i)
    traj.push_back(diffgrad::testing::test_batch<double>(4, 3) * (0.3 + 0.1 * static_cast<double>(i)));
  const auto noises = S.encode(CycleSdeFirstOrder(), nodes, traj);
  for (std::size_t i = 0; i + 1 < nodes.size(); ++i) {
    const Node &s = nodes[i], &t = nodes[i + 1];
    const double h = t.lambda - s.lambda;
    StateD eps;
    S.model.eps(traj[i], s, eps);
    const StateD expected = (traj[i + 1] - (t.alpha / s.alpha) * traj[i] +
                             2.0 * t.sigma * (std::exp(h) - 1.0) * eps) /
                            (t.sigma * std::sqrt(std::exp(2.0 * h) - 1.0));
    CHECK((noises[i] - expected).norm() <= 1e-12 * expected.norm());
  }
}

TEST_CASE("Cycle-SDE reproduces an arbitrary trajectory to 1e-12", "[cycle_sde]") {
  // Not an SDE sample: a DDIM path with a deterministic kink at every node (CycleDiffusion
  // encodes such given pairs). Encode, replay, compare.
  Setup S;
  for (int n : {10, 50, 200}) {
    const auto nodes = S.nodes(n);
    std::vector<StateD> traj = S.sample_path(Ddim(), nodes, 0);
    for (std::size_t i = 1; i < traj.size(); ++i)
      traj[i] += 0.05 * std::sin(static_cast<double>(i)) * diffgrad::testing::test_batch<double>(4, 3);
    const auto noises = S.encode(CycleSdeFirstOrder(), nodes, traj);
    const auto again = S.replay(CycleSdeFirstOrder(), nodes, noises, traj[0]);
    INFO("N = " << n << ", gap " << trajectory_gap(again, traj));
    CHECK(trajectory_gap(again, traj) <= 1e-12);
  }
}

TEST_CASE("Cycle-SDE handles multistep stochastic schemes (history)", "[cycle_sde]") {
  Setup S;
  const auto nodes = S.nodes(30);
  const auto traj = S.sample_path(TwoStepStochastic(), nodes, 5);
  const auto noises = S.encode(TwoStepStochastic(), nodes, traj);
  StateD xi(4, 3);
  S.backend.gaussian(xi, 5, 17);
  CHECK((noises[17] - xi).cwiseAbs().maxCoeff() < 1e-10);
  CHECK(trajectory_gap(S.replay(TwoStepStochastic(), nodes, noises, S.x_T), traj) <= 1e-12);
}

#ifdef DIFFGRAD_TEST_HAVE_SDE_DPM_SOLVER
TEST_CASE("Cycle-SDE agrees with SdeDpmSolver (order 1, noise prediction)", "[cycle_sde][sde_dpm]") {
  Setup S;
  const auto nodes = S.nodes(20);
  const SdeDpmSolver theirs(1, SolverPrediction::noise);
  const NodeAtLambda nal(S.schedule);
  for (int i = 0; i < 20; ++i) {
    const StepPlan a = theirs.plan(nodes, i, nal), b = CycleSdeFirstOrder().plan(nodes, i, nal);
    CHECK(a.output.x == Approx(b.output.x).epsilon(1e-14));
    CHECK(a.output.e[0] == Approx(b.output.e[0]).epsilon(1e-13));
    CHECK(a.noise == Approx(b.noise).epsilon(1e-13));
  }
  const auto traj = S.sample_path(theirs, nodes, 3);
  CHECK(trajectory_gap(S.sample_path(CycleSdeFirstOrder(), nodes, 3), traj) < 1e-13);
  const auto noises = S.encode(theirs, nodes, traj);
  CHECK(trajectory_gap(S.replay(theirs, nodes, noises, S.x_T), traj) <= 1e-12);
  // SDE-DPM-Solver++(2M): data prediction, multistep history.
  const SdeDpmSolver pp2m(2, SolverPrediction::data);
  const auto traj2 = S.sample_path(pp2m, nodes, 4);
  const auto noises2 = S.encode(pp2m, nodes, traj2);
  CHECK(trajectory_gap(S.replay(pp2m, nodes, noises2, S.x_T), traj2) <= 1e-12);
}
#endif

TEST_CASE("Cycle-SDE rejects bad input", "[cycle_sde][errors]") {
  Setup S;
  const auto nodes = S.nodes(5);
  const auto traj = S.sample_path(CycleSdeFirstOrder(), nodes, 1);
  std::vector<StateD> noises(5);
  const std::span<const StateD> tr(traj);
  // A deterministic step has no noise to recover.
  CHECK_THROWS_WITH(cycle_sde_encode(Ddim(), S.backend, S.schedule, nodes, S.model, tr,
                                     std::span<StateD>(noises)),
                    Catch::Contains("argument 'scheme'") && Catch::Contains("stochastic step"));
  CHECK_THROWS_WITH(cycle_sde_encode(CycleSdeFirstOrder(), S.backend, S.schedule, nodes, S.model,
                                     tr.first(5), std::span<StateD>(noises)),
                    Catch::Contains("argument 'trajectory'") && Catch::Contains("one state per node (6)"));
  std::vector<StateD> too_few(4);
  CHECK_THROWS_WITH(cycle_sde_encode(CycleSdeFirstOrder(), S.backend, S.schedule, nodes, S.model,
                                     tr, std::span<StateD>(too_few)),
                    Catch::Contains("argument 'noises'") && Catch::Contains("got 4"));
  auto bad_shape = traj;
  bad_shape[2] = StateD::Zero(2, 3);
  CHECK_THROWS_WITH(cycle_sde_encode(CycleSdeFirstOrder(), S.backend, S.schedule, nodes, S.model,
                                     std::span<const StateD>(bad_shape), std::span<StateD>(noises)),
                    Catch::Contains("argument 'trajectory'") && Catch::Contains("2 x 3"));
  StateD x = S.x_T;
  CHECK_THROWS_WITH(cycle_sde_replay(CycleSdeFirstOrder(), S.backend, S.schedule, nodes, S.model,
                                     x, std::span<const StateD>(too_few)),
                    Catch::Contains("argument 'noises'"));
  std::vector<StateD> wrong_shape(5, StateD::Zero(4, 2));
  CHECK_THROWS_WITH(cycle_sde_replay(CycleSdeFirstOrder(), S.backend, S.schedule, nodes, S.model,
                                     x, std::span<const StateD>(wrong_shape)),
                    Catch::Contains("argument 'noises'") && Catch::Contains("4 x 2"));
  std::vector<Node> reversed(nodes.rbegin(), nodes.rend());
  CHECK_THROWS_AS(cycle_sde_encode(CycleSdeFirstOrder(), S.backend, S.schedule, reversed, S.model,
                                   tr, std::span<StateD>(noises)),
                  diffgrad::invalid_argument);
}
