// diffgrad reproduces the official DPM-Solver code (LuChengTHU/dpm-solver, dpm_solver_pytorch.py,
// run in float64 by benchmarks/compare/gen_official_dpm_solver_reference.py on the fixed
// nonlinear model of compat_test_model.hpp) to <= 1e-6 relative at every step: multistep and
// singlestep (DPM-Solver-fast, singlestep_fixed) DPM-Solver and DPM-Solver++, orders 1-3,
// skip types time_uniform / logSNR / time_quadratic, solver types dpmsolver / taylor,
// denoise_to_zero, v-prediction, dynamic thresholding, on the discrete-time formulation (log
// alpha interpolated in t, t in [1/N, 1], model fed 1000 (t - 1/N)) and the linear VP schedule.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "compat_test_model.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/compat/diffusers.hpp"
#include "diffgrad/models/prediction.hpp"
#include "diffgrad/models/thresholding.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/sampler.hpp"

using namespace diffgrad;
using namespace diffgrad::testing::compat;
namespace official = diffgrad::compat::official;

namespace {

constexpr double kTolerance = 1e-6;

official::SkipType skip_of(const std::string& s) {
  if (s == "time_uniform") return official::SkipType::time_uniform;
  if (s == "logSNR") return official::SkipType::logSNR;
  if (s == "time_quadratic") return official::SkipType::time_quadratic;
  throw std::runtime_error("unknown skip_type " + s);
}
DpmSolverType solver_type_of(const std::string& s) {
  if (s == "dpmsolver") return DpmSolverType::dpmsolver;
  if (s == "taylor") return DpmSolverType::taylor;
  throw std::runtime_error("unknown solver_type " + s);
}

struct TrajectoryObserver {
  std::vector<Matrix>* states;
  void operator()(int, int, const Node&, const Matrix& x) const { states->push_back(x); }
};

struct Summary {
  std::map<std::string, double> worst;
  ~Summary() {
    for (const auto& [family, d] : worst)
      std::printf("compat official: %-44s max relative difference %.3g\n", family.c_str(), d);
  }
};
Summary summary;

/// Replays one case on `schedule` and returns the largest per-step relative difference.
template <class S> double replay(const ReferenceCase& c, const S& schedule, const Matrix& x_T) {
  const std::string method = c.param("method");
  const auto skip = skip_of(c.param("skip_type"));
  const int steps = c.param_int("steps");
  const int order = c.param_int("order");
  const auto prediction =
      c.param("algorithm_type") == "dpmsolver++" ? SolverPrediction::data : SolverPrediction::noise;
  const auto solver_type = solver_type_of(c.param("solver_type"));
  const double t_T = c.param_double("t_start"), t_0 = c.param_double("t_end");
  const bool denoise = c.param_bool("denoise_to_zero");

  // The official code's grid (outer grid for the singlestep methods).
  std::vector<double> times;
  std::vector<Node> nodes;
  const EigenBackend<double> backend;
  CompatTestModel network;
  models::ThresholdingOptions th;
  th.thresholding = c.param_bool("thresholding");
  th.dynamic_thresholding_ratio = c.param_double("dynamic_thresholding_ratio");
  // official: s = max(quantile, max_val); with max_val = 1 that is clamp(quantile, 1, inf).
  REQUIRE(c.param_double("thresholding_max_val") == 1.0);
  th.sample_max_value = std::numeric_limits<double>::infinity();
  // The official model_type names: noise, x_start, v, score.
  const std::string model_type = c.param("model_type");
  const auto prediction_type = model_type == "noise" ? models::PredictionType::eps
                               : model_type == "x_start"
                                   ? models::PredictionType::x0
                                   : models::parse_prediction_type(model_type);
  auto model = models::thresholded(models::as_eps_model(network, prediction_type), th);

  Matrix x = x_T;
  std::vector<Matrix> states;
  int expected_calls = 0;
  const auto run = [&](const auto& scheme) {
    SamplerWorkspace<EigenBackend<double>> ws(backend, scheme.history(), scheme.stages(), x.rows(),
                                              x.cols());
    run_scheme(scheme, backend, std::span<const Node>(nodes), NodeAtLambda(schedule),
               EpsField<decltype(model)>{model}, x, ws, {}, TrajectoryObserver{&states});
  };
  if (method == "multistep") {
    times = official::time_steps(schedule, skip, t_T, t_0, steps);
    nodes = make_nodes(schedule, times);
    if (denoise) nodes.push_back(terminal_data_node(0.0, schedule.model_time(t_0)));
    run(official::multistep(order, prediction, solver_type, c.param_bool("lower_order_final")));
    expected_calls = steps;
  } else {
    const auto setup = official::singlestep_setup(
        schedule,
        method == "singlestep" ? official::Method::singlestep : official::Method::singlestep_fixed,
        skip, steps, order, prediction, solver_type, t_T, t_0);
    if (c.has_param("orders")) CHECK(setup.orders == c.param_int_list("orders"));
    times = setup.times;
    nodes = make_nodes(schedule, times);
    if (denoise) nodes.push_back(terminal_data_node(0.0, schedule.model_time(t_0)));
    run(setup.scheme);
    for (int k : setup.orders) expected_calls += k;
  }
  if (denoise) ++expected_calls;
  CHECK(network.calls == expected_calls);

  const auto& want_times = c.vector("times");
  REQUIRE(want_times.size() == times.size());
  for (std::size_t i = 0; i < times.size(); ++i)
    CHECK(times[i] == Approx(want_times[i]).epsilon(1e-13));

  REQUIRE(states.size() == c.states.size());
  double worst = 0.0;
  for (std::size_t i = 0; i < states.size(); ++i) {
    const double d = relative_difference(states[i], c.states[i]);
    if (!(d <= kTolerance)) UNSCOPED_INFO(c.name << ": step " << i << " relative difference " << d);
    worst = std::max(worst, d);
  }
  return worst;
}

std::string family_of(const ReferenceCase& c) {
  std::string f = c.param("schedule") + " " + c.param("method") + " " + c.param("algorithm_type") +
                  " o" + c.param("order");
  if (c.param("model_type") != "noise") f += " " + c.param("model_type");
  if (c.param_bool("thresholding")) f += " thresholding";
  if (c.param_bool("denoise_to_zero")) f += " denoise_to_zero";
  return f;
}

} // namespace

TEST_CASE("compat official: the discrete schedule is the official one") {
  const auto ref = read_reference("official_dpm_solver.txt");
  const auto& table = ref.tables.at("alphas_cumprod");
  const auto schedule = DiscreteSchedule::from_beta_schedule(BetaSchedule::linear);
  REQUIRE(table.size() == 1000);
  for (std::size_t k = 0; k < table.size(); ++k)
    CHECK(schedule.alphas_cumprod()[k] == Approx(table[k]).epsilon(1e-14));
  // Node n at t = (n + 1)/N, the model fed 1000 (t - 1/N).
  CHECK(schedule.t_of_timestep(0) == Approx(1e-3));
  CHECK(schedule.model_time(1.0) == Approx(999.0));
}

TEST_CASE("compat official: every method, order, skip type and flag, to 1e-6 per step") {
  const auto ref = read_reference("official_dpm_solver.txt");
  // diffgrad's own table (betas linspace(1e-4, 0.02) in double), not the reference's copy.
  const auto discrete = DiscreteSchedule::from_beta_schedule(BetaSchedule::linear);
  const VPLinearSchedule linear(0.1, 20.0, 1e-3, 1.0);
  const Matrix& x_T = ref.matrices.at("x_T");
  int replayed = 0;
  for (const auto& c : ref.cases) {
    INFO(c.name);
    const double d =
        c.param("schedule") == "discrete" ? replay(c, discrete, x_T) : replay(c, linear, x_T);
    CHECK(d <= kTolerance);
    auto& w = summary.worst[family_of(c)];
    w = std::max(w, d);
    ++replayed;
  }
  CHECK(replayed == static_cast<int>(ref.cases.size()));
}

TEST_CASE("compat official: bad singlestep setups are rejected with the argument named") {
  const auto schedule = DiscreteSchedule::from_beta_schedule(BetaSchedule::linear);
  CHECK_THROWS_WITH(official::time_steps(schedule, official::SkipType::logSNR, 1.0, 1e-3, 0),
                    Catch::Contains("'N'"));
  CHECK_THROWS_WITH(official::time_steps(schedule, official::SkipType::logSNR, 1e-3, 1.0, 4),
                    Catch::Contains("t_T"));
  CHECK_THROWS_WITH(official::singlestep_setup(
                        schedule, official::Method::singlestep_fixed, official::SkipType::logSNR, 2,
                        3, SolverPrediction::data, DpmSolverType::midpoint, 1.0, 1e-3),
                    Catch::Contains("steps"));
  CHECK_THROWS_WITH(
      official::singlestep_setup(schedule, official::Method::multistep, official::SkipType::logSNR,
                                 6, 3, SolverPrediction::data, DpmSolverType::midpoint, 1.0, 1e-3),
      Catch::Contains("method"));
  CHECK_THROWS_WITH(
      official::Singlestep(SolverPrediction::data, DpmSolverType::midpoint, {3}, {0.5}, {0.4}),
      Catch::Contains("r1"));
  CHECK_THROWS_WITH(
      official::Singlestep(SolverPrediction::data, DpmSolverType::midpoint, {}, {}, {}),
      Catch::Contains("orders"));
}

TEST_CASE("compat official: leaving out an official detail is caught (differences >> 1e-6)") {
  const auto ref = read_reference("official_dpm_solver.txt");
  const auto schedule = DiscreteSchedule::from_beta_schedule(BetaSchedule::linear);
  const Matrix& x_T = ref.matrices.at("x_T");
  const EigenBackend<double> backend;
  const auto final_of = [&](const auto& scheme, const std::vector<Node>& nodes) {
    CompatTestModel network;
    SamplerWorkspace<EigenBackend<double>> ws(backend, scheme.history(), scheme.stages(),
                                              x_T.rows(), x_T.cols());
    Matrix x = x_T;
    run_scheme(scheme, backend, std::span<const Node>(nodes), NodeAtLambda(schedule),
               EpsField<CompatTestModel>{network}, x, ws);
    return x;
  };
  const auto case_named = [&](const std::string& name) -> const ReferenceCase& {
    for (const auto& c : ref.cases)
      if (c.name == name) return c;
    throw std::runtime_error("no reference case " + name);
  };

  SECTION("singlestep time_uniform: r1, r2 = 1/3, 2/3 instead of the inner uniform-t grid") {
    const auto& c = case_named("official/singlestep/dpmsolver++/o3/time_uniform/n11");
    const auto setup = official::singlestep_setup(
        schedule, official::Method::singlestep, official::SkipType::time_uniform, 11, 3,
        SolverPrediction::data, DpmSolverType::midpoint, 1.0, 1e-3);
    const auto nodes = make_nodes(schedule, setup.times);
    CHECK(relative_difference(final_of(setup.scheme, nodes), c.states.back()) <= kTolerance);
    DpmSolverSinglestep::Options o;
    o.prediction = SolverPrediction::data;
    o.orders = setup.orders;
    const double d = relative_difference(final_of(DpmSolverSinglestep(o), nodes), c.states.back());
    CHECK(d > 1e-5);
    std::printf("compat official: singlestep time_uniform with r = 1/3, 2/3 differs by %.3g\n", d);
  }
  SECTION("multistep: diffusers' lower-order threshold (15 steps) instead of the official 10") {
    const auto& c = case_named("official/multistep/dpmsolver++/o3/logSNR/n12");
    const auto nodes = make_nodes(
        schedule, official::time_steps(schedule, official::SkipType::logSNR, 1.0, 1e-3, 12));
    DpmSolverMultistep::DiffusersOptions d;
    d.solver_order = 3;
    CHECK(relative_difference(final_of(DpmSolverMultistep::diffusers(d), nodes), c.states.back()) >
          1e-5);
  }
}
